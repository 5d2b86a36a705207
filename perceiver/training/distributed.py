"""Many hosts as one run: ``jax.distributed`` start-up, and a stop every host agrees on.

A stop (SIGTERM, e.g. a preemption, or Ctrl-C) may reach one host, or all of them at
different times. Each host then keeps stepping: every step it contributes its stop flag
to a sum over all devices (one jitted sum of a global array holding each device's flag),
dispatched right after the train step and read one step later (like the step's metrics),
so every host reads the same sum after the same step and all of them stop there, save
the same checkpoint and return. On one host the flag is read directly, and a stop while
waiting for data returns at once.

Bounded: after a stop request a watchdog ends the process (exit status 3) if the run has
not returned within ``timeout_s`` (a peer that stopped answering, a collective that
never completes). A second signal raises ``Interrupted`` at once.

Why not JAX's own ``jax.experimental.multihost_utils.reached_preemption_sync_point``
(the preemption sync manager of ``jax.distributed``'s coordination service, which agrees
on a step after a SIGTERM reaches any host): it does not give these guarantees.

- One process without ``jax.distributed`` (the usual single-host run) has no
  coordination client, and the function then returns False at every step: a SIGTERM or
  Ctrl-C would never stop the run.
- Its only notice is SIGTERM, caught by the coordination service's own notifier; there
  is no call that raises a notice, so neither Ctrl-C (SIGINT) nor a stop the run asks
  for itself (``train.max_seconds``) can reach the other hosts through it.
- It has no bound: a peer that died or stopped answering leaves the others waiting (no
  ``train.stop_timeout_s``, no second signal that ends the process at once).

(A non-finite step needs no agreement: the step's metrics are global sums every host
reads, so all of them see it at the same step and stop: ``loop.NonFiniteError``.)
"""

from __future__ import annotations

import errno
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from perceiver.command import errors
from perceiver.command import signal_guard

WATCHDOG_EXIT_STATUS = 3


# A second SIGTERM or SIGINT: stop now, without saving (``signum`` is the signal).
Interrupted = signal_guard.Interrupted


class DataStalledError(errors.UserError, RuntimeError):
  """No batch came within the bound on one wait (e.g. a data worker stopped, not dead)."""


# Seconds a process waits at start-up for the coordinator (or, on process 0, for every
# other process) before it gives up; JAX's own limit is 300 s, after which it aborts the
# process with a C++ stack trace.
DEFAULT_INITIALIZATION_TIMEOUT_S = 60.0
INITIALIZATION_EXIT_STATUS = 1


def _host_port(address: str):
  """(host, port) of 'HOST:PORT' or '[IPV6]:PORT', or a ConfigError naming the field."""
  host, sep, port = address.rpartition(':')
  host = host[1:-1] if host.startswith('[') and host.endswith(']') else host
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise errors.ConfigError(f'distributed.coordinator_address={address!r}: expected '
                             'HOST:PORT with a port from 1 to 65535 (e.g. 10.0.0.1:1234)')
  return host, int(port)


def _check_port_free(address: str, port: int) -> None:
  """On the coordinator's own process: the port must be free here (JAX's coordinator
  crashes the process, exit 139, when another program holds it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    # As the coordinator's server binds (gRPC sets it): a port left in TIME_WAIT by an
    # earlier run is free, one another program listens on is not.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(('', port))
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        return
      raise errors.ConfigError(
          f'distributed.coordinator_address={address}: port {port} is already in use on '
          'this machine (another program, or an earlier run still alive); choose another '
          'port') from None


def check_config(config) -> None:
  """Refuses a ``distributed`` block that cannot start, naming the field, before JAX
  tries: an address without a port, a process count or id out of range, and (process 0)
  a coordinator port another program holds."""
  count, index = config.num_processes, config.process_id
  if not isinstance(count, int) or count < 0:
    raise errors.ConfigError(f'distributed.num_processes={count!r}: expected an integer >= 1 '
                             '(0: detected from the cluster)')
  if not isinstance(index, int) or index < -1 or (count and index >= count):
    allowed = f'0 to {count - 1}' if count else 'an integer >= 0'
    raise errors.ConfigError(f'distributed.process_id={index!r}: expected {allowed} '
                             '(-1: detected from the cluster)')
  if config.coordinator_address:
    _, port = _host_port(config.coordinator_address)
    if index == 0:
      _check_port_free(config.coordinator_address, port)


def initialize(config) -> None:
  """Calls ``jax.distributed.initialize`` when ``config.enabled`` (a ``distributed``
  config block: coordinator_address, num_processes, process_id, heartbeat_timeout_s,
  initialization_timeout_s; empty ones are auto-detected on TPU pods, SLURM and other
  supported clusters).

  Bounded: if the connection (and, on process 0, every other process's) is not made
  within ``initialization_timeout_s``, one ``error:`` line names the address, this
  process and what it waited for, and the process exits with status 1. JAX's call cannot
  be interrupted, so a watchdog thread ends the process; JAX's own limit is set past
  ours. A signal while it waits ends the process at once (nothing is written yet).
  """
  if not config.enabled:
    return
  check_config(config)
  kwargs = {}
  if config.coordinator_address:
    kwargs['coordinator_address'] = config.coordinator_address
  if config.num_processes > 0:
    kwargs['num_processes'] = config.num_processes
  if config.process_id >= 0:
    kwargs['process_id'] = config.process_id
  if config.get('heartbeat_timeout_s', 0) > 0:
    kwargs['heartbeat_timeout_seconds'] = int(config.heartbeat_timeout_s)
  timeout = float(config.get('initialization_timeout_s', 0) or
                  DEFAULT_INITIALIZATION_TIMEOUT_S)
  kwargs['initialization_timeout'] = int(math.ceil(timeout)) + 60
  address = config.coordinator_address or 'the auto-detected coordinator'
  count = f' of {config.num_processes}' if config.num_processes > 0 else ''
  who = (f'process {config.process_id}{count}' if config.process_id >= 0 else
         f'this process{count}')
  if config.process_id == 0:
    waited = (f'every other process to connect to the coordinator it serves at {address}'
              ' (are they all started, with this address?)')
  else:
    waited = (f'the coordinator at {address} to answer (is process 0 started there, and '
              'the address and port right?)')
  print(f'connecting to {address} as {who} (giving up after {timeout:g} s: '
        'distributed.initialization_timeout_s)', flush=True)
  done = threading.Event()

  def watchdog():
    if done.wait(timeout) or not signal_guard.claim():
      return
    sys.stderr.write(f'error: distributed start-up: {who} waited {timeout:g} s for {waited};'
                     ' giving up (config field distributed.initialization_timeout_s)\n')
    sys.stderr.flush()
    os._exit(INITIALIZATION_EXIT_STATUS)   # pylint: disable=protected-access

  threading.Thread(target=watchdog, name='distributed-start-up', daemon=True).start()
  try:
    with signal_guard.blocking(f'while connecting to {address}'):
      jax.distributed.initialize(**kwargs)
  except ValueError as e:   # what JAX could not detect or resolve, e.g. the process count
    raise errors.ConfigError(f'distributed: {e} (set distributed.num_processes and '
                             'distributed.process_id, or run under a cluster JAX detects)'
                             ) from None
  finally:
    done.set()


class StopAgreement:
  """Turns SIGTERM/SIGINT into a stop at a step all hosts agree on (module docstring).

  Use as a context manager around the loop; the loop calls ``next_batch``, then
  ``dispatch`` after each train step, then ``agreed``.
  """

  def __init__(self, timeout_s: float = 300.0, note: Callable[[str], None] = print,
               signals=(signal.SIGTERM, signal.SIGINT)):
    self.timeout_s = timeout_s
    self.note = note
    self.signals = signals
    self.multi_host = jax.process_count() > 1
    self._why: Optional[str] = None   # what asked for the stop (a signal's name, ...)
    self._count = 0            # signals received by this host
    self._previous = {}
    self._done = threading.Event()
    self._in_flight = None     # the last dispatched sum (multi-host)
    self._agreed = False
    self._sum = None
    if self.multi_host:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('hosts',))
      self._flags = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('hosts'))
      self._sum = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))

  # -- signals -------------------------------------------------------------------------

  def __enter__(self):
    signal_guard.check()   # a signal during set-up whose exception was lost stops here
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    self._done.set()
    stopping = self.requested or self._agreed
    for sig, handler in self._previous.items():
      # After a stop the checkpoint is saved and the process is exiting: a late signal (a
      # host's own SIGTERM arriving after the hosts agreed) is ignored, and stays ignored
      # through the interpreter's shutdown, so it cannot kill the process mid-exit.
      signal.signal(sig, signal.SIG_IGN if stopping else handler)

  def request(self, signum: Optional[int] = signal.SIGTERM, reason: Optional[str] = None
              ) -> None:
    """Requests a stop, as a signal does (first request only; starts the watchdog).
    ``reason`` names a stop that is not a signal (e.g. a time budget)."""
    if self.requested:
      return
    self._why = reason or signal.Signals(signum).name
    watchdog = threading.Thread(target=self._watchdog, daemon=True)
    watchdog.start()

  def _handle(self, signum, frame):
    del frame
    self._count += 1
    if self._count >= 2:
      raise Interrupted(signum)
    self.request(signum)

  def _watchdog(self):
    if self._done.wait(self.timeout_s):
      return
    sys.stderr.write(f'error: a stop was requested ({self.reason()}) but the run did not '
                     f'reach a step all hosts agree on within {self.timeout_s:g} s '
                     f'(config field train.stop_timeout_s); exiting with status '
                     f'{WATCHDOG_EXIT_STATUS}. The last complete checkpoint is kept.\n')
    sys.stderr.flush()
    os._exit(WATCHDOG_EXIT_STATUS)   # pylint: disable=protected-access

  @property
  def requested(self) -> bool:
    """Whether this host asked for a stop (a signal, or ``request``)."""
    return self._why is not None

  def reason(self) -> str:
    """What stopped the run, for the log."""
    if self._why is None:
      return ('a stop requested on another host (agreed by all hosts)' if self._agreed
              else 'no signal')
    return self._why + (' (agreed by all hosts)' if self.multi_host else '')

  # -- the loop's side -----------------------------------------------------------------

  def next_batch(self, batches, step: int, timeout_s: float = 0.0, poll_s: float = 1.0,
                 report_every_s: float = 30.0):
    """The next item of ``batches`` (a ``feed.Prefetcher``: ``get`` and ``waiting_on``,
    or any iterator); None if a stop was requested while waiting on a single host.

    Waiting is interruptible and reported every ``report_every_s`` seconds, naming what
    it waits on. After ``timeout_s`` (> 0) without a batch it raises
    ``DataStalledError`` naming that (a worker alive but silent is otherwise waited on
    forever); nothing is saved then, the checkpoints already written are kept.
    """
    get = getattr(batches, 'get', None)
    if get is None:
      return None if self._abandon() else next(batches)
    started = time.monotonic()
    reported = 0
    while True:
      if self._abandon():
        return None
      try:
        return get(timeout=poll_s if not timeout_s else
                   max(0.0, min(poll_s, started + timeout_s - time.monotonic())))
      except queue.Empty:
        waited = time.monotonic() - started
        if timeout_s and waited >= timeout_s:
          raise DataStalledError(
              f'no data for step {step + 1} within {timeout_s:g} s (data.batch_timeout_s): '
              f'waiting on {batches.waiting_on()}; stopping without saving, the '
              'checkpoints already written are kept (resume from the newest)') from None
        if waited - reported >= report_every_s:
          reported = waited
          self.note(f'waiting for data for step {step + 1}: {waited:.0f} s so far, on '
                    f'{batches.waiting_on()}')

  def _abandon(self) -> bool:
    return self.requested and not self.multi_host

  def dispatch(self) -> None:
    """After a train step: contributes this host's stop flag to the sum over hosts."""
    if not self.multi_host or self._agreed:
      return
    flag = np.full((jax.local_device_count(),), float(self.requested), np.float32)
    flags = jax.make_array_from_process_local_data(self._flags, flag,
                                                   (jax.device_count(),))
    previous, self._in_flight = self._in_flight, self._sum(flags)
    if previous is not None:
      self._agreed = float(np.asarray(previous)) > 0

  def agreed(self) -> bool:
    """Whether to stop after the step just dispatched (the same answer on every host)."""
    if not self.multi_host:
      return self.requested
    return self._agreed

  def finished(self) -> None:
    """The run returned: the watchdog stands down."""
    self._done.set()
