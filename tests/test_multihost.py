"""train.mlm across two processes on this machine (jax.distributed on 127.0.0.1, gloo
collectives): two processes of 4 CPU devices, the parameters FSDP-sharded over all 8,
against one process of 8 devices; a stop on one host or both that every host agrees on,
a dead peer, and resumes refused across host counts. Every process runs under a timeout;
every test here starts processes, so all are marked slow."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from perceiver import params_file

pytestmark = pytest.mark.slow   # every test starts several training processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 240   # seconds for any one process


def _corpus(directory):
  """Two shards, so each of two hosts reads a whole one."""
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta', 'iota']
  paths = []
  for shard in range(2):
    lines = [json.dumps({'text': f'Doc {shard}.{i}: ' + ' '.join(
        rng.choice(words, size=int(rng.integers(5, 30)))) + '.'}) for i in range(150)]
    path = directory / f'shard{shard}.jsonl'
    path.write_text('\n'.join(lines) + '\n')
    paths.append(str(path))
  return ','.join(paths)


def _args(tmp_path, workdir, steps, **overrides):
  settings = {
      'train.steps': steps, 'train.batch_size': 4,
      'train.log_every': 1, 'train.eval_every': 0, 'train.checkpoint_every': 1000,
      'data.docs_per_example': 2, 'data.shuffle_block': 16, 'data.prefetch': 2,
      'optimizer.warmup_steps': 2, 'optimizer.decay_steps': 100,
      'data.sources.stdlib.paths': _corpus(tmp_path), 'data.eval_paths': '',
  }
  settings.update(overrides)
  return (['-m', 'train.mlm', '--config=train/configs/mlm.py:smoke', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in settings.items()])


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _start_hosts(args, workdir, count=2, heartbeat_s=0, devices=1):
  """Starts ``count`` processes of one run; their output goes to files (a pipe nobody
  reads would block a process that logs every step)."""
  port = _free_port()
  procs = []
  for index in range(count):
    host_args = args + ['--config.distributed.enabled=true',
                        f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                        f'--config.distributed.num_processes={count}',
                        f'--config.distributed.process_id={index}',
                        f'--config.distributed.heartbeat_timeout_s={heartbeat_s}']
    logs = [open(f'{workdir}.host{index}.{name}', 'w+', encoding='utf-8')
            for name in ('out', 'err')]
    proc = subprocess.Popen([sys.executable] + host_args, cwd=ROOT, env=_env(devices),
                            stdout=logs[0], stderr=logs[1], text=True)
    proc.logs = logs
    procs.append(proc)
  return procs


def _finish(procs, timeout=TIMEOUT):
  """(return code, stdout, stderr) of each process; kills what is left at the deadline."""
  deadline = time.monotonic() + timeout
  out = []
  for proc in procs:
    try:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise AssertionError(f'a process did not end within {timeout} s:\n' +
                           _read(proc.logs[1])[-3000:])
    out.append((proc.returncode, _read(proc.logs[0]), _read(proc.logs[1])))
  return out


def _read(log):
  log.flush()
  log.seek(0)
  return log.read()


def _run_one(args, devices=1):
  done = subprocess.run([sys.executable] + args, cwd=ROOT, env=_env(devices),
                        capture_output=True, text=True, timeout=TIMEOUT)
  return done.returncode, done.stdout, done.stderr


def _losses(workdir):
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [(r['step'], r['loss']) for r in map(json.loads, lines) if r['kind'] == 'train']


def _wait_for_step(workdir, step, procs, timeout=TIMEOUT):
  """Until metrics.jsonl has a train record at ``step`` (training is under way)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    for p in procs:
      if p.poll() is not None:
        raise AssertionError('a process ended early: ' + _read(p.logs[1])[-3000:])
    if path.exists() and any(s >= step for s, _ in _losses(workdir)):
      return
    time.sleep(0.2)
  raise AssertionError(f'no train record at step {step} within {timeout} s')


def _saved(workdir):
  """{step: files} of the complete checkpoints in ``workdir``."""
  found = {}
  for path in pathlib.Path(workdir).glob('ckpt_*'):
    found.setdefault(int(path.name[5:14]), []).append(path.name[15:])
  return found


@pytest.mark.slow
def test_two_hosts_of_four_devices_give_the_one_host_eight_device_run(tmp_path):
  """FSDP over all 8 devices of both hosts (each parameter matrix split across the two
  processes, gathered to save) against one process with 8 devices and the same mesh."""
  fsdp = {'mesh.data': 1, 'mesh.fsdp': -1, 'train.batch_size': 8}
  two = tmp_path / 'two'
  results = _finish(_start_hosts(_args(tmp_path, two, 6, **fsdp), two, devices=4))
  assert all(code == 0 for code, _, _ in results), results[1][2][-3000:]
  assert 'placement on mesh data 1 x fsdp 8 (8 device(s) on 2 host(s))' in results[0][1]
  # One process, 8 devices, reading both hosts' shares (data.hosts) in one batch.
  one = tmp_path / 'one'
  code, _, stderr = _run_one(_args(tmp_path, one, 6, **fsdp, **{'data.hosts': '0/2,1/2'}),
                             devices=8)
  assert code == 0, stderr[-3000:]
  # The same program on the same mesh; only the reductions' order differs (gloo's
  # all-reduce across processes against XLA:CPU's within one), so float32 rounding.
  steps_two, losses_two = zip(*_losses(two))
  steps_one, losses_one = zip(*_losses(one))
  assert steps_two == steps_one == (1, 2, 3, 4, 5, 6)
  np.testing.assert_allclose(losses_two, losses_one, rtol=1e-6)
  params_two, _, meta_two = params_file.load(two / 'ckpt_000000006')
  params_one, _, meta_one = params_file.load(one / 'ckpt_000000006')
  for module in params_one:
    for name in params_one[module]:
      np.testing.assert_allclose(params_two[module][name], params_one[module][name],
                                 rtol=1e-5, atol=1e-6)
  assert meta_two['process_count'] == 2 and meta_one['process_count'] == 1
  # Each host saved its own data position (host 0's is also in the checkpoint), the
  # positions the one-host run kept for the two shares it read.
  positions = [json.loads((two / f'ckpt_000000006.data-{h}.json').read_text())
               for h in range(2)]
  assert positions[0] == meta_two['data'] and positions == meta_one['data']


@pytest.mark.slow
@pytest.mark.parametrize('both', [False, True], ids=['one_host', 'both_hosts_steps_apart'])
def test_sigterm_stops_every_host_at_the_same_saved_step(tmp_path, both):
  workdir = tmp_path / 'run'
  procs = _start_hosts(_args(tmp_path, workdir, 100000), workdir)
  _wait_for_step(workdir, 3, procs)
  procs[1].send_signal(signal.SIGTERM)
  if both:
    # The other host's signal arrives later: once host 0 has logged another step (or
    # both have ended: the stop was agreed first). A file event, not a timer.
    step = max(s for s, _ in _losses(workdir))
    deadline = time.monotonic() + TIMEOUT
    while (max(s for s, _ in _losses(workdir)) <= step and procs[0].poll() is None
           and time.monotonic() < deadline):
      time.sleep(0.05)
    if procs[0].poll() is None:
      procs[0].send_signal(signal.SIGTERM)
  results = _finish(procs)
  assert [code for code, _, _ in results] == [0, 0], [r[2][-2000:] for r in results]
  saved = _saved(workdir)
  assert len(saved) == 1, saved
  step, files = next(iter(saved.items()))
  assert sorted(files) == ['data-0.json', 'data-1.json', 'npz']
  # Host 0 writes the log: the stop host 1 asked for, agreed on (host 0's own SIGTERM,
  # a second later, finds the stop done or joins it).
  assert f'(agreed by all hosts) at step {step}' in results[0][1]
  assert step == max(s for s, _ in _losses(workdir))


@pytest.mark.slow
def test_a_dead_peer_ends_the_survivor_in_bounded_time(tmp_path):
  """kill -9 of one host: the survivor (heartbeat timeout 10 s) ends with a failure
  status within _finish's bound instead of waiting forever in a collective."""
  workdir = tmp_path / 'run'
  procs = _start_hosts(_args(tmp_path, workdir, 100000), workdir, heartbeat_s=10)
  _wait_for_step(workdir, 3, procs)
  procs[1].kill()
  code, _, _ = _finish(procs[:1], timeout=120)[0]
  assert code != 0
  procs[1].wait()


@pytest.mark.slow
def test_resume_on_another_number_of_hosts_is_refused_both_ways(tmp_path):
  two = tmp_path / 'two'
  assert all(code == 0 for code, _, _ in _finish(_start_hosts(_args(tmp_path, two, 2), two)))
  code, _, stderr = _run_one(_args(tmp_path, two, 4))
  assert code == 1 and 'written by a run on 2 host(s); this run has 1' in stderr, stderr
  one = tmp_path / 'one'
  code, _, stderr = _run_one(_args(tmp_path, one, 2))
  assert code == 0, stderr[-2000:]
  results = _finish(_start_hosts(_args(tmp_path, one, 4), one))
  for code, _, stderr in results:
    assert code == 1 and 'written by a run on 1 host(s); this run has 2' in stderr, stderr
