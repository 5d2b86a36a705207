"""Periodic training checkpoints in a run directory: save, keep the last N, resume.

Each checkpoint is one ``perceiver.params_file`` file, ``ckpt_<step>.npz``, holding the
parameters and model config, the optimizer state and RNG key as extra trees, and JSON
metadata (step, data position, anything else the run passes). Files are written
atomically, so the newest complete file is always a consistent resume point; leftovers
of an interrupted write (``*.tmp``) are removed at start. Only process 0 writes the
checkpoint; with several hosts, each also writes its own input-pipeline position beside
it (``ckpt_<step>.data-<host>.json``), since every host reads a different shard.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
from typing import Optional

import jax
from jax.experimental import multihost_utils

from perceiver import atomic
from perceiver import params_file

_NAME = re.compile(r'^ckpt_(\d+)\.npz$')


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


class CheckpointManager:
  """Checkpoints of one run under ``directory``."""

  def __init__(self, directory: str, keep: int = 3):
    if keep < 1:
      raise ValueError(f'keep must be >= 1, got {keep}')
    self.directory = directory
    self.keep = keep
    if jax.process_index() == 0:
      os.makedirs(directory, exist_ok=True)
      for stale in glob.glob(os.path.join(directory, 'ckpt_*.*.tmp')):
        os.unlink(stale)

  def steps(self):
    """Steps of the complete checkpoints present, ascending."""
    if not os.path.isdir(self.directory):
      return []
    found = (_NAME.match(name) for name in os.listdir(self.directory))
    return sorted(int(m.group(1)) for m in found if m)

  def path(self, step: int) -> str:
    return os.path.join(self.directory, f'ckpt_{step:09d}.npz')

  def latest(self) -> Optional[str]:
    steps = self.steps()
    return self.path(steps[-1]) if steps else None

  def _data_path(self, step: int, host: int) -> str:
    return os.path.join(self.directory, f'ckpt_{step:09d}.data-{host}.json')

  def save(self, step: int, params, config, *, opt_state=None, rng=None, data_state=None,
           **metadata) -> str:
    """Writes the checkpoint of ``step`` (host arrays) and prunes old ones.

    ``data_state`` is this host's input position (JSON); every host must call ``save``.
    """
    path = self.path(step)
    if jax.process_count() > 1:
      with atomic.atomic_write(self._data_path(step, jax.process_index()), 'w',
                               encoding='utf-8') as f:
        json.dump(data_state, f)
      multihost_utils.sync_global_devices(f'data state of step {step} written')
    if jax.process_index() == 0:
      trees = {}
      if opt_state is not None:
        trees['opt_state'] = opt_state
      if rng is not None:
        trees['rng'] = rng
      params_file.save(path, params, config, trees=trees, step=int(step), data=data_state,
                      **metadata)
      for old in self.steps()[:-self.keep]:
        os.unlink(self.path(old))
        for sidecar in glob.glob(os.path.join(self.directory, f'ckpt_{old:09d}.data-*.json')):
          os.unlink(sidecar)
    return path

  def load_data_state(self, step: int, metadata: dict):
    """This host's input position saved with the checkpoint of ``step``."""
    if jax.process_count() == 1:
      return metadata.get('data')
    path = self._data_path(step, jax.process_index())
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path}: this host\'s data position for step {step} is '
                              'missing; was the run started with another number of hosts?')
    with open(path, encoding='utf-8') as f:
      return json.load(f)

  def restore_latest(self, opt_state_template=None, rng_template=None, note=print,
                     check=None):
    """``(path, (params, config, metadata, opt_state, rng))`` of the newest checkpoint
    that reads back whole, or None if there is none.

    ``check(config, path)``, if given, vets each checkpoint's model config before its
    arrays are read (and raises to refuse it). A newer checkpoint that does not read back
    (truncated, bit-flipped: every array is checked against its CRC) is moved aside to
    ``<name>.corrupt``, kept for inspection, and named in a warning; the one before it is
    tried next. One that reads but does not fit this run (``CheckpointMismatch``) is an
    error, not damage: it is left alone.
    """
    steps = self.steps()
    for index in reversed(range(len(steps))):
      path = self.path(steps[index])
      try:
        if check is not None:
          check(params_file.load_config(path), path)
        return path, self.restore(path, opt_state_template, rng_template)
      except params_file.CheckpointMismatch:
        raise
      except params_file.CheckpointError as e:
        aside = path + '.corrupt'
        if jax.process_index() == 0 and os.path.exists(path):
          os.replace(path, aside)
        then = (f'trying the one before it ({self.path(steps[index - 1])})' if index else
                'no other checkpoint is left: starting a new run from step 0')
        note(f'warning: {path} does not read back ({e}); moved aside to {aside}; {then}')
    return None

  def restore(self, path: str, opt_state_template=None, rng_template=None):
    """Returns (params, config, metadata, opt_state | None, rng | None) from ``path``."""
    params, config, metadata = params_file.load(path)
    opt_state = rng = None
    if opt_state_template is not None:
      opt_state = params_file.load_tree(path, 'opt_state', opt_state_template)
    if rng_template is not None:
      rng = params_file.load_tree(path, 'rng', rng_template)
    return params, config, metadata, opt_state, rng
