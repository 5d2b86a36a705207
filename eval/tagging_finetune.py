"""One tagging run on the shared run driver, as ``eval.glue_finetune`` does it.

``finetune`` builds the token classifier (``perceiver.transfer``) and runs it on
``perceiver.training.driver.Run`` (the device mesh, optimizer, steps and loop) over seeded
epochs of windows
(``eval.tagging_inputs``), scoring dev after every epoch (``eval.tagging_task``),
keeping the best epoch's checkpoint and saving a resume checkpoint per epoch. Only the
set-up below is tagging's own; the loop, steps, checkpoints and logs are shared.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, List

import jax
import ml_collections

from eval import glue_io
from eval import tagging_data
from eval import tagging_inputs
from eval import tagging_task
from perceiver import errors
from perceiver import transfer
from perceiver import transform
from perceiver.training import run_checkpoints
from perceiver.training import driver
from perceiver.training import hosts
from perceiver.training import step as step_lib
from perceiver.training import writer as writer_lib


class TaggingError(errors.UserError, RuntimeError):
  """The run cannot start or go on (bad settings, existing outputs, non-finite loss)."""


class Stopped(Exception):
  """A signal stopped the run after saving it; rerunning resumes it."""


def _optimizer_config(config, total_steps: int):
  opt = ml_collections.ConfigDict(config.optimizer.to_dict())
  opt.decay_steps = opt.decay_steps or total_steps
  return opt


def _settings(config, labels) -> Dict[str, Any]:
  """What a resumed run must share with the run it continues."""
  return {'config': json.loads(config.to_json()), 'labels': list(labels)}


def evaluate_split(predict_step, params, enc, labels, metric, eval_batch, mesh):
  """(scores, mean loss, predicted tags per sentence) of one encoded split."""
  logits = tagging_inputs.predict(predict_step, params, enc, eval_batch, mesh)
  pred = tagging_task.predicted_tags(logits, enc, labels)
  result = tagging_task.scores(tagging_task.gold_tags(enc), pred, metric)
  return result, tagging_task.dev_loss(logits, enc), pred


def finetune(data: Dict[str, tagging_data.EncodedSplit], labels: List[str],
             trunk: transfer.Trunk, config, run_dir: str, log: writer_lib.RunLog, *,
             metric: str, resume: bool = True) -> Dict[str, Any]:
  """Trains on ``data['train']``, scoring ``data['dev']`` after every epoch; writes the
  best epoch's checkpoint, predictions and table under ``run_dir``; returns the summary
  (what ``dev_metrics.json`` holds).

  Raises:
    Stopped: a signal stopped the run (its state is saved).
  """
  start_time = time.time()
  train, batch_size = data['train'], config.train.batch_size
  try:
    layout = hosts.batch_layout(batch_size, config.train.grad_accum_steps,
                                'train.batch_size', 'train.grad_accum_steps')
  except ValueError as e:
    raise TaggingError(str(e)) from None
  steps_per_epoch = tagging_inputs.steps_per_epoch(train, batch_size)
  total = config.train.epochs * steps_per_epoch
  opt_config = _optimizer_config(config, total)
  try:
    run = driver.Run.create(config.mesh, opt_config, jax.local_devices())
  except ValueError as e:
    raise TaggingError(str(e)) from None
  mesh = run.mesh
  devices = mesh.devices.size
  eval_batch = tagging_data.round_up(config.eval.batch_size, devices)
  model = transform.token_classifier(trunk.model_config, len(labels), platform=run.platform)
  params = transfer.classifier_params(model, trunk, config.seed, train.length, log.note)
  log.note(f'  {len(train)} train windows ({train.num_words} words), batch {batch_size} '
           f'({devices} device(s) x {layout["accum"]} accumulation step(s)), '
           f'{steps_per_epoch} steps/epoch x {config.train.epochs} epochs = {total} steps; '
           f'learning rate {opt_config.learning_rate:g} ({opt_config.name}, warm-up '
           f'{opt_config.warmup_steps}, {opt_config.decay} decay to step '
           f'{opt_config.decay_steps})')
  rng = jax.random.PRNGKey(config.seed + 1)
  shapes = jax.eval_shape(step_lib.new_state_fn(lambda: params, run.optimizer, rng))
  shardings = run.shardings(shapes)
  driver.check_checkpoint_room(run_dir, shapes, f'--workdir ({run_dir})')
  best_manager = run_checkpoints.CheckpointManager(os.path.join(run_dir, 'checkpoint'), keep=1)
  resume_manager = run_checkpoints.CheckpointManager(os.path.join(run_dir, 'resume'), keep=1)
  settings = _settings(config, labels)
  start_step, history, best = 0, [], None
  restored = run.restore(resume_manager, shapes, note=log.note) if resume else None
  if restored:
    if restored.metadata.get('settings') != settings:
      raise TaggingError(f'{restored.path} was written by a run with other settings; pass '
                         '--noresume to start over, or use another --workdir')
    start_step = restored.step
    history, best = restored.metadata['history'], restored.metadata['best']
    log.note(f'  resuming from {restored.path} at step {start_step} (epoch '
             f'{start_step // steps_per_epoch} of {config.train.epochs} done)')
    state = run.place(restored, shardings)
  else:
    state = step_lib.state_from_params(params, run.optimizer, rng, shardings)
  predict_step = step_lib.make_predict_step(tagging_task.make_predict_fn(model), mesh,
                                            shardings.params)
  writer = writer_lib.MetricWriter(run_dir, total, stream=log, resume_step=start_step)

  def evaluate(step, state):
    nonlocal best
    epoch = step // steps_per_epoch
    result, loss, _ = evaluate_split(predict_step, state.params, data['dev'], labels,
                                     metric, eval_batch, mesh)
    writer.write(step, tagging_task.eval_record(epoch, result, loss), kind='eval')
    history.append({'epoch': epoch, 'step': step, 'dev_loss': loss, 'score': result['main'],
                    'results': result})
    if best is None or result['main'] > best['score']:
      path = best_manager.save(step, state.params, trunk.model_config,
                               token_labels=list(labels), epoch=epoch, metric=metric,
                               init=trunk.source, tagging_config=config.to_json())
      best = {'epoch': epoch, 'step': step, 'score': result['main'], 'results': result,
              'path': os.path.relpath(path, run_dir)}
      writer.note(f'  epoch {epoch}: new best dev score {result["main"]:.4f}; saved {path}')

  def save(step, state, data_position):
    del data_position   # the step is the position (tagging_inputs.train_batches)
    resume_manager.save(step, state.params, trunk.model_config, opt_state=state.opt_state,
                        rng=state.rng, history=history, best=best, settings=settings)

  def extra_report(step, report, window):
    del report, window
    return {'epoch': -(-step // steps_per_epoch)}

  result = run.train(
      tagging_task.make_loss_fn(model), tagging_task.count_fn, state, shardings,
      tagging_inputs.train_batches(train, batch_size, config.seed, start_step),
      accum_steps=layout['accum'], prefetch=2, start_step=start_step,
      stop_timeout_s=config.train.stop_timeout_s, note=log.note,
      on_non_finite=lambda e: TaggingError(
          f'{e}; the last epoch\'s state is in {resume_manager.directory}'),
      total_steps=total, writer=writer, log_every=config.train.log_every,
      extra_report=extra_report, eval_every=steps_per_epoch, eval_at_end=True,
      evaluate=evaluate, checkpoint_every=config.train.checkpoint_every or steps_per_epoch,
      save=save, checkpoints=[best_manager, resume_manager])
  if result.stopped:
    raise Stopped(f'stopped at step {result.step} of {total} in {run_dir}; rerun the same '
                  'command to resume')

  placed = best_manager.restore(os.path.join(run_dir, best['path']),
                                shapes._replace(opt_state=None), shardings).params
  outputs = {}
  for name in [n for n in ('dev', 'test') if n in data]:
    scored, loss, pred = evaluate_split(predict_step, placed, data[name], labels, metric,
                                        eval_batch, mesh)
    tagging_task.write_predictions(os.path.join(run_dir, f'{name}_predictions.txt'),
                                   data[name].sentences, pred)
    outputs[name] = dict(scored, loss=loss)
    if 'per_type' in scored:
      glue_io.write_text_atomic(os.path.join(run_dir, f'{name}_entity_table.txt'),
                              tagging_task.type_table(scored) + '\n')
  shutil.rmtree(resume_manager.directory, ignore_errors=True)
  return {
      'results': outputs['dev'], 'test_results': outputs.get('test'), 'metric': metric,
      'main_score': best['score'], 'best_epoch': best['epoch'], 'best_step': best['step'],
      'checkpoint': best['path'], 'epochs': history, 'labels': list(labels),
      'batch_size': batch_size, 'learning_rate': float(opt_config.learning_rate),
      'total_steps': total,
      'num_sentences': {n: len(enc.sentences) for n, enc in data.items()},
      'num_words': {n: enc.num_words for n, enc in data.items()},
      'num_windows': {n: len(enc) for n, enc in data.items()},
      'num_split_sentences': {n: enc.num_split_sentences for n, enc in data.items()},
      'num_cut_words': {n: enc.num_cut_words for n, enc in data.items()},
      'padded_length': {n: enc.length for n, enc in data.items()},
      'init': trunk.source, 'devices': devices, 'run_time_s': time.time() - start_time,
  }

