"""What GLUE fine-tuning optimises and how a task's dev set is scored.

Loss: softmax cross-entropy over the labels, or squared error for STS-B (one output), as
sums over real examples (``perceiver.training.losses``). Predictions: the argmax label,
or the STS-B score. Dev scores are the task's official metrics (``eval.metrics``),
computed from the predictions exactly as the prediction files write them.
"""

from __future__ import annotations

from typing import Any, Dict

import jax.numpy as jnp
import numpy as np

from eval import glue_data
from eval import glue_inputs
from eval import glue_io
from eval import metrics as metrics_lib
from perceiver.training import losses


def make_loss_fn(model, regression: bool):
  """(params, rng, batch, is_training) -> (loss sum over real examples, metric sums)."""

  def loss_fn(params, rng, batch, is_training):
    out = model.apply(params, rng, batch['input_ids'], batch['input_mask'], is_training)
    if regression:
      return losses.squared_error(out[:, 0], batch['labels'], batch['weights'])
    return losses.softmax_cross_entropy(out, batch['labels'], batch['weights'])

  return loss_fn


def count_fn(batch):
  return jnp.sum(batch['weights'])


def make_predict_fn(model):
  """(params, batch) -> float32 outputs [B, num_outputs] (logits, or the STS-B score)."""

  def predict_fn(params, batch):
    return model.apply(params, None, batch['input_ids'], batch['input_mask'],
                       False).astype(jnp.float32)

  return predict_fn


def as_written(task: glue_data.Task, values) -> np.ndarray:
  """Predictions or labels as the prediction files hold them: ids, or 3-decimal scores."""
  if task.is_regression:
    return np.asarray([float(t) for t in glue_io.format_predictions(task, values)])
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


def evaluate(task, data, predict_step, params, eval_batch, mesh):
  """(results by result key, dev loss, predictions by split, labels by split)."""
  results, losses, preds, golds = {}, [], {}, {}
  for split in task.dev_splits:
    enc = data[split]
    outputs = glue_inputs.predict(predict_step, params, enc, eval_batch, mesh)
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
