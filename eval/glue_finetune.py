"""One GLUE task fine-tuned: each run (grid point) handed to the shared training loop.

``finetune`` builds the classifier (``perceiver.params.transfer``) on the run driver and hands
it to ``perceiver.training.epochs.train`` (shared with tagging) with GLUE's parts: seeded
epochs of examples (``eval.glue_inputs``), the dev split(s) scored after every epoch
(``eval.glue_task``), and the best epoch's dev predictions written at the end.
``run_task`` runs one task: one point, or a sweep of them, then the test predictions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import jax

from eval import glue_data
from eval import glue_inputs
from eval import glue_io
from eval import glue_task
from perceiver.params import loading
from perceiver.command import errors
from perceiver.params import transfer
from perceiver import transform
from perceiver.model import layers
from perceiver.training import epochs
from perceiver.training import mesh as mesh_lib
from perceiver.training import step as step_lib
from perceiver.training import writer as writer_lib

SUBMISSION_DIR = 'submission'
FINISHED = epochs.FINISHED


class GlueError(errors.UserError, RuntimeError):
  """The run cannot start or go on (bad settings, existing outputs, non-finite loss)."""


Stopped = epochs.Stopped


# --------------------------------------------------------------------------------------
# One fine-tuning run (one grid point), handed to the shared loop.

@dataclasses.dataclass
class RunResult:
  """The best dev epoch of one run: where its files are, what ``dev_metrics.json`` holds,
  its selection score, and its parameters (host arrays)."""
  run_dir: str
  summary: Dict[str, Any]
  score: float
  params: Any


def _run_settings(config, batch_size, learning_rate) -> Dict[str, Any]:
  """What a resumed run must share with the run it continues."""
  return {'config': json.loads(config.to_json()), 'batch_size': int(batch_size),
          'learning_rate': float(learning_rate)}


def finetune(task: glue_data.Task, data: Dict[str, glue_inputs.EncodedSplit],
             trunk: transfer.Trunk, config, run_dir: str, log: writer_lib.RunLog, *,
             batch_size: int, learning_rate: float, batch_field: str = 'train.batch_size',
             resume: bool = True) -> RunResult:
  """Fine-tunes on ``data['train']``, evaluating the dev split(s) after every epoch.

  Writes the best epoch's checkpoint, its dev predictions and ``metrics.jsonl`` under
  ``run_dir``, and a resume checkpoint after every epoch (``resume``: continue from one
  left by an interrupted run). Returns the best epoch's summary.

  Raises:
    Stopped: a signal stopped the run (its state is saved).
  """
  start_time = time.time()
  train = data['train']
  plan = epochs.plan(config, trunk.model_config, len(train), batch_size=batch_size,
                     learning_rate=learning_rate, error=GlueError, batch_field=batch_field)
  run, mesh, devices = plan.run, plan.run.mesh, plan.run.mesh.devices.size
  eval_batch = glue_inputs.round_up(config.eval.batch_size, devices)
  model = run.build(transform.classifier, task.num_outputs)
  params = transfer.classifier_params(model, trunk, config.seed, train.length, log.note)
  log.note(f'  {len(train)} train examples, {plan.describe()}')

  def score(epoch, predict_step, params):
    results, loss, _, _ = glue_task.evaluate(task, data, predict_step, params, eval_batch,
                                             mesh)
    selection = glue_task.selection_score(task, results)
    return epochs.Scored(selection, results, loss,
                         glue_task.eval_record(epoch, results, loss, selection),
                         metadata=dict(task=task.name, labels=list(task.labels),
                                       num_outputs=task.num_outputs, dev_results=results,
                                       init=trunk.source, glue_config=config.to_json()))

  def write_predictions(predict_step, params):
    _, _, preds, golds = glue_task.evaluate(task, data, predict_step, params, eval_batch, mesh)
    for split in task.dev_splits:
      glue_io.write_dev_predictions(os.path.join(run_dir, f'{split}_predictions.tsv'), task,
                                    data[split].indices, preds[split], golds[split])

  def extra_report(step, report, window):
    del step
    return {'examples_per_s': window.sums.get('count', 0.0) / max(
        report['step_time_s'] * window.steps, 1e-9)}

  outcome = epochs.train(
      plan, params=params, seed=config.seed, run_dir=run_dir, log=log,
      settings=_run_settings(config, batch_size, learning_rate), resume=resume,
      error=GlueError, train_config=config.train,
      loss_fn=glue_task.make_loss_fn(model, task.is_regression), count_fn=glue_task.count_fn,
      predict_fn=glue_task.make_predict_fn(model),
      batches=lambda start: glue_inputs.train_batches(train, batch_size, config.seed, start),
      score=score, rescore_best=write_predictions, extra_report=extra_report)
  best = outcome.best
  summary = {
      'task': task.name, 'results': best['results'], 'main_score': best['score'],
      'best_epoch': best['epoch'], 'best_step': best['step'], 'checkpoint': best['path'],
      'epochs': outcome.history, 'batch_size': batch_size,
      'learning_rate': float(learning_rate), 'total_steps': plan.total_steps,
      'num_examples': {name: len(enc) for name, enc in data.items()},
      'num_truncated': {name: enc.num_truncated for name, enc in data.items()},
      'padded_length': {name: enc.length for name, enc in data.items()},
      'max_seq_len': resolve_max_seq_len(config, trunk.model_config),
      'init': trunk.source, 'devices': devices, 'run_time_s': time.time() - start_time,
  }
  return RunResult(run_dir, summary, best['score'], outcome.params)


def make_mesh(config):
  """This host's device mesh from ``config.mesh`` (a bad shape is an error naming it)."""
  try:
    return mesh_lib.make(config.mesh, jax.local_devices())
  except ValueError as e:
    raise GlueError(str(e)) from None


def resolve_max_seq_len(config, model_config) -> int:
  cap = config.data.max_seq_len or model_config.max_seq_len
  if not 1 < cap <= model_config.max_seq_len:
    raise GlueError(f'data.max_seq_len={config.data.max_seq_len} must be in '
                    f'[2, {model_config.max_seq_len}] (the model\'s max_seq_len), or 0')
  return cap


# --------------------------------------------------------------------------------------
# One task (one run, or a sweep), and all of them.

_OUTPUT_FILES = (FINISHED, 'metrics.jsonl', 'sweep.json', 'log.txt')


def clean_task_dir(task_dir: str) -> None:
  """Removes what an earlier (finished or interrupted) run of this command left in
  ``task_dir`` and in its grid points' folders: outputs, checkpoints and resume state;
  nothing else."""
  if not os.path.isdir(task_dir):
    return
  is_output = lambda name: name in _OUTPUT_FILES or name.endswith('_predictions.tsv')
  for name in os.listdir(task_dir):
    if name not in ('checkpoint', 'resume') and os.path.isdir(os.path.join(task_dir, name)):
      epochs.remove_outputs(os.path.join(task_dir, name), is_output)
  epochs.remove_outputs(task_dir, is_output)


def _point_name(batch_size: int, learning_rate: float) -> str:
  return f'bs{batch_size}_lr{learning_rate:g}'


def grid(config, sweep: bool):
  if not sweep:
    return [(config.train.batch_size, config.optimizer.learning_rate, 'train.batch_size')]
  points = [(int(b), float(lr), 'sweep.batch_sizes') for b in config.sweep.batch_sizes
            for lr in config.sweep.learning_rates]
  if not points:
    raise GlueError('--sweep: sweep.batch_sizes and sweep.learning_rates must not be empty')
  return points


def _predict_test(task, data, trunk, params, config, out_dir, log) -> List[str]:
  mesh = make_mesh(config)
  model = transform.classifier(trunk.model_config, task.num_outputs,
                               platform=layers.platform(mesh.devices.flat[0]))
  shardings = mesh_lib.state_shardings(mesh, params)
  predict_step = step_lib.make_predict_step(glue_task.make_predict_fn(model), mesh, shardings)
  placed = mesh_lib.place(params, shardings)
  eval_batch = glue_inputs.round_up(config.eval.batch_size, mesh.devices.size)
  written = []
  for split in list(task.test_splits) + (['diagnostic'] if 'diagnostic' in data else []):
    enc = data[split]
    outputs = glue_inputs.predict(predict_step, placed, enc, eval_batch, mesh)
    written.append(glue_io.write_submission(out_dir, task, split, enc.indices,
                                            glue_task.predictions_from_outputs(task, outputs)))
    log.note(f'  wrote {written[-1]} ({len(enc)} test predictions)')
  return written


def _adopt_best_point(task, task_dir: str, best: RunResult, points: List[dict],
                      log: writer_lib.RunLog) -> Dict[str, Any]:
  """Writes ``sweep.json`` and copies the best point's predictions and metrics.jsonl up."""
  point = os.path.basename(best.run_dir)
  summary = dict(best.summary, checkpoint=os.path.join(point, best.summary['checkpoint']),
                 sweep={'best': point, 'points': points})
  glue_io.write_json_atomic(os.path.join(task_dir, 'sweep.json'), summary['sweep'])
  names = [f'{split}_predictions.tsv' for split in task.dev_splits] + ['metrics.jsonl']
  for name in names:
    shutil.copyfile(os.path.join(best.run_dir, name), os.path.join(task_dir, name))
  log.note(f'  best grid point: {point} (dev score {best.score:.4f})')
  return summary


def _point(task, data, trunk, config, run_dir, log, batch_size, lr, field, resume):
  """One grid point of a sweep: a finished point's summary is read back, not rerun."""
  finished = os.path.join(run_dir, FINISHED)
  if resume and os.path.exists(finished):
    with open(finished, encoding='utf-8') as f:
      summary = json.load(f)
    params, _, _ = loading.load_any(os.path.join(run_dir, summary['checkpoint']))
    log.note(f'  {run_dir}: finished earlier (main score {summary["main_score"]:.4f})')
    return RunResult(run_dir, summary, summary['main_score'], params)
  if not resume:
    clean_task_dir(run_dir)
  result = finetune(task, data, trunk, config, run_dir, log, batch_size=batch_size,
                    learning_rate=lr, batch_field=field, resume=resume)
  glue_io.write_json_atomic(finished, result.summary)
  return result


def run_task(task_name: str, config, data_dir: str, workdir: str, trunk: transfer.Trunk, *,
             do_predict: bool = False, sweep: bool = False, resume: bool = True,
             log: Optional[writer_lib.RunLog] = None) -> Dict[str, Any]:
  """Fine-tunes and evaluates one task; returns its ``dev_metrics.json`` content."""
  log = log or writer_lib.RunLog()
  task = glue_data.get_task(task_name)
  task_dir = os.path.join(workdir, task.name)
  points = grid(config, sweep)
  if not resume:
    clean_task_dir(task_dir)
  start = time.time()
  with log.to_file(os.path.join(task_dir, 'log.txt'), mode='a'):
    max_seq_len = resolve_max_seq_len(config, trunk.model_config)
    kind = ('regression (mean squared error)' if task.is_regression else
            f'{task.num_outputs}-way classification ({", ".join(task.labels)})')
    log.note(f'== {task.name} ({task.directory}): {kind}; main metric {task.main_metric}')
    data = glue_inputs.load_task_data(task, data_dir, config, max_seq_len,
                                      with_test=do_predict, log=log)
    best, points_done = None, []
    for i, (batch_size, lr, field) in enumerate(points):
      if sweep:
        run_dir = os.path.join(task_dir, _point_name(batch_size, lr))
        log.note(f'-- {task.name}: grid point {i + 1}/{len(points)}: batch {batch_size}, '
                 f'learning rate {lr:g} -> {run_dir}')
        result = _point(task, data, trunk, config, run_dir, log, batch_size, lr, field,
                        resume)
        points_done.append({'batch_size': batch_size, 'learning_rate': lr,
                            'dir': os.path.basename(run_dir), 'main_score': result.score,
                            'results': result.summary['results']})
      else:
        result = finetune(task, data, trunk, config, task_dir, log, batch_size=batch_size,
                          learning_rate=lr, batch_field=field, resume=resume)
      if best is None or result.score > best.score:
        best = result
    summary = dict(best.summary)
    if sweep:
      summary = _adopt_best_point(task, task_dir, best, points_done, log)
    if do_predict:
      written = _predict_test(task, data, trunk, best.params, config,
                              os.path.join(workdir, SUBMISSION_DIR), log)
      summary['submission'] = [os.path.relpath(path, task_dir) for path in written]
    summary['wall_time_s'] = time.time() - start
    glue_io.write_json_atomic(os.path.join(task_dir, FINISHED), summary)
    scores = '; '.join(f'{key} ' + ', '.join(f'{name} {100 * value:.2f}'
                                             for name, value in values.items())
                       for key, values in summary['results'].items())
    log.note(f'== {task.name}: best epoch {summary["best_epoch"]}: {scores} '
             f'({summary["wall_time_s"]:.0f}s)')
  return summary
