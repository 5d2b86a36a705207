"""perceiver.training.distributed: a cluster config refused before JAX starts when it
cannot work (an address without a port, a process id out of range, a coordinator port
another program holds), naming the field; a start-up that gives up in bounded time naming
the address and what it waited for. (The stop every host agrees on is tested through the training loop,
tests/test_training_loop.py, and across two processes, tests/test_multihost.py.)"""

import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from perceiver.command import errors
from perceiver.training import distributed
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


def _cluster(**fields):
  config = ml_collections.ConfigDict(dict(enabled=True, coordinator_address='', num_processes=0,
                                          process_id=-1, heartbeat_timeout_s=0,
                                          initialization_timeout_s=5.0))
  config.update(fields)
  return config


@pytest.mark.parametrize('fields, message', [
    ({'coordinator_address': '10.0.0.1'}, "distributed.coordinator_address='10.0.0.1': "
     'expected HOST:PORT with a port from 1 to 65535'),
    ({'coordinator_address': '10.0.0.1:'}, "coordinator_address='10.0.0.1:': expected"),
    ({'coordinator_address': ':1234'}, "coordinator_address=':1234': expected"),
    ({'coordinator_address': 'host:70000'}, "coordinator_address='host:70000': expected"),
    ({'coordinator_address': 'host:http'}, "coordinator_address='host:http': expected"),
    ({'num_processes': -2}, 'distributed.num_processes=-2: expected an integer >= 1'),
    ({'process_id': -3}, 'distributed.process_id=-3: expected an integer >= 0 '
     r'\(-1: detected'),
    ({'num_processes': 2, 'process_id': 5}, 'distributed.process_id=5: expected 0 to 1'),
    ({'num_processes': 2, 'process_id': 2}, 'distributed.process_id=2: expected 0 to 1'),
])
def test_a_cluster_typo_is_named_before_jax_starts(fields, message):
  with pytest.raises(errors.ConfigError, match=message):
    distributed.check_config(_cluster(**fields))


def test_ipv6_and_plain_addresses_pass_the_check():
  for address in ('10.0.0.1:1234', 'node-0.cluster:8476', '[::1]:1234'):
    distributed.check_config(_cluster(coordinator_address=address, num_processes=2,
                                      process_id=1))


def test_a_coordinator_port_held_by_another_program_is_named_on_process_0():
  with socket.socket() as other:   # another program listening on the port
    other.bind(('127.0.0.1', 0))
    other.listen()
    port = other.getsockname()[1]
    address = f'127.0.0.1:{port}'
    with pytest.raises(errors.ConfigError, match=rf'coordinator_address={address}: port '
                       rf'{port} is already in use on this machine'):
      distributed.check_config(_cluster(coordinator_address=address, num_processes=2,
                                        process_id=0))
    # Process 1 connects to it rather than serving it: nothing to check there.
    distributed.check_config(_cluster(coordinator_address=address, num_processes=2,
                                      process_id=1))


def test_a_process_count_jax_cannot_detect_is_one_line_naming_the_fields(tmp_path):
  """An address with neither the process count nor a cluster to detect it from: JAX's
  ValueError becomes the project's one line (it was a traceback)."""
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  child = ('from perceiver.training import distributed\nimport ml_collections\n'
           'from perceiver.command import cli\n'
           'c = ml_collections.ConfigDict(dict(enabled=True, num_processes=0, process_id=-1,'
           f' coordinator_address="127.0.0.1:{port}", heartbeat_timeout_s=0,'
           ' initialization_timeout_s=5.0))\n'
           'raise SystemExit(cli.run(lambda: distributed.initialize(c)))\n')
  done = subprocess.run([sys.executable, '-c', child], cwd=helpers.ROOT, capture_output=True,
                        text=True, timeout=120)
  lines = [l for l in done.stderr.splitlines() if not l.startswith(('I1', 'W1', 'E1'))]
  assert done.returncode == 1 and len(lines) == 1, done.stderr
  assert lines[0].startswith('error: distributed: Number of processes must be defined') and (
      'distributed.num_processes' in lines[0]), lines[0]
