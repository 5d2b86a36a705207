"""SIGTERM and SIGINT at any moment of a command, including inside long C++ calls.

Python runs a signal handler only between bytecodes of the main thread: while the main
thread is inside one long native call (an XLA compilation, ``jax.distributed``'s
connect), a signal waits, and two signals in that time arrive as one. ``install`` (called
first thing by every command, through ``perceiver.cli.start``) closes that gap:

- Python-level handlers for SIGTERM and SIGINT raise ``Stopped`` at the first signal
  (the command unwinds, releasing what it holds, and ``perceiver.cli.run`` reports what
  was kept) and ``hosts.Interrupted`` at a later one. The training loop installs its own
  handlers over these while it runs (``hosts.StopAgreement``: stop at an agreed step).
- The signals are also counted by a watcher thread, fed by the interpreter's wake-up
  file descriptor, which receives one byte per signal as it arrives, even while the main
  thread is in native code. At the second signal the watcher ends the process at once
  (status 128 + signal) unless the main thread already reported it. Inside a
  ``blocking`` section (a native call that writes nothing), the first signal ends the
  process at once too, with the section's message.

Whoever reports an ending first (``claim``) prints the one line; the other stays silent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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


class _State:
  """The watcher's state; one per process."""

  def __init__(self):
    self.lock = threading.Lock()
    self.count = 0                 # signals seen by the watcher
    self.handled = 0               # signals seen by the Python-level handler
    self.claimed = False           # an ending was reported
    self.blocking: Optional[str] = None   # message of the current ``blocking`` section
    self.saved = ''                # what the command keeps, for the messages
    self.installed = False


_STATE = _State()


def claim() -> bool:
  """True for the first caller only: that caller reports how the command ends."""
  with _STATE.lock:
    if _STATE.claimed:
      return False
    _STATE.claimed = True
    return True


def _handler(signum, frame):
  del frame
  _STATE.handled += 1
  if _STATE.handled == 1:
    raise Stopped(signum)
  from perceiver.training import hosts  # pylint: disable=import-outside-toplevel
  raise hosts.Interrupted(signum)


def _exit_now(signum: int, line: str, status: int) -> None:
  if claim():
    sys.stderr.write(line + '\n')
    sys.stderr.flush()
    os._exit(status)   # pylint: disable=protected-access


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
        _STATE.count += 1
        count, blocking = _STATE.count, _STATE.blocking
      name = signal.Signals(signum).name
      saved = f'; {_STATE.saved}' if _STATE.saved else ''
      if count >= 2:
        _exit_now(signum, f'error: {name} received twice: stopped at once{saved}',
                  128 + signum)
      elif blocking is not None:
        _exit_now(signum, f'{name} received {blocking}: stopped; nothing was written'
                  f'{saved}', 0)


def install(saved: str = '') -> None:
  """Installs the handlers and the watcher (main thread only; once per process).

  ``saved`` says what the command keeps if it is stopped (e.g. its last checkpoint).
  """
  if threading.current_thread() is not threading.main_thread():
    return
  _STATE.saved = saved
  if _STATE.installed:
    return
  reader, writer = socket.socketpair()
  writer.setblocking(False)
  signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
  for sig in SIGNALS:
    signal.signal(sig, _handler)
  threading.Thread(target=_watch, args=(reader,), name='signal-guard', daemon=True).start()
  # Kept referenced: closing the writer would stop the wake-up bytes.
  _STATE.installed = (reader, writer)


def set_saved(saved: str) -> None:
  """Updates what the messages say is kept."""
  _STATE.saved = saved


@contextlib.contextmanager
def blocking(what: str):
  """A section (one native call that writes nothing) in which the first signal ends the
  process at once, with status 0 and the line "<SIGNAL> received <what>: stopped".

  ``what`` reads after "received", e.g. ``'while connecting to the coordinator'``.
  """
  _STATE.blocking = what
  try:
    yield
  finally:
    _STATE.blocking = None
