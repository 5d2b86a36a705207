"""Feeding the devices: batches read, prepared and transferred by a background thread.

``Prefetcher`` runs an iterator (e.g. the MLM data pipeline) ``depth`` items ahead and
applies ``prepare`` (e.g. ``step.shard``, the transfer to the devices) in the same
thread, so reading, masking and copying overlap the device's compute. The consumer takes
items with ``get(timeout)`` (what ``distributed.StopAgreement.next_batch`` polls, so waiting
stays interruptible; ``waiting_on`` names what a wait is for) or ``next()``. An error in the iterator is raised by the consumer's
next ``get``. ``waited_s`` is the time the consumer has spent waiting in ``get``: the
input-wait share of a training run. ``close`` also closes an iterator that has a
``close`` method and is not a generator (e.g. a pool of worker processes).
"""

from __future__ import annotations

import inspect
import os
import queue
import threading
import time
from typing import Callable, Iterator, Optional


class Prefetcher:
  """``prepare(item)`` for each item of ``iterator``, ``depth`` ahead, in a thread."""

  _DONE = object()

  def __init__(self, iterator: Iterator, depth: int = 4,
               prepare: Optional[Callable] = None):
    if depth < 1:
      raise ValueError(f'prefetch depth must be >= 1, got {depth}')
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._prepare = prepare or (lambda item: item)
    self._finished = False
    self._iterator = iterator
    self.waited_s = 0.0
    self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True,
                                    name='data-prefetch')
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, iterator):
    try:
      for item in iterator:
        if not self._put(self._prepare(item)):
          return
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by the consumer)
      self._put(e)
      return
    self._put(self._DONE)

  def get(self, timeout: Optional[float] = None):
    """The next item; ``queue.Empty`` after ``timeout`` seconds without one;
    ``StopIteration`` at the end; the iterator's own error if it raised one."""
    if self._finished:
      raise StopIteration
    start = time.perf_counter()
    try:
      item = self._queue.get(timeout=timeout)
    finally:
      self.waited_s += time.perf_counter() - start
    if item is self._DONE:
      self._finished = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._finished = True
      raise item
    return item

  def waiting_on(self) -> str:
    """What the consumer waits on, for a message: the iterator's own ``waiting_on()``
    when it has one and it is waiting (e.g. the data worker a pool waits on), else this
    reading thread."""
    own = getattr(self._iterator, 'waiting_on', None)
    what = own() if own is not None else None
    return what or (f'the data-reading thread {self._thread.name!r} of process {os.getpid()} '
                    '(data.workers=0, or preparing a batch)')

  def __iter__(self):
    return self

  def __next__(self):
    return self.get()

  def close(self):
    """Stops the thread (it may be blocked in the iterator; it is a daemon) and closes
    a closable iterator."""
    self._stop.set()
    closer = getattr(self._iterator, 'close', None)
    if closer is not None and not inspect.isgenerator(self._iterator):
      closer()
    self._thread.join(timeout=5)
