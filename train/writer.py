"""Run logs: a line per report to stdout and a JSON object per report in metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

from train import tensorboard


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
  """Writes metrics of one run (process 0 only); appends, so a resumed run continues."""

  def __init__(self, workdir: str, total_steps: int, stream=sys.stdout):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.stream = stream
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._start_time = None
    self._start_step = None
    self._created = time.time()
    self._tensorboard = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      # Event files too, if tensorboardX or clu is installed (neither is required).
      self._tensorboard = tensorboard.open_writer(workdir)

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
    # elapsed_s: seconds since this process's writer was made (set-up and compilation
    # included): the wall-clock axis of train.plot.
    record = {'step': int(step), 'kind': kind, 'time': now,
              'elapsed_s': now - self._created, **metrics}
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
