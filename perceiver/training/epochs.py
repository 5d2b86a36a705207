"""A fine-tuning run in epochs, scored on dev after each: what GLUE and tagging share.

Both fine-tuning commands (``eval.glue``, ``eval.tagging``) hand ``train`` one ``Task``:
the object that holds the task's own parts (its model's loss and outputs, its batches,
how it scores an epoch, ``Scored``, and what it writes from the best epoch). ``train``
runs the classifier on ``perceiver.training.driver.Run`` over seeded epochs, scores the
dev split after every epoch, keeps the best epoch's parameters as a checkpoint, saves a
resume checkpoint (parameters, optimizer state, the history so far, the run's settings)
that a rerun with the same settings continues from, and at the end reads the best epoch
back for the task to write its predictions. Beside it: ``plan`` (the run's driver, batch
layout and length), ``seeded_epochs`` and ``predict`` (the batches of any task's split),
``check_config`` (the settings both configs hold), ``finished_summary`` and
``remove_outputs`` (a finished run is reported, refused or retrained the same way).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
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
  eval_batch_size: int   # rows per predict call: a multiple of the devices
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
  """The run of ``config`` (a fine-tuning config: ``train``, ``eval``, ``optimizer``,
  ``mesh``) for ``num_examples`` training examples at ``batch_size`` and
  ``learning_rate``, on this host's devices, the model of ``model_config`` computing as
  they do best (``driver.Run.create``). The learning rate decays to the run's last step
  unless ``optimizer.decay_steps`` says otherwise; ``eval.batch_size`` is rounded up to a
  multiple of the devices. A batch or mesh that does not fit is
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
  devices = run.mesh.devices.size
  eval_batch_size = -(-config.eval.batch_size // devices) * devices
  return Plan(run, batch_size, layout['accum'], config.train.epochs, steps_per_epoch,
              eval_batch_size, optimizer)


@dataclasses.dataclass(frozen=True)
class Scored:
  """One epoch's dev scores, as a task computes them."""
  score: float                 # the selection score: the best epoch has the highest
  results: Dict[str, Any]      # what the history and the summary keep
  loss: float                  # the dev loss
  record: Dict[str, Any]       # the eval line of metrics.jsonl
  metadata: Dict[str, Any]     # the best checkpoint's metadata (besides epoch)


class Task(Protocol):
  """A fine-tuning task as ``train`` runs it: one object holding the task's own parts.

  ``error`` is the task's error class (its message names the field, file or flag);
  ``data`` its encoded splits by name, ``data['train']`` the one it trains on (``len``:
  its rows); ``model_inputs`` the batch fields its model reads. ``predict`` below is
  ``split -> outputs`` for every row of an encoded split, in order, with the parameters
  being scored.
  """
  error: Callable[[str], Exception]
  data: Dict[str, Any]
  model_inputs: Sequence[str]

  def loss_fn(self, model) -> Callable:
    """(params, rng, batch, is_training) -> (loss sum over real rows, metric sums)."""

  def predict_fn(self, model) -> Callable:
    """(params, batch) -> float32 outputs."""

  def host_batch(self, split, rows: np.ndarray, size: int) -> Dict[str, np.ndarray]:
    """Rows of ``split`` as a batch of ``size``, filled up with zero-weight rows."""

  def score(self, epoch: int, predict: Callable[[Any], np.ndarray]) -> Scored:
    """An epoch's dev scores."""

  def write_best(self, predict: Callable[[Any], np.ndarray]) -> Any:
    """What the task writes from the best epoch; ``Outcome.written``."""

  def train_fields(self, report: Dict[str, Any], window) -> Dict[str, Any]:
    """Log fields of a training report beside the epoch (``{}`` for none)."""


def count_weights(batch) -> jax.Array:
  """A batch's real rows (or words): its weights' sum, the loss's divisor."""
  return jnp.sum(batch['weights'])


def predictor(task: Task, predict_step: Callable, params: Any, batch_size: int, mesh
              ) -> Callable[[Any], np.ndarray]:
  """``split -> outputs`` of ``params`` (on ``mesh``) for every row of a split, in
  batches of ``batch_size`` (``predict``)."""
  return lambda split: predict(predict_step, params, len(split), batch_size, mesh,
                               lambda rows: task.host_batch(split, rows, batch_size),
                               task.model_inputs)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A finished run: its best epoch (epoch, step, score, results, path: the checkpoint,
  relative to the run's directory), every epoch's scores, the best epoch's parameters
  (host arrays, read back from its checkpoint) and what the task wrote from them."""
  best: Dict[str, Any]
  history: List[Dict[str, Any]]
  params: Any
  written: Any


def setting_differences(old: Any, new: Any, prefix: str = '') -> List[str]:
  """``field=old (now new)`` for each setting that differs between a saved run's
  ``settings`` and this one's; a config field is named as the user sets it (``mesh.fsdp``)."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new), key=str):
      name = f'{prefix}{key}' if prefix or key != 'config' else ''
      out += setting_differences(old.get(key), new.get(key), f'{name}.' if name else '')
    return out
  if old == new:
    return []
  if not prefix:   # a checkpoint's settings that are not a dict: none were saved
    return ['settings (none recorded)' if old is None else 'settings']
  return [f'{prefix.rstrip(".")}={old!r} (now {new!r})']


class _Epochs:
  """The run's bookkeeping between steps: each epoch's scores, the best one and its
  checkpoint, the resume checkpoint, and the epoch in the log lines."""

  def __init__(self, plan: Plan, task: Task, run_dir: str, settings: Dict[str, Any]):
    self.plan, self.task, self.run_dir, self.settings = plan, task, run_dir, settings
    self.best_manager = run_checkpoints.CheckpointManager(
        os.path.join(run_dir, 'checkpoint'), keep=1)
    self.resume_manager = run_checkpoints.CheckpointManager(
        os.path.join(run_dir, 'resume'), keep=1)
    self.history: List[Dict[str, Any]] = []
    self.best: Optional[Dict[str, Any]] = None
    self.predict_step: Optional[Callable] = None
    self.writer: Optional[writer_lib.MetricWriter] = None

  def restore(self, shapes, shardings, log) -> Optional[Tuple[Any, int]]:
    """(state, step) of the resume checkpoint an interrupted run left, or None; one
    written with other settings is refused, naming them."""
    restored = self.plan.run.restore(self.resume_manager, shapes, note=log.note)
    if not restored:
      return None
    saved = restored.metadata.get('settings')
    if saved != self.settings:
      differ = ', '.join(setting_differences(saved, self.settings)) or 'settings'
      raise self.task.error(f'{restored.path} was written by a run with other settings '
                            f'({differ}); pass --noresume to start over, or use another '
                            '--workdir')
    self.history, self.best = restored.metadata['history'], restored.metadata['best']
    log.note(f'  resuming from {restored.path} at step {restored.step} (epoch '
             f'{restored.step // self.plan.steps_per_epoch} of {self.plan.epochs} done)')
    return self.plan.run.place(restored, shardings), restored.step

  def predict(self, params) -> Callable[[Any], np.ndarray]:
    return predictor(self.task, self.predict_step, params, self.plan.eval_batch_size,
                     self.plan.run.mesh)

  def evaluate(self, step, state) -> None:
    epoch = step // self.plan.steps_per_epoch
    scored = self.task.score(epoch, self.predict(state.params))
    self.writer.write(step, scored.record, kind='eval')
    self.history.append({'epoch': epoch, 'step': step, 'dev_loss': scored.loss,
                         'score': scored.score, 'results': scored.results})
    if self.best is None or scored.score > self.best['score']:
      path = self.best_manager.save(step, state.params, self.plan.run.model_config,
                                    epoch=epoch, **scored.metadata)
      self.best = {'epoch': epoch, 'step': step, 'score': scored.score,
                   'results': scored.results, 'path': os.path.relpath(path, self.run_dir)}
      self.writer.note(f'  epoch {epoch}: new best dev score {scored.score:.4f}; saved {path}')

  def save(self, step, state, data_position) -> None:
    del data_position   # the step is the position (seeded_epochs)
    self.resume_manager.save(step, state.params, self.plan.run.model_config,
                             opt_state=state.opt_state, rng=state.rng, history=self.history,
                             best=self.best, settings=self.settings)

  def report(self, step, report, window) -> Dict[str, Any]:
    return {'epoch': -(-step // self.plan.steps_per_epoch),
            **self.task.train_fields(report, window)}

  def non_finite(self, error: Exception) -> Exception:
    return self.task.error(f'{error}; the last epoch\'s state is in '
                           f'{self.resume_manager.directory}')


def train(plan: Plan, task: Task, model: Any, *, params: Any, seed: int, run_dir: str,
          log: writer_lib.RunLog, settings: Dict[str, Any], resume: bool,
          train_config) -> Outcome:
  """Trains ``params`` of ``model`` on ``task`` as ``plan`` says, scoring dev after each
  epoch (``task.score``).

  Writes under ``run_dir``: the best epoch's checkpoint (``checkpoint/``), a resume
  checkpoint after every epoch and every ``train_config.checkpoint_every`` steps
  (``resume/``, removed at the end) and ``metrics.jsonl``. With ``resume`` a run continues
  from the resume checkpoint an interrupted one left, if it was written with the same
  ``settings`` (else ``task.error`` naming the ones that differ). At the end the best
  epoch's parameters are read back and ``task.write_best`` writes from them.

  Raises:
    Stopped: a signal stopped the run (its state is saved).
  """
  run, epochs_ = plan.run, _Epochs(plan, task, run_dir, settings)
  rng = jax.random.PRNGKey(seed + 1)
  shapes = jax.eval_shape(step_lib.new_state_fn(lambda: params, run.optimizer, rng))
  shardings = mesh_lib.state_shardings(run.mesh, shapes)
  driver.check_checkpoint_room(run_dir, shapes, f'--workdir ({run_dir})')
  restored = epochs_.restore(shapes, shardings, log) if resume else None
  state, start_step = restored or (
      step_lib.state_from_params(params, run.optimizer, rng, shardings), 0)
  epochs_.predict_step = step_lib.make_predict_step(task.predict_fn(model), run.mesh,
                                                    shardings.params)
  epochs_.writer = writer_lib.MetricWriter(run_dir, plan.total_steps, stream=log,
                                           resume_step=start_step)
  train_split = task.data['train']
  batches = seeded_epochs(len(train_split), plan.batch_size, seed, start_step,
                          lambda rows: task.host_batch(train_split, rows, plan.batch_size))
  result = run.train(
      task.loss_fn(model), count_weights, state, shardings, batches,
      accum_steps=plan.accum_steps, prefetch=2, start_step=start_step,
      stop_timeout_s=train_config.stop_timeout_s, note=log.note,
      on_non_finite=epochs_.non_finite, total_steps=plan.total_steps, writer=epochs_.writer,
      log_every=train_config.log_every, extra_report=epochs_.report,
      eval_every=plan.steps_per_epoch, eval_at_end=True, evaluate=epochs_.evaluate,
      checkpoint_every=train_config.checkpoint_every or plan.steps_per_epoch,
      save=epochs_.save, checkpoints=[epochs_.best_manager, epochs_.resume_manager])
  if result.stopped:
    raise Stopped(f'stopped at step {result.step} of {plan.total_steps} in {run_dir}; rerun '
                  'the same command to resume')
  placed = epochs_.best_manager.restore(os.path.join(run_dir, epochs_.best['path']),
                                        shapes._replace(opt_state=None), shardings).params
  written = task.write_best(epochs_.predict(placed))
  shutil.rmtree(epochs_.resume_manager.directory, ignore_errors=True)
  return Outcome(epochs_.best, epochs_.history, mesh_lib.to_host(placed), written)
