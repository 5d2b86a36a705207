"""Worker processes for the pretraining input: reading, parsing, cropping and masking.

``WorkerPool`` computes a host's streams (``train.data.StreamSpec``) in ``workers``
processes, so the rate grows with the host's cores instead of stopping at one Python
thread's GIL. Stream ``g`` (share ``s``, stream ``j``: ``g = s * streams + j``) runs in
worker ``g % workers``; each worker walks the same schedule as ``data.interleave`` (host
batch ``n`` takes a few rows of every stream of every share, ``data.schedule``) and
sends, in that order, the masked rows of the streams it owns. The training process
receives them in the schedule's order and joins them, so the batches are exactly
``data.interleave``'s -- the same at 0, 1, 2 or 8 workers -- and the position after each
batch (every stream's state) resumes exactly.

Each worker sends through its own pipe, one stream's rows at a time, so it runs about one
host batch ahead of what was received (the ``Prefetcher`` thread that receives keeps the
queue ahead of the train step). Ids travel as int16 and 0/1 arrays as uint8 (6 bytes a
position instead of 16) and are widened back on arrival.

A worker that raises sends its error, which the training process raises (a
``DataError`` keeps its one-line message). A worker that dies (``kill -9``, out of
memory) closes its pipe: the training process raises ``DataWorkerError`` naming it
instead of waiting forever. One that stays alive but sends nothing (stopped by SIGSTOP,
stuck in a network read) is named by ``waiting_on``, which the trainer's bound on one
wait (``data.batch_timeout_s``, ``distributed.StopAgreement.next_batch``) reports.
Workers are started with ``spawn`` (a fresh interpreter: JAX's
threads in the training process must not be forked) and end when the pool is closed, or
when they next send after the training process has gone.

Why not Grain (grain 0.2.18, tried with ``IterDataset.mp_prefetch`` over the same
streams, 2 workers, on the 2-core machine of ``bench/RESULTS.md`` under load): it resumes
exactly and it reports a killed worker (``RuntimeError: Worker process was terminated
unexpectedly with exit code -9``), but (1) its iterator state is per worker (each
worker's iterator state and the next worker to read), so a checkpoint's data position
would bind the run to its worker count, where here the position is per stream and any
number of workers resumes it; (2) its round-robin over workers gives the streams' order
only when the worker count divides the stream count; (3) it took 16.3 s to start 2
workers and deliver 6 batches, against 2-3 s for this pool (``start-up s`` in the data
suite), which every test and short run pays. Its shared-memory transport (883 batches/s
of 512 KB) is faster than these pipes, but the pipes cost ~30 us of the training
process's CPU per 2,048-byte sequence, not what limits the rate.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Dict, List, Optional, Sequence

import numpy as np

from perceiver.command import errors
from train import data as data_lib

# Narrow dtypes for the trip through the pipe (values: ids < 262, masks 0/1).
_NARROW = {'input_ids': np.int16, 'labels': np.int16, 'masked_labels': np.int16,
           'input_mask': np.uint8, 'weights': np.uint8, 'masked_weights': np.uint8}


class DataWorkerError(errors.UserError, RuntimeError):
  """A data worker process ended without being asked to."""


def _narrow(batch: Dict[str, np.ndarray]):
  return {k: (v.astype(_NARROW[k]) if k in _NARROW else v, v.dtype.str)
          for k, v in batch.items()}


def _widen(pieces) -> Dict[str, np.ndarray]:
  """One host batch from the narrow pieces of its streams: joined while narrow, then
  widened (one pass over the wide arrays)."""
  first = pieces[0]
  return {k: (np.concatenate([p[k][0] for p in pieces]) if len(pieces) > 1 else v
              ).astype(dtype, copy=False) for k, (v, dtype) in first.items()}


def _worker_main(specs, states, start: int, layout: str, index: int, count: int,
                 conn) -> None:
  """Runs in worker ``index``: sends its streams' rows in the schedule's order."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the training process's to handle
  readers = {}
  n = start
  try:
    while True:
      for s, j, rows in data_lib.schedule(specs, n, layout):
        g = s * specs[s].streams + j
        if g % count != index:
          continue
        if (s, j) not in readers:
          readers[s, j] = specs[s].rows(j, states[s][j])
        ids, rng, state = readers[s, j].take(rows)
        conn.send(('batch', _narrow(data_lib.mask(specs[s].masker, [(ids, rng)])), state))
      n += 1
  except (BrokenPipeError, EOFError, KeyboardInterrupt):
    return     # the training process has gone, or closed the pool
  except BaseException as e:  # pylint: disable=broad-except  (raised by the training process)
    try:
      conn.send(('error', e, None))
    except Exception:  # pylint: disable=broad-except  (an error that does not pickle)
      conn.send(('error', data_lib.DataError(f'data worker {index}: {e!r}'), None))


def _ended(process) -> str:
  code = process.exitcode
  if code is None:
    return 'closed its pipe'
  if code < 0:
    try:
      return f'was killed by {signal.Signals(-code).name}'
    except ValueError:
      return f'was killed by signal {-code}'
  return f'exited with status {code}'


class WorkerPool:
  """Host batches (and positions) of ``specs`` computed by ``workers`` processes.

  Iterate it like ``data.interleave(specs, position)``; ``close()`` ends the workers.
  """

  def __init__(self, specs: Sequence[data_lib.StreamSpec], workers: int, position=None,
               poll_s: float = 0.2):
    self.specs = list(specs)
    self._n, self._states, self._layout = data_lib.start_positions(self.specs, position)
    total = sum(spec.streams for spec in self.specs)
    self.workers = max(1, min(workers, total))
    self._poll_s = poll_s
    self._closed = False
    self._waiting: Optional[int] = None   # the worker _receive waits on
    ctx = multiprocessing.get_context('spawn')
    self._processes: List = []
    self._conns: List = []
    for index in range(self.workers):
      receive, send = ctx.Pipe(duplex=False)
      process = ctx.Process(target=_worker_main, name=f'data-worker-{index}', daemon=True,
                            args=(self.specs, self._states, self._n, self._layout, index,
                                  self.workers, send))
      process.start()
      send.close()    # the worker holds the only write end: its death is EOF here
      self._processes.append(process)
      self._conns.append(receive)

  def _receive(self, index: int):
    conn, process = self._conns[index], self._processes[index]
    self._waiting = index
    try:
      return self._receive_from(index, conn, process)
    finally:
      self._waiting = None

  def waiting_on(self) -> Optional[str]:
    """The worker whose batch is awaited (read from another thread), or None."""
    index = self._waiting
    if index is None:
      return None
    process = self._processes[index]
    state = 'alive' if process.is_alive() else 'ended'
    return (f'data worker {index} of {self.workers} (pid {process.pid}, {state}, sending '
            'nothing: stopped, or stuck in a read)')

  def _receive_from(self, index: int, conn, process):
    while True:
      if self._closed:
        raise StopIteration
      try:
        if conn.poll(self._poll_s):
          kind, payload, state = conn.recv()
          break
      except (EOFError, OSError):
        if self._closed:
          raise StopIteration from None
        process.join(timeout=1.0)
        raise DataWorkerError(
            f'data worker {index} of {self.workers} (pid {process.pid}) '
            f'{_ended(process)}; the input pipeline cannot continue') from None
    if kind == 'error':
      raise payload
    return payload, state

  def __iter__(self):
    return self

  def __next__(self):
    items = []
    for s, j, _ in data_lib.schedule(self.specs, self._n, self._layout):
      g = s * self.specs[s].streams + j
      piece, self._states[s][j] = self._receive(g % self.workers)
      items.append(piece)
    self._n += 1
    return (_widen(items),
            data_lib.make_position(self.specs, self._n, [list(s) for s in self._states],
                                   self._layout))

  def pids(self) -> List[int]:
    return [p.pid for p in self._processes]

  def close(self) -> None:
    """Ends the workers (safe to call from another thread, and more than once)."""
    if self._closed:
      return
    self._closed = True
    for process in self._processes:
      if process.is_alive():
        process.terminate()
        try:   # a stopped (SIGSTOP) worker acts on the SIGTERM only once continued
          os.kill(process.pid, signal.SIGCONT)
        except OSError:
          pass
    for process in self._processes:
      process.join(timeout=5)
      if process.is_alive():
        process.kill()
        process.join(timeout=5)
    for conn in self._conns:
      conn.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  (interpreter shutdown)
      pass


def host_batches(specs: Sequence[data_lib.StreamSpec], workers: int, position=None):
  """``data.interleave`` in this process (``workers`` = 0) or a ``WorkerPool``."""
  if workers <= 0:
    return data_lib.interleave(specs, position)
  return WorkerPool(specs, workers, position)


def close(batches: Optional[object]) -> None:
  """Closes ``batches`` if it is a ``WorkerPool``."""
  if isinstance(batches, WorkerPool):
    batches.close()
