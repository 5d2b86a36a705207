"""A GLUE task as the fine-tuning skeleton runs it (``GlueTask``): what it optimises, how
its dev set is scored, and what its best epoch writes.

Loss: softmax cross-entropy over the labels, or squared error for STS-B (one output), as
sums over real examples (``perceiver.training.losses``). Predictions: the argmax label,
or the STS-B score. Dev scores are the task's official metrics (``eval.glue.metrics``),
computed from the predictions exactly as the prediction files write them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict

import jax.numpy as jnp
import numpy as np

from eval.glue import data as glue_data
from eval.glue import inputs as glue_inputs
from eval.glue import metrics as metrics_lib
from eval.glue import outputs as glue_outputs
from perceiver import transform
from perceiver.command import errors
from perceiver.training import epochs
from perceiver.training import losses


class GlueError(errors.UserError, RuntimeError):
  """The run cannot start or go on (bad settings, existing outputs, non-finite loss)."""


def make_loss_fn(model, regression: bool):
  """(params, rng, batch, is_training) -> (loss sum over real examples, metric sums)."""

  def loss_fn(params, rng, batch, is_training):
    out = model.apply(params, rng, batch['input_ids'], batch['input_mask'], is_training)
    if regression:
      return losses.squared_error(out[:, 0], batch['labels'], batch['weights'])
    return losses.softmax_cross_entropy(out, batch['labels'], batch['weights'])

  return loss_fn


def make_predict_fn(model):
  """(params, batch) -> float32 outputs [B, num_outputs] (logits, or the STS-B score)."""

  def predict_fn(params, batch):
    return model.apply(params, None, batch['input_ids'], batch['input_mask'],
                       False).astype(jnp.float32)

  return predict_fn


def as_written(task: glue_data.Task, values) -> np.ndarray:
  """Predictions or labels as the prediction files hold them: ids, or 3-decimal scores."""
  if task.is_regression:
    return np.asarray([float(t) for t in glue_outputs.format_predictions(task, values)])
  return np.asarray(values)


def predictions_from_outputs(task: glue_data.Task, outputs: np.ndarray) -> np.ndarray:
  """Label ids (argmax), or the STS-B score (unclipped)."""
  if task.is_regression:
    return outputs[:, 0].astype(np.float64)
  return np.argmax(outputs, axis=-1).astype(np.int64)


def dev_loss(task: glue_data.Task, outputs: np.ndarray, labels: np.ndarray) -> float:
  outputs = outputs.astype(np.float64)
  if task.is_regression:
    return float(np.mean((outputs[:, 0] - labels) ** 2))
  top = outputs.max(axis=-1, keepdims=True)
  logz = np.log(np.exp(outputs - top).sum(axis=-1)) + top[:, 0]
  return float(np.mean(logz - outputs[np.arange(len(labels)), labels]))


def selection_score(task: glue_data.Task, results: Dict[str, Dict[str, float]]) -> float:
  """The main score (MNLI: the mean of -m and -mm) that picks the best epoch and point."""
  keys = [task.result_key(split) for split in task.dev_splits]
  return float(np.mean([metrics_lib.main_score(key, results[key]) for key in keys]))


def evaluate(task, data, predict: Callable[[glue_inputs.EncodedSplit], np.ndarray]):
  """(results by result key, dev loss, predictions by split, labels by split) of the
  model whose outputs ``predict`` gives."""
  results, losses, preds, golds = {}, [], {}, {}
  for split in task.dev_splits:
    enc = data[split]
    outputs = predict(enc)
    preds[split] = predictions_from_outputs(task, outputs)
    golds[split] = enc.labels
    results[task.result_key(split)] = metrics_lib.task_metrics(
        task.result_key(split), as_written(task, preds[split]), as_written(task, enc.labels))
    losses.append(dev_loss(task, outputs, enc.labels))
  return results, float(np.mean(losses)), preds, golds


def eval_record(epoch, results, loss, score) -> Dict[str, Any]:
  record = {'epoch': epoch, 'loss': loss, 'score': score}
  for key, values in results.items():
    record.update({f'{key}/{name}': value for name, value in values.items()})
  return record


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task's run (``eval.finetune.Task``): its encoded splits, where its outputs
  go, and what its checkpoint's metadata names (the trunk's source, the config)."""
  task: glue_data.Task
  data: Dict[str, glue_inputs.EncodedSplit]
  run_dir: str
  init: str
  config_json: str
  max_seq_len: int
  error = GlueError
  model_inputs = glue_inputs.MODEL_INPUTS
  head = staticmethod(transform.classifier)
  host_batch = staticmethod(glue_inputs.host_batch)
  predict_fn = staticmethod(make_predict_fn)

  @property
  def num_outputs(self) -> int:
    return self.task.num_outputs

  def loss_fn(self, model):
    return make_loss_fn(model, self.task.is_regression)

  def describe_train(self) -> str:
    return f'{len(self.data["train"])} train examples'

  def score(self, epoch, predict) -> epochs.Scored:
    results, loss, _, _ = evaluate(self.task, self.data, predict)
    selection = selection_score(self.task, results)
    record = eval_record(epoch, results, loss, selection)
    return epochs.Scored(selection, results, loss, record,
                         metadata=dict(task=self.task.name, labels=list(self.task.labels),
                                       num_outputs=self.task.num_outputs, dev_results=results,
                                       init=self.init, glue_config=self.config_json))

  def write_best(self, predict) -> None:
    """The dev predictions of the best epoch (``<split>_predictions.tsv``)."""
    _, _, preds, golds = evaluate(self.task, self.data, predict)
    for split in self.task.dev_splits:
      glue_outputs.write_dev_predictions(
          os.path.join(self.run_dir, f'{split}_predictions.tsv'), self.task,
          self.data[split].indices, preds[split], golds[split])

  def train_fields(self, report, window) -> Dict[str, float]:
    return {'examples_per_s': window.sums.get('count', 0.0) / max(
        report['step_time_s'] * window.steps, 1e-9)}

  def summary_fields(self, best, written) -> Dict[str, Any]:
    del written
    data = self.data
    return {'task': self.task.name, 'results': best['results'],
            'num_examples': {name: len(enc) for name, enc in data.items()},
            'num_truncated': {name: enc.num_truncated for name, enc in data.items()},
            'padded_length': {name: enc.length for name, enc in data.items()},
            'max_seq_len': self.max_seq_len}
