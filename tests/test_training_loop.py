"""The shared training loop: logging windows, evaluation and checkpoint cadence,
non-finite stops, signal stops (also while waiting for data), and the stop watchdog."""

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver.training import feed
from perceiver.training import distributed
from perceiver.training import loop as loop_lib
from perceiver.training import mesh as mesh_lib


class _Writer:
  def __init__(self):
    self.records, self.notes = [], []

  def start(self, step):
    self.start_step = step

  def write(self, step, metrics, kind='train'):
    self.records.append((step, kind, dict(metrics)))

  def note(self, message):
    self.notes.append(message)


MESH = mesh_lib.make()


def _counting_step():
  """A jitted 'train step': the state counts steps; the loss of step s is s (count 2),
  with two correct; ``finite`` is 0 when the batch says so."""

  def step(state, batch):
    state = state + 1
    loss = state.astype(jnp.float32)
    metrics = {'loss': 2.0 * loss, 'count': jnp.float32(2.0), 'correct': jnp.float32(1.0),
               'grad_norm': loss, 'learning_rate': jnp.float32(0.5),
               'finite': jnp.min(batch['finite'])}
    return state, metrics

  return jax.jit(step, donate_argnums=(0,))


def _batches(n, bad_step=None):
  for i in range(1, n + 1):
    finite = np.full([jax.device_count()], 0.0 if i == bad_step else 1.0, np.float32)
    yield mesh_lib.shard_batch({'finite': finite}, MESH), {'batches': i}


def _loop(writer, total, stop, **kwargs):
  return loop_lib.Loop(_counting_step(), total_steps=total, writer=writer, log_every=3,
                       stop=stop, **kwargs)


def _stop_with_batch(stop, n):
  """``_batches`` that request a stop (as a SIGTERM would) when handing out batch ``n``."""
  for item in _batches(100):
    if item[1]['batches'] == n:
      stop.request(signal.SIGTERM)
    yield item


def _state():
  return mesh_lib.place(np.zeros((), np.int32), jax.sharding.NamedSharding(
      MESH, jax.sharding.PartitionSpec()))


def test_windows_cadence_and_saves():
  writer, evaluated, saved = _Writer(), [], []
  with distributed.StopAgreement() as stop:
    result = _loop(writer, 7, stop, eval_every=5, evaluate=lambda s, st: evaluated.append(s),
                   checkpoint_every=4, save=lambda s, st, pos: saved.append((s, pos)),
                   extra_report=lambda s, r, w: {'steps_in_window': w.steps}).run(
                       _state(), feed.Prefetcher(_batches(7)), 0)
  assert not result.stopped and result.step == 7
  train = [(s, m) for s, kind, m in writer.records if kind == 'train']
  assert [s for s, _ in train] == [3, 6, 7]           # every 3 steps and the last
  # Steps 1-3: losses 1, 2, 3 over a count of 2 each -> mean 2; accuracy 3/6.
  assert train[0][1]['loss'] == pytest.approx(2.0)
  assert train[0][1]['accuracy'] == pytest.approx(0.5)
  assert train[0][1]['grad_norm'] == 3.0 and train[0][1]['learning_rate'] == 0.5
  assert [m['steps_in_window'] for _, m in train] == [3, 3, 1]
  assert train[2][1]['loss'] == pytest.approx(7.0)
  assert evaluated == [5]
  assert saved == [(4, {'batches': 4}), (7, {'batches': 7})]   # cadence and the end
  assert int(mesh_lib.to_host(result.state)) == 7


def test_a_non_finite_step_stops_the_run_before_it_is_saved():
  writer, saved = _Writer(), []
  with distributed.StopAgreement() as stop:
    with pytest.raises(loop_lib.NonFiniteError, match='step 5') as info:
      _loop(writer, 8, stop, checkpoint_every=4,
            save=lambda s, st, pos: saved.append(s)).run(
                _state(), feed.Prefetcher(_batches(8, bad_step=5)), 0)
  assert info.value.step == 5 and saved == [4]


def test_a_stop_request_saves_at_the_current_step_and_returns():
  writer, saved = _Writer(), []
  with distributed.StopAgreement(note=writer.note) as stop:
    result = _loop(writer, 100, stop, checkpoint_every=50,
                   save=lambda s, st, pos: saved.append((s, pos))).run(
                       _state(), _stop_with_batch(stop, 3), 0)
  # The request came with the third batch: the third step runs, then the loop stops.
  assert result.stopped and result.step == 3 and saved == [(3, {'batches': 3})]
  assert 'stopped by SIGTERM at step 3' in writer.notes[-1]


@pytest.mark.parametrize('eval_on_stop', [False, True])
def test_a_stop_evaluates_only_when_the_run_asks_for_it(eval_on_stop):
  # MLM scores its last state at a stop; GLUE's evaluations belong to whole epochs, so a
  # mid-epoch stop must not produce a score.
  writer, evaluated = _Writer(), []
  with distributed.StopAgreement(note=writer.note) as stop:
    result = _loop(writer, 100, stop, eval_every=10, eval_on_stop=eval_on_stop,
                   evaluate=lambda s, st: evaluated.append(s)).run(
                       _state(), _stop_with_batch(stop, 2), 0)
  assert result.stopped and result.step == 2
  assert evaluated == ([2] if eval_on_stop else [])


def test_waiting_for_data_is_interruptible_and_reported():
  """A source that never yields: the stop ends the wait, the completed steps are saved.
  The stop is requested when the wait is reported (no timer racing the loop)."""
  writer, saved = _Writer(), []
  release = threading.Event()

  def stalls():
    yield from _batches(2)
    release.wait()

  def note(message):
    writer.note(message)
    if 'waiting for data for step 3' in message:
      stop.request(signal.SIGINT)

  batches = feed.Prefetcher(stalls(), depth=1)
  with distributed.StopAgreement(note=note) as stop:
    real_next = stop.next_batch
    stop.next_batch = lambda b, s, timeout_s: real_next(b, s, timeout_s, poll_s=0.1,
                                                        report_every_s=0.5)
    result = _loop(writer, 10, stop, save=lambda s, st, pos: saved.append(s)).run(
        _state(), batches, 0)
  release.set()
  assert result.stopped and result.step == 2 and saved == [2]
  assert any('waiting for data for step 3' in note for note in writer.notes)
  assert 'while waiting for data' in writer.notes[-1]


def test_prefetcher_prepares_in_order_and_reraises_errors_in_the_consumer():
  def broken():
    yield 1
    yield 2
    raise ValueError('boom.jsonl:3: bad')
  items = feed.Prefetcher(broken(), depth=2, prepare=lambda x: x * 10)
  assert items.get(timeout=5) == 10 and next(items) == 20
  with pytest.raises(ValueError, match='boom.jsonl:3'):
    next(items)
  empty = feed.Prefetcher(iter(()), depth=1)
  with pytest.raises(StopIteration):
    next(empty)
  blocked = threading.Event()
  slow = feed.Prefetcher((blocked.wait() for _ in range(1)), depth=1)
  with pytest.raises(queue.Empty):
    slow.get(timeout=0.05)
  blocked.set()
  slow.close()


@pytest.mark.slow
def test_a_second_signal_interrupts_and_the_watchdog_bounds_a_stuck_stop(tmp_path):
  """In a subprocess: a second SIGTERM raises Interrupted at once; a stop that never
  completes ends the process with status 3 after stop_timeout_s."""
  script = textwrap.dedent('''
      import os, signal, sys, time
      from perceiver.training import distributed
      with distributed.StopAgreement(timeout_s=float(sys.argv[1])) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        if sys.argv[2] == 'twice':
          try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
          except distributed.Interrupted as e:
            print('interrupted', e.signum)
            sys.exit(0)
        time.sleep(60)     # a stop that never completes
      ''')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  twice = subprocess.run([sys.executable, '-c', script, '30', 'twice'], cwd=root,
                         capture_output=True, text=True, timeout=60)
  assert twice.returncode == 0 and f'interrupted {int(signal.SIGTERM)}' in twice.stdout
  start = time.monotonic()
  stuck = subprocess.run([sys.executable, '-c', script, '1', 'once'], cwd=root,
                         capture_output=True, text=True, timeout=60)
  assert stuck.returncode == distributed.WATCHDOG_EXIT_STATUS
  # The watchdog is 1 s; the bound leaves 29 s for the interpreter's start-up and imports
  # (about 8 s on a loaded 2-core machine); without the watchdog the script sleeps 60 s.
  assert time.monotonic() - start < 30
  assert 'did not reach a step all hosts agree on within 1 s' in stuck.stderr
