"""The training loop every task runs: pretraining, GLUE fine-tuning, and any later one.

A task hands ``Loop`` a jitted train step (``perceiver.training.step``), batches, and
callbacks for what is its own (how to evaluate, what a checkpoint holds, extra log
fields); the loop owns the rest:

- logging: a record every ``log_every`` steps (and at the last step) with the window's
  mean loss and accuracy, learning rate, gradient norm and step time; a step's metrics
  are read while the next step runs, so the host never stalls the devices;
- evaluation every ``eval_every`` steps (and at the end, and at a stop, if asked);
- checkpoints every ``checkpoint_every`` steps, at the end, and when stopped;
- a non-finite loss or gradient stops the run (``NonFiniteError``) without saving;
- SIGTERM or SIGINT stops the run at a step every host agrees on (``distributed.StopAgreement``),
  saves, and returns; a second signal, or no agreement in ``stop_timeout_s``, ends the
  process with an error instead of hanging;
- ``max_seconds`` of wall-clock time (a run budgeted by time) stops it the same way;
- ``batch_timeout_s`` bounds the wait for one batch: past it the run ends with an error
  naming what it waited on (a stuck data worker), without saving.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Iterator, Optional

import jax

from perceiver.training import distributed

# Metrics a step reports that are not summed over a window: the last value is logged.
_LAST = ('grad_norm', 'learning_rate', 'finite')


class NonFiniteError(RuntimeError):
  """A step's loss or gradient was not finite; ``step`` is that step."""

  def __init__(self, step: int):
    super().__init__(f'non-finite loss or gradient at step {step}')
    self.step = step


@dataclasses.dataclass
class Window:
  """Sums of the step metrics since the last log record."""
  sums: Dict[str, float] = dataclasses.field(default_factory=dict)
  last: Dict[str, float] = dataclasses.field(default_factory=dict)
  steps: int = 0
  start: float = dataclasses.field(default_factory=time.time)

  def add(self, metrics: Dict[str, float]):
    for key, value in metrics.items():
      if key in _LAST:
        self.last[key] = value
      else:
        self.sums[key] = self.sums.get(key, 0.0) + value
    self.steps += 1

  def report(self) -> Dict[str, float]:
    """Mean loss (and accuracy, where the task counts correct predictions), the last
    learning rate and gradient norm, and the mean step time."""
    count = max(self.sums.get('count', 0.0), 1.0)
    out = {'loss': self.sums.get('loss', 0.0) / count}
    if 'correct' in self.sums:
      out['accuracy'] = self.sums['correct'] / count
    for key in ('learning_rate', 'grad_norm'):
      if key in self.last:
        out[key] = self.last[key]
    out['step_time_s'] = (time.time() - self.start) / max(self.steps, 1)
    return out


@dataclasses.dataclass
class Result:
  """How a ``Loop.run`` ended."""
  state: Any
  step: int
  last_report: Dict[str, float]
  stopped: bool          # by a signal (state saved at ``step``)


@dataclasses.dataclass
class Loop:
  """Runs ``train_step`` from ``start_step`` to ``total_steps`` (see the module docstring).

  Attributes:
    train_step: ``(state, batch) -> (state, metrics)``, metrics global scalars: sums (``loss``,
      ``count``, optionally ``correct`` and others) and ``grad_norm``, ``learning_rate``,
      ``finite``.
    total_steps: the step to stop at.
    writer: a ``writer.MetricWriter``.
    log_every: log a train record every this many steps (> 0).
    extra_report: ``(step, report, window) -> dict`` of the task's own log fields.
    evaluate: ``(step, state) -> None``, called every ``eval_every`` steps.
    save: ``(step, state, data_position) -> None``, called every ``checkpoint_every``
      steps, at the end and when stopped.
    stop: the run's ``distributed.StopAgreement`` (signals, and agreement across hosts).
    max_seconds: > 0: stop (and save) at the first step past this many seconds of this
      process's run (set-up before ``run`` not counted).
    eval_on_stop: also evaluate at a stop (a run whose evaluations are not tied to
      epochs: its last state is scored).
  """
  train_step: Callable
  total_steps: int
  writer: Any
  log_every: int
  stop: distributed.StopAgreement
  extra_report: Optional[Callable[[int, Dict, Window], Dict]] = None
  eval_every: int = 0
  eval_at_end: bool = False
  eval_on_stop: bool = False
  evaluate: Optional[Callable[[int, Any], None]] = None
  checkpoint_every: int = 0
  save: Optional[Callable[[int, Any, Any], None]] = None
  max_seconds: float = 0.0
  batch_timeout_s: float = 0.0   # > 0: the longest wait for one batch (then an error)

  def run(self, state, batches: Iterator, start_step: int) -> Result:
    """Steps ``state`` over ``batches`` ((device batch, data position) pairs)."""
    step, report = start_step, {}
    window = Window()
    deadline = time.time() + self.max_seconds if self.max_seconds else None
    pending = None          # (step, metrics) of the step in flight: read one step late
    position = None
    self.writer.start(step)
    while step < self.total_steps:
      item = self.stop.next_batch(batches, step, self.batch_timeout_s)
      if item is None:      # stopped while waiting for data (one host only)
        break
      batch, position = item
      state, metrics = self.train_step(state, batch)
      self.stop.dispatch()
      step += 1
      if pending is not None:
        self._read(window, *pending)
      pending = (step, metrics)
      if deadline is not None and time.time() >= deadline and not self.stop.requested:
        self.stop.request(reason='train.max_seconds')
      last = step == self.total_steps
      at_log = step % self.log_every == 0 or last
      at_eval = bool(self.eval_every) and (step % self.eval_every == 0 or
                                           (last and self.eval_at_end))
      at_save = bool(self.checkpoint_every) and step % self.checkpoint_every == 0 or last
      stopping = self.stop.agreed()
      at_log = at_log or stopping
      at_eval = at_eval or (stopping and self.eval_on_stop and bool(self.eval_every))
      if at_log or at_eval or at_save or stopping:
        self._read(window, *pending)
        pending = None
      if at_log and window.steps:
        report = window.report()
        if self.extra_report:
          report.update(self.extra_report(step, report, window))
        self.writer.write(step, report)
        window = Window()
      if at_eval and self.evaluate:
        self.evaluate(step, state)
      if (at_save or stopping) and self.save:
        self.save(step, state, position)
      if stopping:
        self.writer.note(f'stopped by {self.stop.reason()} at step {step}; '
                         + ('checkpoint written' if self.save else 'nothing saved'))
        return Result(state, step, report, True)
    if step < self.total_steps:   # stopped while waiting for data
      if pending is not None:
        self._read(window, *pending)
      if self.save and step > start_step:
        self.save(step, state, position)
      self.writer.note(f'stopped by {self.stop.reason()} at step {step} while waiting for '
                       'data; ' + ('checkpoint written' if self.save and step > start_step
                                   else 'nothing new to save'))
      return Result(state, step, report, True)
    return Result(state, step, report, False)

  @staticmethod
  def _read(window: Window, step: int, metrics) -> None:
    values = jax.device_get(metrics)   # replicated scalars: every host reads them
    if not values['finite']:
      raise NonFiniteError(step)
    window.add({k: float(v) for k, v in values.items()})
