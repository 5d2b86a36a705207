"""perceiver.command.signal_guard (with perceiver.command.cli.run): SIGTERM and SIGINT at
any moment of a command end it with one line saying what was kept, a second signal ends
it at once, even inside a native call, and a stop Python drops is delivered again.

The guard changes process-wide handlers, so each case runs in its own small Python
process (no JAX: about a second each); the slow cases signal real commands.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers


_GUARDED = '''
import gc, hashlib, os, signal, sys, threading, time
from perceiver.command import signal_guard
signal_guard.install(stop_status={stop_status})
from perceiver.command import cli
{body}
'''


def _guarded(body, stop_status='None'):
  done = subprocess.run([sys.executable, '-c', _GUARDED.format(body=body,
                                                               stop_status=stop_status)],
                        cwd=helpers.ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(helpers.ROOT)))
  return done.returncode, done.stderr


def test_a_signal_while_starting_ends_the_command_at_once():
  status, stderr = _guarded('os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\n'
                            'print("not stopped")', stop_status=0)
  assert (status, stderr) == (0, 'SIGTERM received while starting: stopped; nothing was '
                                 'written\n')
  status, stderr = _guarded('os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)')
  assert status == 128 + signal.SIGINT
  assert helpers.one_error_line(stderr) == (
      'error: interrupted (SIGINT received while starting): nothing was written')


def test_a_signal_during_the_command_is_reported_with_what_was_kept():
  body = '''
def command():
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(30)
sys.exit(cli.run(command, saved='the last checkpoint in w is kept', stop_status={s}))
'''
  status, stderr = _guarded(body.format(s=0))
  assert (status, stderr) == (0, 'SIGTERM received before the command finished: stopped; '
                                 'nothing was lost; the last checkpoint in w is kept\n')
  status, stderr = _guarded(body.format(s=None))
  assert status == 128 + signal.SIGTERM
  assert helpers.one_error_line(stderr) == (
      'error: interrupted (SIGTERM received): the command did not finish; the last '
      'checkpoint in w is kept')


def test_a_second_signal_ends_a_native_call_at_once():
  # hashlib hashes a large buffer without the GIL and without looking at signals: the
  # Python handler cannot run until it returns (about a second per pass).
  body = '''
def kill_twice():
  time.sleep(0.1)
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.05)
  os.kill(os.getpid(), signal.SIGTERM)

def command():
  data = b'x' * (1 << 29)
  threading.Thread(target=kill_twice).start()
  started = time.monotonic()
  for _ in range(20):
    hashlib.sha256(data).hexdigest()
  print('native calls ran to the end')
sys.exit(cli.run(command, saved='kept', stop_status=0))
'''
  status, stderr = _guarded(body)
  assert status == 128 + signal.SIGTERM, stderr
  assert helpers.one_error_line(stderr) == 'error: SIGTERM received twice: stopped at once; kept'


def test_a_stop_dropped_inside_a_garbage_collector_callback_is_delivered_again():
  body = '''
def callback(phase, info):
  if phase == 'start' and not fired:
    fired.append(1)
    os.kill(os.getpid(), signal.SIGTERM)   # the handler runs here, inside the callback
    sum(range(1000))

fired = []
gc.callbacks.append(callback)

def command():
  gc.collect()
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    sum(range(1000))
  print('not stopped')
sys.exit(cli.run(command, stop_status=0))
'''
  status, stderr = _guarded(body)
  assert (status, stderr) == (0, 'SIGTERM received before the command finished: stopped; '
                                 'nothing was lost\n')


def _start(argv, tmp_path):
  """A command started in the background, its stdout unbuffered and readable as it runs."""
  out = open(tmp_path / 'stdout', 'w')   # pylint: disable=consider-using-with
  err = open(tmp_path / 'stderr', 'w')   # pylint: disable=consider-using-with
  process = subprocess.Popen([sys.executable, '-m', *argv], cwd=helpers.ROOT, stdout=out,
                             stderr=err, env=dict(os.environ, PYTHONUNBUFFERED='1'))
  return process


def _wait_for(process, path, text, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if text in path.read_text():
      return
    assert process.poll() is None, path.read_text()
    time.sleep(0.05)
  raise AssertionError(f'{text!r} did not appear in {path}')


@pytest.mark.slow
def test_train_mlm_sigterm_during_set_up_exits_0_and_says_nothing_was_lost(tmp_path):
  workdir = tmp_path / 'run'
  process = _start(['train.mlm', '--config=train/configs/mlm.py:smoke',
                    f'--workdir={workdir}'], tmp_path)
  _wait_for(process, tmp_path / 'stdout', 'new run in')   # set-up, before any step
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=300) == 0
  lines = [l for l in (tmp_path / 'stderr').read_text().splitlines()
           if not l.startswith(('I', 'W')) or l.startswith('SIGTERM')]
  assert lines == [f'SIGTERM received before the command finished: stopped; nothing was '
                   f'lost; the last complete checkpoint in {workdir} is kept'], lines
  assert not list(workdir.glob('ckpt_*'))


@pytest.mark.slow
def test_eval_mlm_says_it_was_interrupted(tmp_path):
  path = helpers.save_tiny_checkpoint(tmp_path / 'tiny.npz')
  text = tmp_path / 'text.txt'
  text.write_text('\n\n'.join(f'document {i} ' + 'words and more words ' * 50
                              for i in range(3000)))
  out = tmp_path / 'scores.json'
  process = _start(['eval.mlm', f'--checkpoint={path}', f'--data={text}', '--batch_size=1',
                    '--seq_len=64', f'--out={out}'], tmp_path)
  _wait_for(process, tmp_path / 'stderr', 'windows')   # a progress line: it is scoring
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=300) == 128 + signal.SIGTERM
  line = (tmp_path / 'stderr').read_text().strip().splitlines()[-1]
  assert line == 'error: interrupted (SIGTERM received): the command did not finish', line
  assert not out.exists()
