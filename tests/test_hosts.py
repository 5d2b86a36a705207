"""perceiver.training.hosts: a global batch split over hosts, devices and accumulation
steps, and a distributed start-up that gives up in bounded time naming the address and
what it waited for. (The stop every host agrees on is tested through the training loop,
tests/test_training_loop.py, and across two processes, tests/test_multihost.py.)"""

import socket
import subprocess
import sys
import time

import jax
import pytest

from perceiver.training import hosts
from tests import helpers


def test_batch_layout_splits_the_global_batch_and_names_the_fields():
  devices = jax.device_count()
  assert hosts.batch_layout(devices * 4 * 3, 3) == {
      'per_device': 4, 'accum': 3, 'local_devices': jax.local_device_count(),
      'host_batch': jax.local_device_count() * 4 * 3, 'devices': devices}
  with pytest.raises(ValueError, match=rf'^batch_size={devices * 3 + 1} must be a positive '
                     rf'multiple of devices \({devices}\) x grad_accum_steps \(3\)$'):
    hosts.batch_layout(devices * 3 + 1, 3)
  with pytest.raises(ValueError, match=r'^train.batch_size=0 must be a positive multiple'):
    hosts.batch_layout(0, 1, 'train.batch_size')
  with pytest.raises(ValueError, match=r'^accum must be >= 1, got 0$'):
    hosts.batch_layout(8, 0, accum_field='accum')


@pytest.mark.slow
@pytest.mark.parametrize('process_id,waited', [
    (1, 'process 1 of 2 waited 3 s for the coordinator at {address} to answer'),
    (0, 'process 0 of 2 waited 3 s for every other process to connect to the coordinator '
        'it serves at {address}'),
])
def test_distributed_start_up_gives_up_naming_the_address(tmp_path, process_id, waited):
  with socket.socket() as probe:   # a port nobody listens on (closed again at once)
    probe.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{probe.getsockname()[1]}'
  started = time.monotonic()
  done = subprocess.run(
      [sys.executable, '-m', 'train.mlm', f'--workdir={tmp_path / "w"}',
       '--config.distributed.enabled=true',
       f'--config.distributed.coordinator_address={address}',
       '--config.distributed.num_processes=2',
       f'--config.distributed.process_id={process_id}',
       '--config.distributed.initialization_timeout_s=3'],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  assert time.monotonic() - started < 120   # not JAX's 300 s
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: distributed start-up: {waited.format(address=address)}'
                         ), last
  assert 'distributed.initialization_timeout_s' in last
  assert 'Traceback' not in done.stderr and 'Check failure' not in done.stderr
  assert not (tmp_path / 'w').exists()
