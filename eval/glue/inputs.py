"""GLUE splits as model inputs: encoded once as compact arrays, then batched.

Each split is read (``eval.glue.data``), encoded to byte ids (a pair is ``a SEP b``, the
longer segment cut first), and padded to its own longest example rounded up to
``data.length_multiple`` bytes, so the train step and each split's predict step compile
once. ``host_batch`` makes the batch of any rows of a split, for the seeded training
epochs and the in-order prediction of ``perceiver.training.epochs``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

import numpy as np

from eval.glue import data as glue_data
from perceiver.training.mesh import round_up

# The batch fields the classifier reads (the others are its targets).
MODEL_INPUTS = ('input_ids', 'input_mask')


@dataclasses.dataclass
class EncodedSplit:
  """One split's model inputs, padded to the split's own length.

  Attributes:
    name: 'train', 'dev', 'dev_matched', 'test', 'diagnostic', ...
    path: the file it was read from.
    indices: each example's index as the file gives it (``Example.index``).
    input_ids: int16 [n, length] byte ids, 0 (PAD) after the end.
    input_mask: int8 [n, length], 1 on real bytes.
    labels: int32 label ids, float32 STS-B scores, or None (test).
    num_truncated: examples cut to ``max_seq_len``.
  """
  name: str
  path: str
  indices: List[str]
  input_ids: np.ndarray
  input_mask: np.ndarray
  labels: Optional[np.ndarray]
  num_truncated: int

  def __len__(self):
    return len(self.indices)

  @property
  def length(self) -> int:
    return self.input_ids.shape[1]


def encode_split(task: glue_data.Task, split: glue_data.Split, name: str, max_seq_len: int,
                 length_multiple: int = 32, chunk: int = 8192) -> EncodedSplit:
  """Encodes a split ``chunk`` examples at a time (never all at ``max_seq_len``).

  The result is padded to the longest encoded example rounded up to ``length_multiple``
  and capped at ``max_seq_len``.
  """
  examples = split.examples
  if not examples:
    raise glue_data.GlueDataError(f'{split.path}: no examples')
  pieces, truncated, longest = [], 0, 1
  for start in range(0, len(examples), chunk):
    enc = glue_data.encode(examples[start:start + chunk], task, max_seq_len)
    used = int(enc.input_mask.sum(axis=1).max())
    keep = min(round_up(max(used, 1), length_multiple), max_seq_len)
    pieces.append((enc.input_ids[:, :keep].astype(np.int16),
                   enc.input_mask[:, :keep].astype(np.int8), enc.labels))
    truncated += enc.num_truncated
    longest = max(longest, used)
  length = min(round_up(longest, length_multiple), max_seq_len)
  ids = np.zeros((len(examples), length), np.int16)
  mask = np.zeros((len(examples), length), np.int8)
  row = 0
  for piece_ids, piece_mask, _ in pieces:
    ids[row:row + len(piece_ids), :piece_ids.shape[1]] = piece_ids
    mask[row:row + len(piece_ids), :piece_ids.shape[1]] = piece_mask
    row += len(piece_ids)
  labels = None if pieces[0][2] is None else np.concatenate([p[2] for p in pieces])
  return EncodedSplit(name, split.path, [e.index for e in examples], ids, mask, labels,
                      truncated)


def split_names(task: glue_data.Task, data_dir: str, with_test: bool, log):
  names = ['train', *task.dev_splits]
  if with_test:
    names += list(task.test_splits)
    if 'diagnostic' in [s.name for s in task.splits]:
      layout = task.layout('diagnostic')
      if os.path.isfile(os.path.join(data_dir, layout.path)):
        names.append('diagnostic')
      else:
        log.warn(f'{os.path.join(data_dir, layout.path)} not found: {layout.submission} '
                 '(the diagnostic set, predicted with the MNLI model) is not written')
  return names


def load_task_data(task: glue_data.Task, data_dir: str, config, max_seq_len: int, *,
                   with_test: bool, log) -> Dict[str, EncodedSplit]:
  """Reads and encodes train, the dev split(s), and with ``with_test`` the test split(s)."""
  data = {}
  for name in split_names(task, data_dir, with_test, log):
    split = glue_data.load_split(data_dir, task, name)
    log.note(f'  {split.summary()}')
    cap = config.data.max_train_examples
    if name == 'train' and 0 < cap < len(split.examples):
      keep = np.sort(np.random.default_rng(config.seed).choice(len(split.examples), cap,
                                                               replace=False))
      log.note(f'  train: a random {cap} of its {len(split.examples)} examples '
               '(data.max_train_examples)')
      split = dataclasses.replace(split, examples=[split.examples[i] for i in keep])
    enc = encode_split(task, split, name, max_seq_len, config.data.length_multiple,
                       config.data.encode_chunk)
    log.note(f'  {name}: {len(enc)} examples, padded to {enc.length} bytes; '
             f'{enc.num_truncated} cut to max_seq_len={max_seq_len} bytes')
    data[name] = enc
  return data


def host_batch(split: EncodedSplit, rows: np.ndarray, size: int) -> Dict[str, np.ndarray]:
  """Rows of a split as a batch of ``size``, filled up with zero-weight padding rows."""
  n = len(rows)
  batch = {'input_ids': np.zeros((size, split.length), np.int32),
           'input_mask': np.zeros((size, split.length), np.int32),
           'weights': np.zeros((size,), np.float32)}
  batch['input_ids'][:n] = split.input_ids[rows]
  batch['input_mask'][:n] = split.input_mask[rows]
  batch['weights'][:n] = 1.0
  if split.labels is not None:
    batch['labels'] = np.zeros((size,), split.labels.dtype)
    batch['labels'][:n] = split.labels[rows]
  return batch
