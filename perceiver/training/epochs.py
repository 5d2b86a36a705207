"""A fine-tuning run in epochs, scored on dev after each: what GLUE and tagging share.

Both fine-tuning commands (``eval.glue_finetune``, ``eval.tagging_finetune``) train a
classifier on ``perceiver.training.driver.Run`` over seeded epochs, score the dev split
after every epoch, keep the best epoch's parameters as a checkpoint, save a resume
checkpoint (parameters, optimizer state, the history so far) that a rerun continues from,
and at the end score the best epoch again to write its predictions. ``train`` does all of
that; a task brings its model's loss and predictions, its batches, how it scores an epoch
(``Scored``) and what it writes from the best epoch. The pieces the two share beside it:
``plan`` (the run's driver, batch layout and length), ``seeded_epochs`` and ``predict``
(the task's batches differ only in their fields), ``check_config`` (the settings both
configs hold), ``finished_summary`` and ``remove_outputs`` (a finished run is reported,
refused or retrained the same way).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from perceiver.training import run_checkpoints
from perceiver.training import driver
from perceiver.training import mesh as mesh_lib
from perceiver.training import step as step_lib
from perceiver.training import writer as writer_lib

# The file a finished run leaves in its directory: its summary, marking it finished.
FINISHED = 'dev_metrics.json'


class Stopped(Exception):
  """A signal stopped a fine-tuning run after saving it; rerunning resumes it."""


# --------------------------------------------------------------------------------------
# Batches and predictions.

def seeded_epochs(num_examples: int, batch_size: int, seed: int, start_step: int,
                  make_batch: Callable[[np.ndarray], Dict[str, np.ndarray]]
                  ) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
  """Endless epochs from step ``start_step`` on: (batch, steps done after it) pairs.

  Each epoch visits every example once in a seeded random order (``[seed, epoch]``, epochs
  counted from 1); ``make_batch(rows)`` builds the host batch of those example rows (its
  last one is short: the task fills it up with zero-weight rows). The position is the step
  count alone, so a resumed run sees exactly the batches it would have seen.
  """
  steps_per_epoch = -(-num_examples // batch_size)
  step = start_step
  while True:
    epoch, index = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch + 1]).permutation(num_examples)
    for start in range(index * batch_size, len(order), batch_size):
      step += 1
      yield make_batch(order[start:start + batch_size]), step


def predict(predict_step: Callable, params: Any, num_examples: int, batch_size: int, mesh,
            make_batch: Callable[[np.ndarray], Dict[str, np.ndarray]],
            inputs: Sequence[str]) -> np.ndarray:
  """The model's outputs for every example, in order (``params`` on ``mesh``): batches of
  ``batch_size`` rows (``make_batch``), of which the model reads the ``inputs`` fields;
  every batch is dispatched before the first is read back."""
  pending = []
  for start in range(0, num_examples, batch_size):
    rows = np.arange(start, min(start + batch_size, num_examples))
    batch = make_batch(rows)
    fed = {k: batch[k] for k in inputs}
    pending.append((len(rows), predict_step(params, mesh_lib.shard_batch(fed, mesh))))
  return np.concatenate([mesh_lib.to_host(out)[:n] for n, out in pending])


# --------------------------------------------------------------------------------------
# Settings, a finished run, and cleaning up after one.

def check_config(config, integers: Sequence[Tuple[str, int]],
                 error: Callable[[str], Exception]) -> None:
  """Refuses what every fine-tuning config holds and cannot run with, naming the field
  (``error(message)``): each of ``integers`` (a dotted field and its least value) must be
  an integer (not a bool) at least that; the ``optimizer`` block must run
  (``driver.check_optimizer_config``, the one check every command applies); the encoder's
  and the head's dropout must be in [0, 1)."""
  for field, low in integers:
    value = config
    for part in field.split('.'):
      value = value[part]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise error(f'{field} must be an integer >= {low}, got {value!r}')
  try:
    driver.check_optimizer_config(config.optimizer)
  except ValueError as e:
    raise error(str(e)) from None
  for field in ('encoder', 'head'):
    if not 0 <= config.dropout[field] < 1:
      raise error(f'dropout.{field} must be in [0, 1), got {config.dropout[field]!r}')


def finished_summary(directory: str, *, resume: bool, overwrite: bool,
                     error: Callable[[str], Exception]) -> Optional[Dict[str, Any]]:
  """What a finished run in ``directory`` wrote (``FINISHED``), to report instead of
  training again; None when there is none to keep (none there, or ``overwrite``).

  Raises ``error(message)`` for a finished run with ``resume`` False (the command neither
  keeps nor replaces it unasked) and for a summary that does not read back.
  """
  if overwrite:
    return None
  path = os.path.join(directory, FINISHED)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError) as e:
    raise error(f'{path}: unreadable ({e}); pass --overwrite to retrain') from None
  if not resume:
    raise error(f'{directory} already holds a finished run ({FINISHED}); pass '
                '--overwrite to replace it, or --resume to keep it')
  return summary


def remove_outputs(directory: str, is_output: Callable[[str], bool]) -> None:
  """Removes what a fine-tuning run left in ``directory`` (not below it): the files
  ``is_output`` names, and the checkpoints (``ckpt_*``) in its ``checkpoint/`` and
  ``resume/`` folders, with those folders once empty; nothing else."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if os.path.isfile(path) and is_output(name):
      os.remove(path)
  for sub in ('checkpoint', 'resume'):
    folder = os.path.join(directory, sub)
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.startswith('ckpt_'):   # a run checkpoint's directory, whole or not
          path = os.path.join(folder, name)
          if os.path.isdir(path):
            shutil.rmtree(path)
          else:
            os.remove(path)
      if not os.listdir(folder):
        os.rmdir(folder)


# --------------------------------------------------------------------------------------
# The run.

@dataclasses.dataclass(frozen=True)
class Plan:
  """A fine-tuning run's shape: its driver (mesh, compute, optimizer), the batch
  layout, and its length."""
  run: driver.Run
  batch_size: int
  accum_steps: int
  epochs: int
  steps_per_epoch: int
  optimizer: ml_collections.ConfigDict   # as it runs: learning rate and decay_steps set

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch

  def describe(self) -> str:
    """One log line's worth: the batch layout, the length and the learning rate."""
    o = self.optimizer
    return (f'batch {self.batch_size} ({self.run.mesh.devices.size} device(s) x '
            f'{self.accum_steps} accumulation step(s)), {self.steps_per_epoch} steps/epoch '
            f'x {self.epochs} epochs = {self.total_steps} steps; learning rate '
            f'{o.learning_rate:g} ({o.name}, warm-up {o.warmup_steps}, {o.decay} decay to '
            f'step {o.decay_steps})')


def plan(config, model_config, num_examples: int, *, batch_size: int, learning_rate: float,
         error: Callable[[str], Exception], batch_field: str = 'train.batch_size') -> Plan:
  """The run of ``config`` (a fine-tuning config: ``train``, ``optimizer``, ``mesh``) for
  ``num_examples`` training examples at ``batch_size`` and ``learning_rate``, on this
  host's devices, the model of ``model_config`` computing as they do best
  (``driver.Run.create``). The learning rate decays to the run's last step unless
  ``optimizer.decay_steps`` says otherwise. A batch or mesh that does not fit is
  ``error(message)`` naming the field (``batch_field`` for the batch size)."""
  try:
    layout = mesh_lib.batch_layout(batch_size, config.train.grad_accum_steps, batch_field,
                                   'train.grad_accum_steps')
  except ValueError as e:
    raise error(str(e)) from None
  steps_per_epoch = -(-num_examples // batch_size)
  optimizer = ml_collections.ConfigDict(config.optimizer.to_dict())
  optimizer.learning_rate = float(learning_rate)
  optimizer.decay_steps = optimizer.decay_steps or config.train.epochs * steps_per_epoch
  try:
    run = driver.Run.create(config.mesh, optimizer, model_config, jax.local_devices())
  except ValueError as e:
    raise error(str(e)) from None
  return Plan(run, batch_size, layout['accum'], config.train.epochs, steps_per_epoch,
              optimizer)


@dataclasses.dataclass(frozen=True)
class Scored:
  """One epoch's dev scores, as a task computes them."""
  score: float                 # the selection score: the best epoch has the highest
  results: Dict[str, Any]      # what the history and the summary keep
  loss: float                  # the dev loss
  record: Dict[str, Any]       # the eval line of metrics.jsonl
  metadata: Dict[str, Any]     # the best checkpoint's metadata (besides epoch)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A finished run: its best epoch (epoch, step, score, results, path: the checkpoint,
  relative to the run's directory), every epoch's scores, the best epoch's parameters
  (host arrays, read back from its checkpoint) and what the task made of them."""
  best: Dict[str, Any]
  history: List[Dict[str, Any]]
  params: Any
  rescored: Any


def train(plan: Plan, *, params: Any, seed: int, run_dir: str,
          log: writer_lib.RunLog, settings: Dict[str, Any], resume: bool,
          error: Callable[[str], Exception], train_config, loss_fn: Callable, count_fn: Callable,
          predict_fn: Callable, batches: Callable[[int], Iterator],
          score: Callable[[int, Callable, Any], Scored],
          rescore_best: Callable[[Callable, Any], Any],
          extra_report: Optional[Callable] = None) -> Outcome:
  """Trains ``params`` as ``plan`` says, scoring dev after each epoch.

  Writes under ``run_dir``: the best epoch's checkpoint (``checkpoint/``), a resume
  checkpoint after every epoch and every ``train_config.checkpoint_every`` steps
  (``resume/``, removed at the end) and ``metrics.jsonl``. With ``resume`` a run continues
  from the resume checkpoint an interrupted one left, if it was written with the same
  ``settings`` (else ``error``). The task's parts:

  - ``loss_fn``, ``count_fn``: the training loss (``perceiver.training.step``);
    ``predict_fn``: the model's outputs, for ``step.make_predict_step``;
  - ``batches(start_step)``: the training batches from that step on, with their positions;
  - ``score(epoch, predict_step, params)``: an epoch's dev ``Scored``;
  - ``rescore_best(predict_step, params)``: what the task writes from the best epoch (its
    parameters read back from the checkpoint and placed on the mesh), before the resume
    checkpoint is removed; its result is ``Outcome.rescored``;
  - ``extra_report(step, report, window)``: log fields beside the epoch.

  Raises:
    Stopped: a signal stopped the run (its state is saved).
  """
  run, steps_per_epoch, total = plan.run, plan.steps_per_epoch, plan.total_steps
  rng = jax.random.PRNGKey(seed + 1)
  shapes = jax.eval_shape(step_lib.new_state_fn(lambda: params, run.optimizer, rng))
  shardings = mesh_lib.state_shardings(run.mesh, shapes)
  driver.check_checkpoint_room(run_dir, shapes, f'--workdir ({run_dir})')
  best_manager = run_checkpoints.CheckpointManager(os.path.join(run_dir, 'checkpoint'), keep=1)
  resume_manager = run_checkpoints.CheckpointManager(os.path.join(run_dir, 'resume'), keep=1)
  start_step, history, best = 0, [], None
  restored = run.restore(resume_manager, shapes, note=log.note) if resume else None
  if restored:
    if restored.metadata.get('settings') != settings:
      raise error(f'{restored.path} was written by a run with other settings; pass '
                  '--noresume to start over, or use another --workdir')
    start_step = restored.step
    history, best = restored.metadata['history'], restored.metadata['best']
    log.note(f'  resuming from {restored.path} at step {start_step} (epoch '
             f'{start_step // steps_per_epoch} of {plan.epochs} done)')
    state = run.place(restored, shardings)
  else:
    state = step_lib.state_from_params(params, run.optimizer, rng, shardings)
  predict_step = step_lib.make_predict_step(predict_fn, run.mesh, shardings.params)
  writer = writer_lib.MetricWriter(run_dir, total, stream=log, resume_step=start_step)

  def evaluate(step, state):
    nonlocal best
    epoch = step // steps_per_epoch
    scored = score(epoch, predict_step, state.params)
    writer.write(step, scored.record, kind='eval')
    history.append({'epoch': epoch, 'step': step, 'dev_loss': scored.loss,
                    'score': scored.score, 'results': scored.results})
    if best is None or scored.score > best['score']:
      path = best_manager.save(step, state.params, run.model_config,
                               epoch=epoch, **scored.metadata)
      best = {'epoch': epoch, 'step': step, 'score': scored.score,
              'results': scored.results, 'path': os.path.relpath(path, run_dir)}
      writer.note(f'  epoch {epoch}: new best dev score {scored.score:.4f}; saved {path}')

  def save(step, state, data_position):
    del data_position   # the step is the position (seeded_epochs)
    resume_manager.save(step, state.params, run.model_config, opt_state=state.opt_state,
                        rng=state.rng, history=history, best=best, settings=settings)

  def report(step, report, window):
    return {'epoch': -(-step // steps_per_epoch),
            **(extra_report(step, report, window) if extra_report else {})}

  result = run.train(
      loss_fn, count_fn, state, shardings, batches(start_step), accum_steps=plan.accum_steps,
      prefetch=2, start_step=start_step, stop_timeout_s=train_config.stop_timeout_s,
      note=log.note,
      on_non_finite=lambda e: error(
          f'{e}; the last epoch\'s state is in {resume_manager.directory}'),
      total_steps=total, writer=writer, log_every=train_config.log_every,
      extra_report=report, eval_every=steps_per_epoch, eval_at_end=True,
      evaluate=evaluate, checkpoint_every=train_config.checkpoint_every or steps_per_epoch,
      save=save, checkpoints=[best_manager, resume_manager])
  if result.stopped:
    raise Stopped(f'stopped at step {result.step} of {total} in {run_dir}; rerun the same '
                  'command to resume')

  placed = best_manager.restore(os.path.join(run_dir, best['path']),
                                shapes._replace(opt_state=None), shardings).params
  rescored = rescore_best(predict_step, placed)
  shutil.rmtree(resume_manager.directory, ignore_errors=True)
  return Outcome(best, history, mesh_lib.to_host(placed), rescored)
