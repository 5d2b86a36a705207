"""Tagging windows as batches: seeded training epochs, and prediction in order.

The same walk as ``eval.glue_inputs``: an epoch visits every window once in a seeded
order (``[seed, epoch]``), the last batch filled with zero-weight rows, and the position
is the step count alone, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np

from eval import tagging_data
from perceiver.training import epochs

MODEL_INPUTS = ('input_ids', 'input_mask', 'positions', 'slot_mask')


def host_batch(split: tagging_data.EncodedSplit, rows: np.ndarray, size: int
               ) -> Dict[str, np.ndarray]:
  """Windows ``rows`` of ``split`` as a batch of ``size`` (padding rows weigh 0)."""
  n = len(rows)
  batch = {
      'input_ids': np.zeros((size, split.length), np.int32),
      'input_mask': np.zeros((size, split.length), np.int32),
      'positions': np.zeros((size, split.positions.shape[1]), np.int32),
      'slot_mask': np.zeros((size, split.positions.shape[1]), np.int32),
      'labels': np.zeros((size, split.positions.shape[1]), np.int32),
      'weights': np.zeros((size, split.positions.shape[1]), np.float32),
  }
  batch['input_ids'][:n] = split.input_ids[rows]
  batch['input_mask'][:n] = split.input_mask[rows]
  batch['positions'][:n] = split.positions[rows]
  batch['slot_mask'][:n] = split.slot_mask[rows]
  batch['labels'][:n] = split.labels[rows]
  batch['weights'][:n] = split.weights[rows]
  return batch


def train_batches(split: tagging_data.EncodedSplit, batch_size: int, seed: int,
                  start_step: int = 0) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
  """Endless seeded epochs from step ``start_step`` on: (batch, steps done after it)
  (``perceiver.training.epochs.seeded_epochs``)."""
  return epochs.seeded_epochs(len(split), batch_size, seed, start_step,
                              lambda rows: host_batch(split, rows, batch_size))


def predict(predict_step, params, split: tagging_data.EncodedSplit, batch_size: int, mesh
            ) -> np.ndarray:
  """Logits [n, slots, num_labels] for every window of ``split`` (params on ``mesh``)."""
  return epochs.predict(predict_step, params, len(split), batch_size, mesh,
                        lambda rows: host_batch(split, rows, batch_size), MODEL_INPUTS)
