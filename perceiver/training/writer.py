"""Run logs: a line per report to stdout and a JSON object per report in metrics.jsonl
(``MetricWriter``), and a text log copied into the log files of the run (``RunLog``)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from typing import Optional

import jax

from perceiver.command import atomic
from perceiver.training import tensorboard


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


def _fmt(value) -> str:
  if isinstance(value, float):
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
      return f'{value:.3e}'
    return f'{value:.4f}'
  return str(value)


class MetricWriter:
  """Writes metrics of one run (process 0 only); appends, so a resumed run continues.

  ``resume_step``: the step a resumed run restarts from. Records of later steps (written
  after that checkpoint by the interrupted run, and about to be written again) are
  dropped first, so the file holds one record per step and kind.
  """

  def __init__(self, workdir: str, total_steps: int, stream=None,
               resume_step: Optional[int] = None):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._stream = stream
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._start_time = None
    self._start_step = None
    self._created = time.time()
    self._elapsed_before = 0.0   # run time of the processes before this one (resumes)
    self._tensorboard = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if resume_step is not None and os.path.exists(self.path):
        self._elapsed_before = self._truncate(resume_step)
      # Event files too, if tensorboardX or clu is installed (neither is required).
      self._tensorboard = tensorboard.open_writer(workdir)

  def _truncate(self, step: int) -> float:
    """Drops records after ``step``; returns the run time the kept ones reached."""
    with open(self.path, encoding='utf-8') as f:
      lines = f.read().splitlines()
    kept, elapsed = [], 0.0
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:
        continue   # a line cut by a crash mid-write
      if isinstance(record, dict) and record.get('step', 0) <= step:
        kept.append(line)
        elapsed = max(elapsed, float(record.get('elapsed_s', 0.0)))
    if len(kept) != len(lines):
      with atomic.atomic_write(self.path, 'w', encoding='utf-8') as f:
        f.write(''.join(line + '\n' for line in kept))
    return elapsed

  @property
  def stream(self):
    """Where lines go: the given stream, else whatever ``sys.stdout`` is now."""
    return self._stream or sys.stdout

  def start(self, step: int):
    """Marks where this process began, for the ETA."""
    self._start_time, self._start_step = time.time(), step

  def eta(self, step: int) -> float:
    if self._start_time is None or step <= self._start_step:
      return float('nan')
    rate = (time.time() - self._start_time) / (step - self._start_step)
    return rate * (self.total_steps - step)

  def write(self, step: int, metrics: dict, kind: str = 'train'):
    """One report: ``kind`` is 'train', 'eval', or another label."""
    if not self.enabled:
      return
    metrics = {k: (v if isinstance(v, (str, int)) else float(v)) for k, v in metrics.items()}
    now = time.time()
    # elapsed_s: the run's wall-clock seconds so far, set-up and compilation included,
    # carried across resumes (the time axis of train.plot).
    record = {'step': int(step), 'kind': kind, 'time': now,
              'elapsed_s': self._elapsed_before + now - self._created, **metrics}
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')
    if self._tensorboard is not None:
      self._tensorboard.scalars(step, kind, {k: v for k, v in metrics.items()
                                             if not isinstance(v, str)})
    pct = 100.0 * step / max(self.total_steps, 1)
    fields = ' '.join(f'{k} {_fmt(v)}' for k, v in metrics.items())
    eta = f' eta {_fmt_duration(self.eta(step))}' if kind == 'train' else ''
    print(f'[{kind}] step {step}/{self.total_steps} ({pct:.0f}%) {fields}{eta}',
          file=self.stream, flush=True)

  def note(self, message: str):
    if self.enabled:
      print(message, file=self.stream, flush=True)


class _FileHandler(logging.Handler):
  """Copies Python logging warnings (e.g. ``eval.glue.data``'s) into a log file."""

  def __init__(self, file):
    super().__init__(level=logging.WARNING)
    self.file = file

  def emit(self, record):
    self.file.write(f'warning: {record.getMessage()}\n')
    self.file.flush()


class RunLog:
  """A text stream writing to ``stream`` and to every log file currently open."""

  def __init__(self, stream=None):
    self.stream = stream or sys.stdout
    self._files = []

  def write(self, text: str):
    self.stream.write(text)
    for f in self._files:
      f.write(text)

  def flush(self):
    self.stream.flush()
    for f in self._files:
      f.flush()

  def note(self, message: str):
    self.write(message + '\n')
    self.flush()

  def warn(self, message: str):
    self.note(f'warning: {message}')

  @contextlib.contextmanager
  def to_file(self, path: str, mode: str = 'a'):
    """While inside, every line (and Python logging warnings) also goes to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path, mode, encoding='utf-8')  # pylint: disable=consider-using-with
    handler = _FileHandler(f)
    logging.getLogger().addHandler(handler)
    self._files.append(f)
    try:
      yield
    finally:
      self._files.remove(f)
      logging.getLogger().removeHandler(handler)
      f.close()
