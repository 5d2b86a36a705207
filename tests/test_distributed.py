"""perceiver.training.distributed: a start-up that gives up in bounded time naming the
address and what it waited for. (The stop every host agrees on is tested through the training loop,
tests/test_training_loop.py, and across two processes, tests/test_multihost.py.)"""

import socket
import subprocess
import sys
import time

import pytest

from tests import helpers


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
