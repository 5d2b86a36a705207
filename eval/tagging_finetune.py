"""One tagging run on the shared run driver, as ``eval.glue_finetune`` does it.

``finetune`` builds the token classifier (``perceiver.params.transfer``) on
``perceiver.training.driver.Run`` and hands it to ``perceiver.training.epochs.train``
(shared with GLUE: the epochs, the best and resume checkpoints, resuming, the loop) with
tagging's parts: seeded epochs of windows (``eval.tagging_inputs``), dev scored after
every epoch (``eval.tagging_task``), and the best epoch's predictions and entity tables
written at the end.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List


from eval import glue_io
from eval import tagging_data
from eval import tagging_inputs
from eval import tagging_task
from perceiver.command import errors
from perceiver.params import transfer
from perceiver import transform
from perceiver.training import epochs
from perceiver.training import writer as writer_lib


class TaggingError(errors.UserError, RuntimeError):
  """The run cannot start or go on (bad settings, existing outputs, non-finite loss)."""


Stopped = epochs.Stopped


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
  plan = epochs.plan(config, trunk.model_config, len(train), batch_size=batch_size,
                     learning_rate=config.optimizer.learning_rate, error=TaggingError)
  run, mesh, devices = plan.run, plan.run.mesh, plan.run.mesh.devices.size
  eval_batch = tagging_data.round_up(config.eval.batch_size, devices)
  model = run.build(transform.token_classifier, len(labels))
  params = transfer.classifier_params(model, trunk, config.seed, train.length, log.note)
  log.note(f'  {len(train)} train windows ({train.num_words} words), {plan.describe()}')

  def score(epoch, predict_step, params):
    result, loss, _ = evaluate_split(predict_step, params, data['dev'], labels, metric,
                                     eval_batch, mesh)
    return epochs.Scored(result['main'], result, loss,
                         tagging_task.eval_record(epoch, result, loss),
                         metadata=dict(token_labels=list(labels), metric=metric,
                                       init=trunk.source, tagging_config=config.to_json()))

  def write_predictions(predict_step, params):
    outputs = {}
    for name in [n for n in ('dev', 'test') if n in data]:
      scored, loss, pred = evaluate_split(predict_step, params, data[name], labels, metric,
                                          eval_batch, mesh)
      tagging_task.write_predictions(os.path.join(run_dir, f'{name}_predictions.txt'),
                                     data[name].sentences, pred)
      outputs[name] = dict(scored, loss=loss)
      if 'per_type' in scored:
        glue_io.write_text_atomic(os.path.join(run_dir, f'{name}_entity_table.txt'),
                                  tagging_task.type_table(scored) + '\n')
    return outputs

  outcome = epochs.train(
      plan, params=params, seed=config.seed, run_dir=run_dir, log=log,
      settings=_settings(config, labels), resume=resume, error=TaggingError,
      train_config=config.train,
      loss_fn=tagging_task.make_loss_fn(model), count_fn=tagging_task.count_fn,
      predict_fn=tagging_task.make_predict_fn(model),
      batches=lambda start: tagging_inputs.train_batches(train, batch_size, config.seed,
                                                         start),
      score=score, rescore_best=write_predictions)
  best, outputs = outcome.best, outcome.rescored
  return {
      'results': outputs['dev'], 'test_results': outputs.get('test'), 'metric': metric,
      'main_score': best['score'], 'best_epoch': best['epoch'], 'best_step': best['step'],
      'checkpoint': best['path'], 'epochs': outcome.history, 'labels': list(labels),
      'batch_size': batch_size, 'learning_rate': float(plan.optimizer.learning_rate),
      'total_steps': plan.total_steps,
      'num_sentences': {n: len(enc.sentences) for n, enc in data.items()},
      'num_words': {n: enc.num_words for n, enc in data.items()},
      'num_windows': {n: len(enc) for n, enc in data.items()},
      'num_split_sentences': {n: enc.num_split_sentences for n, enc in data.items()},
      'num_cut_words': {n: enc.num_cut_words for n, enc in data.items()},
      'padded_length': {n: enc.length for n, enc in data.items()},
      'init': trunk.source, 'devices': devices, 'run_time_s': time.time() - start_time,
  }

