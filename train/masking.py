"""Whole-word masking on bytes, as the paper describes it for MLM pretraining.

Each whitespace-delimited word is masked independently with probability ``mask_prob``;
all of its bytes are masked. Choices made here (the paper is silent on them):

- ``include_leading_space`` (default True): a word's mask also covers the whitespace
  before it. DeepMind's colab notes the model fills a masked span much better when it
  starts with a space, which suggests its training spans did.
- ``bert_replacement`` (default False): BERT's 80/10/10 rule per masked word (80% of
  masked words become MASK ids, 10% random bytes, 10% unchanged). The paper does not
  mention it. Random bytes are real byte ids (6..261), never special ids.
- Special ids (padding, separators) are never masked and delimit words.
- ``unit`` (default ``'word'``, the paper's): ``'byte'`` masks single bytes instead, each
  independently with probability ``mask_prob`` (whitespace included), BERT's rule on a
  byte vocabulary. This project's option, for CPU-sized runs: see train/LEARNING.md.

The loss and accuracy count masked positions only (``weights``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

from perceiver.model import tokenizer as tokenizer_lib

_WHITESPACE = np.zeros(tokenizer_lib.VOCAB_SIZE, bool)
_WHITESPACE[[ord(c) + tokenizer_lib.NUM_SPECIAL for c in ' \t\n\r\x0b\x0c']] = True
# Per id: 0 special, 1 whitespace, 2 any other byte.
_CLASS = np.where(_WHITESPACE, 1, 2).astype(np.uint8)
_CLASS[:tokenizer_lib.NUM_SPECIAL] = 0
# Indexed by 3 * (left neighbour's class) + (this position's class):
# a word's first byte (not after another word byte);
_WORD_START = np.array([0, 0, 1,  0, 0, 1,  0, 0, 0], np.uint8)
# a unit's first position when whitespace joins the next word: a whitespace run's first
# byte, or a word's first byte with no whitespace before it.
_START_WITH_SPACE = np.array([0, 1, 1,  0, 0, 0,  0, 1, 0], np.uint8)


def default_max_predictions(seq_len: int, mask_prob: float) -> int:
  """Room for twice the expected number of masked bytes (overflow is vanishingly rare)."""
  return max(1, math.ceil(2 * mask_prob * seq_len))


UNITS = ('word', 'byte')


class WordMasker:
  """Masks a batch of byte ids; call with (ids [B, T], input_mask [B, T], rng)."""

  def __init__(self, mask_prob: float = 0.15, include_leading_space: bool = True,
               bert_replacement: bool = False, max_predictions: Optional[int] = None,
               unit: str = 'word'):
    if not 0 < mask_prob < 1:
      raise ValueError(f'mask_prob must be in (0, 1), got {mask_prob}')
    if unit not in UNITS:
      raise ValueError(f'masking unit must be one of {", ".join(UNITS)}, got {unit!r}')
    self.unit = unit
    self.mask_prob = mask_prob
    self.include_leading_space = include_leading_space
    self.bert_replacement = bert_replacement
    self.max_predictions = max_predictions

  def word_ids(self, ids: np.ndarray) -> np.ndarray:
    """[B, T] -> [B, T] word index per position (-1 for bytes in no word).

    With ``unit='byte'`` every non-special byte is its own "word".
    """
    return self._units(ids)[0]

  def _units(self, ids: np.ndarray):
    """(``word_ids``, and per position the number of units started up to it, minus one:
    the word index before units without a word are dropped, so the rows of a piece
    number their words from that count at the piece's first row)."""
    special = ids < tokenizer_lib.NUM_SPECIAL
    if self.unit == 'byte':
      unit = np.cumsum(~special.reshape(-1)).reshape(ids.shape) - 1
      return np.where(special, -1, unit), unit
    # Each position's class (0 special, 1 whitespace, 2 other byte) and its left
    # neighbour's (0 at a row's start), combined into one code looked up in small tables:
    # a few passes over uint8 arrays instead of many over bool ones.
    cls = _CLASS.take(ids, mode='clip')
    prev = np.zeros_like(cls)
    prev[:, 1:] = cls[:, :-1]
    code = prev * 3 + cls
    if self.include_leading_space:
      # Whitespace joins the word that follows it: a unit starts at a whitespace run, or
      # at a word with no whitespace before it.
      start_table, member = _START_WITH_SPACE, cls > 0
    else:
      start_table, member = _WORD_START, cls == 2
    unit = np.cumsum(start_table.take(code).reshape(-1), dtype=np.int32
                     ).reshape(ids.shape) - 1
    # A unit interrupted by a special id (or a row boundary) does not continue past it
    # (the next member byte starts a unit). Whitespace with no word after it is in no
    # unit: a unit counts if a word starts in it.
    has_word = np.zeros(int(unit[-1, -1]) + 2 if unit.size else 1, bool)
    has_word[unit[_WORD_START.take(code).astype(bool)]] = True
    return np.where(member & has_word[unit], unit, -1), unit

  def __call__(self, ids: np.ndarray, input_mask: np.ndarray, rng) -> Dict[str, np.ndarray]:
    """Returns the masked batch.

    ``rng``: a ``np.random.Generator``, or a list of (rows, Generator) covering the batch
    in order -- a batch joined from pieces masked as each piece alone would be with its
    own generator (the pieces of several streams, ``train.data``), in one pass over the
    whole batch.

    Returns:
      dict with ``input_ids`` (masked), ``input_mask``, ``labels`` (the original ids),
      ``weights`` (1.0 at masked positions), and, if ``max_predictions`` is set,
      ``masked_positions``/``masked_labels``/``masked_weights`` [B, max_predictions] for
      decoding the masked positions only.
    """
    ids = np.asarray(ids, np.int32)
    pieces = [(len(ids), rng)] if isinstance(rng, np.random.Generator) else list(rng)
    if sum(rows for rows, _ in pieces) != len(ids):
      raise ValueError(f'the pieces\' rows {[rows for rows, _ in pieces]} do not add up to '
                       f'the batch\'s {len(ids)}')
    words, unit = self._units(ids)
    chosen, action = self._draws(pieces, words, unit)
    index = np.maximum(words, 0)
    masked = (words >= 0) & chosen[index]
    masked &= input_mask > 0
    if self.max_predictions is not None:
      masked = self._fit(masked, words)
    inputs = ids.copy()
    if self.bert_replacement:
      random_bytes = np.concatenate([
          generator.integers(tokenizer_lib.NUM_SPECIAL, tokenizer_lib.VOCAB_SIZE,
                             size=(rows,) + ids.shape[1:], dtype=np.int32)
          for rows, generator in pieces])
      action = action[index]
      inputs = np.where(masked & (action < 0.8), tokenizer_lib.MASK_ID, inputs)
      inputs = np.where(masked & (action >= 0.8) & (action < 0.9), random_bytes, inputs)
    else:
      inputs[masked] = tokenizer_lib.MASK_ID
    batch = {'input_ids': inputs,
             'input_mask': np.asarray(input_mask, np.int32),
             'labels': ids, 'weights': masked.astype(np.float32)}
    if self.max_predictions is not None:
      batch.update(self._positions(masked, ids))
    return batch

  def _draws(self, pieces, words: np.ndarray, unit: np.ndarray):
    """(chosen, action): per word of the batch, whether it is masked and (BERT's rule,
    else None) its replacement draw, each from its own piece's generator. A piece alone
    numbers its words from 0; in the batch they are numbered from the units started
    before its first row, so its draws fill that range (plus one unused entry at the end,
    for a batch with no word)."""
    chosen, action, at, end = [], [], 0, 0
    for rows, generator in pieces:
      first = int(unit[end - 1, -1]) + 1 if end else 0
      end += rows
      count = max(int(words[end - rows:end].max(initial=-1)) + 1 - first, 0)
      chosen += [np.zeros(first - at, bool), generator.random(count) < self.mask_prob]
      if self.bert_replacement:   # one draw per word, after the piece's choices
        action += [np.zeros(first - at), generator.random(count)]
      at = first + count
    chosen = np.concatenate(chosen + [np.zeros(1, bool)])
    return chosen, (np.concatenate(action + [np.zeros(1)]) if action else None)

  def _fit(self, masked: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Unmasks whole words from the end of rows with more than max_predictions bytes."""
    for row in np.nonzero(masked.sum(1) > self.max_predictions)[0]:
      positions = np.nonzero(masked[row])[0]
      cut = positions[self.max_predictions]           # first position that does not fit
      masked[row] &= words[row] < words[row, cut]     # drop that word and every later one
    return masked

  def _positions(self, masked: np.ndarray, ids: np.ndarray) -> Dict[str, np.ndarray]:
    b, length = masked.shape[0], self.max_predictions
    positions = np.zeros((b, length), np.int32)
    weights = np.zeros((b, length), np.float32)
    for row in range(b):
      where = np.nonzero(masked[row])[0]
      positions[row, :len(where)] = where
      weights[row, :len(where)] = 1.0
    return {'masked_positions': positions,
            'masked_labels': np.take_along_axis(ids, positions, axis=1),
            'masked_weights': weights}


def context_free_baseline(counts) -> Dict[str, object]:
  """What a model that ignores context scores on masked bytes with these label counts
  ([vocab]): ``baseline_accuracy`` always predicts the most frequent one
  (``baseline_byte``); ``baseline_loss`` is the entropy (nats) of their own distribution,
  the best a constant distribution can do. Empty (no masked byte): {}."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total <= 0:
    return {}
  p = counts[counts > 0] / total
  best = int(np.argmax(counts))
  return {'baseline_accuracy': float(counts[best] / total),
          'baseline_loss': float(-(p * np.log(p)).sum()),
          'baseline_byte': tokenizer_lib.BytesTokenizer().to_bytes([best]).decode(
              'utf-8', errors='backslashreplace')}
