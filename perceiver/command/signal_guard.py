"""SIGTERM and SIGINT at any moment of a command, including inside long native calls.

Python runs a signal handler only between bytecodes of the main thread: while the main
thread is inside one long native call (an XLA compilation, ``jax.distributed``'s
connect), a signal waits, and two signals in that time arrive as one. And an exception
raised by a handler is dropped when the handler happens to run inside a
garbage-collector callback or a ``__del__`` (JAX has such a callback). ``install``,
called first thing by every command module run as ``__main__`` (before its imports,
which take seconds), closes these gaps:

- Until the command's own code runs (``started``, called by ``perceiver.command.cli.run``), a
  signal ends the process at once: nothing has been written yet.
- Then the first SIGTERM or SIGINT raises ``Stopped``: the command unwinds, releasing
  what it holds, and ``perceiver.command.cli.run`` reports what was kept. If Python drops that
  exception, it is delivered again (``_lost``), and ``check`` raises it at safe points.
  The training loop installs its own handlers over these while it runs
  (``distributed.StopAgreement``: a stop at a step all hosts agree on, with a checkpoint).
- Every signal is also counted by a watcher thread, fed by the interpreter's wake-up
  file descriptor, which receives one byte per signal as it arrives, even while the main
  thread is in native code. At the second signal the watcher ends the process at once
  (status 128 + signal). Inside a ``blocking`` section (a native call that writes
  nothing), the first signal ends it at once too.

Whoever reports an ending first (``claim``) prints the one line; the other stays silent.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import _thread
import sys
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
  """The first SIGTERM/SIGINT outside the training loop: unwind and report.

  A BaseException, like KeyboardInterrupt, so that no ``except Exception`` in between
  swallows it.
  """

  def __init__(self, signum: int):
    super().__init__(f'{signal.Signals(signum).name} received')
    self.signum = signum


class Interrupted(BaseException):
  """A second SIGTERM or SIGINT: stop now, without saving. ``signum`` is the signal.

  (``perceiver.training.distributed.Interrupted`` is this class.)
  """

  def __init__(self, signum: int):
    super().__init__(f'{signal.Signals(signum).name} received twice')
    self.signum = signum


class _State:
  """The watcher's state; one per process."""

  def __init__(self):
    self.lock = threading.Lock()
    self.count = 0                 # signals seen by the watcher
    self.handled = 0               # signals seen by the Python-level handler
    self.pending: Optional[int] = None   # the first one's number (see ``check``)
    self.redelivered = 0           # deliveries again by ``_lost``, for the handler
    self.echoes = 0                # ... and their wake-up bytes, for the watcher
    self.previous_hook = sys.unraisablehook
    self.claimed = False           # an ending was reported
    self.blocking: Optional[str] = None   # message of the current ``blocking`` section
    self.saved = ''                # what the command keeps, for the messages
    self.stop_status: Optional[int] = None   # see ``install``
    self.installed = None          # (reader, writer) of the wake-up fd, kept referenced


_STATE = _State()


def claim() -> bool:
  """True for the first caller only: that caller reports how the command ends."""
  with _STATE.lock:
    if _STATE.claimed:
      return False
    _STATE.claimed = True
    return True


def reported() -> bool:
  """Whether a signal's ending of the command was reported (``claim``)."""
  return _STATE.claimed


def _blocking_exit(signum: int, blocking: str) -> None:
  name = signal.Signals(signum).name
  saved = f'; {_STATE.saved}' if _STATE.saved else ''
  if _STATE.stop_status == 0:
    _exit_now(f'{name} received {blocking}: stopped; nothing was written{saved}', 0)
  else:
    _exit_now(f'error: interrupted ({name} received {blocking}): nothing was written'
              f'{saved}', 128 + signum)


def check() -> None:
  """Raises ``Stopped`` again if a signal's was lost.

  A handler's exception can be swallowed: Python runs handlers between any two
  bytecodes, also inside a garbage-collector callback or a ``__del__``, whose
  exceptions are printed and ignored. Long commands call this at points where a stop
  is safe (before the training loop, each evaluation batch).
  """
  if _STATE.pending is not None:
    raise Stopped(_STATE.pending)


def _handler(signum, frame):
  del frame
  if _STATE.redelivered:   # ``_lost``'s second delivery of a signal already counted
    _STATE.redelivered -= 1
    raise Stopped(signum)
  _STATE.handled += 1
  if _STATE.pending is None:
    _STATE.pending = signum
  if _STATE.blocking is not None:
    _blocking_exit(signum, _STATE.blocking)
  if _STATE.handled == 1:
    raise Stopped(signum)
  # A later signal: the watcher ends the process at once (raising here could land in a
  # place that drops it, and would only race the watcher).


def _exit_now(line: str, status: int) -> None:
  if claim():
    sys.stderr.write(line + '\n')
    sys.stderr.flush()
    os._exit(status)   # pylint: disable=protected-access


def _lost(unraisable) -> None:
  """``sys.unraisablehook``: a ``Stopped`` raised inside a garbage-collector callback or
  a ``__del__`` is dropped by Python; it is delivered again to the main thread (silently)
  instead of being printed and lost."""
  if isinstance(unraisable.exc_value, Stopped) and not _STATE.claimed:
    with _STATE.lock:
      _STATE.redelivered += 1
      _STATE.echoes += 1   # the wake-up byte of the second delivery is not a new signal
    # From another thread, a moment later: a signal handled inside this hook would be
    # dropped again.
    threading.Timer(0.01, _thread.interrupt_main, (unraisable.exc_value.signum,)).start()
    return
  if isinstance(unraisable.exc_value, (Stopped, Interrupted)):
    return
  _STATE.previous_hook(unraisable)


def _watch(reader: socket.socket) -> None:
  while True:
    try:
      data = reader.recv(64)
    except OSError:
      return
    if not data:
      return
    for signum in data:
      if signum not in SIGNALS:
        continue
      with _STATE.lock:
        if _STATE.echoes:
          _STATE.echoes -= 1
          continue
        _STATE.count += 1
        count, blocking = _STATE.count, _STATE.blocking
      if count >= 2:
        saved = f'; {_STATE.saved}' if _STATE.saved else ''
        _exit_now(f'error: {signal.Signals(signum).name} received twice: stopped at once'
                  f'{saved}', 128 + signum)
      elif blocking is not None:
        _blocking_exit(signum, blocking)


def install(stop_status: Optional[int] = None) -> None:
  """Installs the handlers and the watcher (main thread only; once per process).

  Called first thing by a command module run as ``__main__``, before its imports (JAX's
  take seconds): until ``started``, a signal ends the process at once, as nothing has
  been written. ``stop_status``: the exit status of such an early stop, 0 for a command
  whose stop loses nothing (a run that resumes), None for 128 + signal (a one-shot
  command whose result was not written).
  """
  if threading.current_thread() is not threading.main_thread():
    return
  _STATE.stop_status = stop_status
  if _STATE.installed:
    return
  _STATE.blocking = 'while starting'
  reader, writer = socket.socketpair()
  writer.setblocking(False)
  signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
  for sig in SIGNALS:
    signal.signal(sig, _handler)
  _STATE.previous_hook = sys.unraisablehook
  sys.unraisablehook = _lost
  threading.Thread(target=_watch, args=(reader,), name='signal-guard', daemon=True).start()
  _STATE.installed = (reader, writer)   # closing the writer would stop the wake-up bytes


def started(saved: str = '') -> None:
  """The command's own code runs: from now on the first signal raises ``Stopped`` (the
  command unwinds and reports). ``saved`` says what a stop keeps."""
  with _STATE.lock:
    _STATE.blocking = None
    _STATE.saved = saved
    _STATE.claimed = False
    _STATE.handled, _STATE.pending = 0, None


@contextlib.contextmanager
def blocking(what: str):
  """A section (one native call that writes nothing) in which the first signal ends the
  process at once, with the status ``install`` was given and one line naming ``what``.

  ``what`` reads after "received", e.g. ``'while connecting to the coordinator'``.
  """
  _STATE.blocking = what
  try:
    yield
  finally:
    _STATE.blocking = None
