"""train.mlm across two processes on this machine (jax.distributed on 127.0.0.1, gloo
collectives): two processes of 4 CPU devices, the parameters FSDP-sharded over all 8,
against one process of 8 devices; a stop on one host or both that every host agrees on,
a dead peer, and a checkpoint resumed on another number of hosts. Every process runs
under a timeout; every test here starts processes, so all are marked slow."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from perceiver.params import loading
from perceiver.params import run_checkpoint

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
      'data.docs_per_example': 2, 'data.block_size': 16, 'data.prefetch': 2,
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
  """{step: items} of the checkpoints in ``workdir`` (complete or not)."""
  return {int(path.name[5:14]): sorted(p.name for p in path.iterdir() if p.is_dir())
          for path in pathlib.Path(workdir).glob('ckpt_*')}


@pytest.mark.slow
def test_two_hosts_of_four_devices_give_the_one_host_eight_device_run(tmp_path):
  """FSDP over all 8 devices of both hosts (each parameter matrix split across the two
  processes, each writing its own shards) against one process with 8 devices and the
  same mesh."""
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
  params_two, _, meta_two = loading.load_any(two / 'ckpt_000000006')
  params_one, _, meta_one = loading.load_any(one / 'ckpt_000000006')
  for module in params_one:
    for name in params_one[module]:
      np.testing.assert_allclose(params_two[module][name], params_one[module][name],
                                 rtol=1e-5, atol=1e-6)
  assert meta_two['process_count'] == 2 and meta_one['process_count'] == 1
  # Each host's data position is in the checkpoint, by host: the positions the one-host
  # run kept for the two shares it read.
  positions = run_checkpoint.read_meta(two / 'ckpt_000000006')['data']
  assert len(positions) == 2 and positions == run_checkpoint.read_meta(
      one / 'ckpt_000000006')['data'][0]
  # Both hosts wrote their shards of the FSDP-split parameters.
  assert sorted(p.name for p in (two / 'ckpt_000000006' / 'params').glob('ocdbt.process_*')
                ) == ['ocdbt.process_0', 'ocdbt.process_1']


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
  assert files == ['meta', 'params', 'train']
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


def _fingerprint(array):
  """run_checkpoint's fingerprint, computed independently: the sum over positions i of
  the array's 32-bit words times (2 i + 1), modulo 2**32."""
  words = np.ascontiguousarray(array).reshape(-1).view(np.uint32).astype(np.uint64)
  weights = np.arange(words.size, dtype=np.uint64) * 2 + 1
  return int(np.sum((words * weights) % 2**32) % 2**32)


_NEW_SPLIT = 'every host starts its new share from the beginning of the data'


@pytest.mark.slow
def test_a_checkpoint_of_two_hosts_resumes_on_one_and_back(tmp_path):
  """2 hosts (FSDP over both), checkpoints at steps 2 and 4. Resumed from step 2 on two
  hosts again, the losses of steps 3 and 4 are the uninterrupted run's and so is its
  step-4 checkpoint (every array's fingerprint: parameters, optimizer state, RNG key,
  step): the parameters, optimizer state and data positions restored are the ones the
  run goes on with. 2 hosts -> 1 host: the parameters restored are the ones saved, and
  the log says what becomes of the data position; 1 host -> 2 hosts likewise."""
  fsdp = {'mesh.data': 1, 'mesh.fsdp': -1, 'train.checkpoint_every': 2}
  straight = tmp_path / 'straight'
  results = _finish(_start_hosts(_args(tmp_path, straight, 4, **fsdp), straight))
  assert all(code == 0 for code, _, _ in results), results[1][2][-3000:]
  resumed, two = tmp_path / 'resumed', tmp_path / 'two'
  for run in (resumed, two):
    shutil.copytree(straight / 'ckpt_000000002', run / 'ckpt_000000002')
  results = _finish(_start_hosts(_args(tmp_path, resumed, 4, **fsdp), resumed))
  assert all(code == 0 for code, _, _ in results), results[1][2][-3000:]
  assert 'ckpt_000000002 at step 2' in results[0][1]
  losses = dict(_losses(straight))
  assert sorted(losses) == [1, 2, 3, 4]
  assert _losses(resumed) == [(3, losses[3]), (4, losses[4])]
  assert run_checkpoint.read_meta(resumed / 'ckpt_000000004')['arrays'] == (
      run_checkpoint.read_meta(straight / 'ckpt_000000004')['arrays'])
  # Read on this one host, the parameters are the values the two hosts held when they
  # saved: each array's fingerprint, recomputed here in numpy, is the one their devices
  # computed before writing.
  saved, _, _ = loading.load_any(two / 'ckpt_000000002')
  table = run_checkpoint.read_meta(two / 'ckpt_000000002')['arrays']['params']
  assert len(table) == sum(len(leaves) for leaves in saved.values())
  for module in saved:
    for name in saved[module]:
      assert _fingerprint(saved[module][name]) == table[f"['{module}']['{name}']"][2]
  code, out, stderr = _run_one(_args(tmp_path, two, 3, **fsdp))
  assert code == 0, stderr[-3000:]
  assert 'was written by 2 host(s), this run has 1' in out and _NEW_SPLIT in out, out
  assert 'resuming from' in out and 'ckpt_000000002 at step 2' in out
  # And back: the one-host checkpoint of step 3 onto two hosts.
  results = _finish(_start_hosts(_args(tmp_path, two, 4, **fsdp), two))
  assert all(code == 0 for code, _, _ in results), results[1][2][-3000:]
  assert 'was written by 1 host(s), this run has 2' in results[0][1] and (
      _NEW_SPLIT in results[0][1])
  assert [s for s, _ in _losses(two)] == [3, 4]
