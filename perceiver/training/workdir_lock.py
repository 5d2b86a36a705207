"""The lock a run holds on its working directory (``train.mlm --workdir``, ``eval.glue``'s
and ``eval.tagging``'s), so that two runs never write one directory's checkpoints and logs
at once."""

from __future__ import annotations

import fcntl
import os

import jax

from perceiver.params import params_file


class WorkdirLock:
  """Holds ``<workdir>/.lock`` (an exclusive ``flock``) while a run writes to ``workdir``,
  so that a second run started on the same directory is refused instead of interleaving
  its checkpoints and logs. Only process 0 takes it (the workdir is shared by hosts).
  The kernel releases it when the process ends, however it ends.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, '.lock')
    self._file = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    workdir = os.path.dirname(self.path)
    try:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
    except OSError as e:
      raise params_file.CheckpointError(
          f'--workdir={workdir}: cannot create or write there: {e.strerror or e} '
          f'({e.filename or self.path})') from None
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'another process'
      self._file.close()
      self._file = None
      raise params_file.CheckpointError(
          f'{workdir} is in use by {holder} (lock {self.path}); wait '
          'for it to end or use another --workdir') from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()}\n')
    self._file.flush()
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
