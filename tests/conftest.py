"""pytest settings: the ``slow`` marker and the ``--slow`` option.

By default the tests marked ``slow`` (subprocess runs, multi-process training, kill -9 and
resume, learning runs, the benchmark's smoke suite) are deselected, so ``pytest -q tests``
is a loop of a minute or two on a 2-core CPU; ``--slow`` runs every test, and
``-m slow`` only the slow ones. Helpers shared by the test modules are in
``tests/helpers.py``.
"""


def pytest_addoption(parser):
  parser.addoption('--slow', action='store_true', default=False,
                   help='also run the tests marked slow (CI runs them all)')


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: takes more than a few seconds (subprocesses, several processes, '
      'learning runs); deselected unless --slow or -m selects it')


def pytest_collection_modifyitems(config, items):
  if config.getoption('--slow') or config.getoption('-m'):
    return
  slow = [item for item in items if 'slow' in item.keywords]
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if 'slow' not in item.keywords]
