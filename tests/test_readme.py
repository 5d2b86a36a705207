"""tests/README.md: every test file is in its table, with the number of slow tests that
pytest collects from it (``pytest --collect-only -q -m slow tests``, in a subprocess)."""

import collections
import re
import subprocess
import sys

from tests import helpers

_ROW = re.compile(r'^\| `(test_\w+\.py)` \|.*\| (\d+) \|$')


def test_every_test_file_is_listed_with_its_number_of_slow_tests():
  rows = [_ROW.match(line) for line in
          (helpers.ROOT / 'tests' / 'README.md').read_text().splitlines()]
  listed = {row.group(1): int(row.group(2)) for row in rows if row}
  files = sorted(path.name for path in (helpers.ROOT / 'tests').glob('test_*.py'))
  assert sorted(listed) == files, 'tests/README.md lists other files than tests/ holds'
  done = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-m', 'slow',
                         '-n', '0', '-p', 'no:cacheprovider', 'tests'], cwd=helpers.ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  slow = collections.Counter(line.split('::')[0] for line in done.stdout.splitlines()
                             if '::' in line)
  assert sum(slow.values()) > 0
  assert listed == {name: slow[f'tests/{name}'] for name in files}
