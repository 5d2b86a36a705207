"""``python -m eval.tagging`` as a command: it starts through ``perceiver.command.cli.start``
as every command does, so a bad flag is one ``error:`` line naming it (before anything
runs), and a signal during its run is answered by its signal guard."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _error_lines(stderr):
  """The lines of ``stderr`` that are not absl's log lines (I..., W...)."""
  return [l for l in stderr.splitlines() if l.strip() and not l.startswith(('I', 'W'))]


_FLAG_CASES = [
    (['--data_dir=d', '--stepz=3'], "Unknown command line flag 'stepz'"),
    (['--data_dir=d', '--config.train.epochz=1'],
     "--config.train.epochz=1: no config field 'train.epochz' (did you mean "
     "'train.epochs'?)"),
    (['--config=eval/configs/tagging.py:smoke'], '--data_dir'),
]


@pytest.mark.slow
@pytest.mark.parametrize('argv,message', _FLAG_CASES,
                         ids=['unknown flag', 'bad config field', 'missing required flag'])
def test_bad_flags_are_one_error_line_naming_the_flag(tmp_path, argv, message):
  done = subprocess.run([sys.executable, '-m', 'eval.tagging', *argv,
                         f'--workdir={tmp_path / "w"}'], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  lines = _error_lines(done.stderr)
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_sigterm_during_a_run_stops_it_with_status_0_and_one_line(tmp_path):
  """Without the guard a SIGTERM killed the process (status -15) with nothing said."""
  data_dir = helpers.write_tagging_context_task(tmp_path / 'data', 200, num_dev=20)
  workdir = tmp_path / 'out'
  with open(tmp_path / 'stdout', 'w') as out, open(tmp_path / 'stderr', 'w') as err:
    process = subprocess.Popen(
        [sys.executable, '-m', 'eval.tagging', f'--data_dir={data_dir}',
         f'--workdir={workdir}', '--config=eval/configs/tagging.py:smoke'],
        cwd=ROOT, stdout=out, stderr=err,
        env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1'))
  deadline = time.monotonic() + 300
  while 'eval.tagging on' not in (tmp_path / 'stdout').read_text():
    assert process.poll() is None and time.monotonic() < deadline, (
        (tmp_path / 'stderr').read_text()[-2000:])
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=300) == 0, (tmp_path / 'stderr').read_text()[-2000:]
  lines = _error_lines((tmp_path / 'stderr').read_text())
  assert len(lines) == 1 and (
      lines[0] == 'SIGTERM received before the command finished: stopped; nothing was '
                  'lost; the last epoch is kept; rerun to resume' or
      lines[0].startswith('stopped at step ')), lines
  assert not (workdir / 'dev_metrics.json').exists()
