"""A tagging run as the fine-tuning skeleton runs it (``TaggingTask``): what the tagger
optimises, and how its predictions are scored and written.

Loss: softmax cross-entropy of each scored word's tag, read from the decoder's query at
the word's first byte, as a sum over scored words (``perceiver.training.losses``); the
step divides by their count. Prediction: the argmax tag per word.

Scores: for IOB tags (every tag ``O``, ``B-X`` or ``I-X``; NER, chunking) entity-level
precision, recall and F1 from ``seqeval`` in its default mode, which reads entities as
``conlleval`` does, so IOB1 (``I-X`` opens an entity, ``B-X`` only separates two
adjacent ones) and IOB2 (every entity opens with ``B-X``) are both handled; the main
score is the micro-averaged F1 (what the NER papers and transformers' examples report),
with a per-type table. Word accuracy is always reported; for other tags (POS) it is the
main score.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Sequence

import jax.numpy as jnp
import numpy as np
from seqeval import metrics as seqeval_metrics

from eval.tagging import data as tagging_data
from perceiver import transform
from perceiver.command import atomic
from perceiver.command import errors
from perceiver.training import epochs
from perceiver.training import losses

METRICS = ('auto', 'entity', 'accuracy')


class TaggingError(errors.UserError, RuntimeError):
  """The run cannot start or go on (bad settings, existing outputs, non-finite loss)."""


def is_iob(labels: Sequence[str]) -> bool:
  """Whether every tag is 'O', 'B-X' or 'I-X' (and at least one is not 'O')."""
  return (any(t != 'O' for t in labels) and
          all(t == 'O' or (t[:2] in ('B-', 'I-') and len(t) > 2) for t in labels))


def resolve_metric(metric: str, labels: Sequence[str]) -> str:
  """'entity' or 'accuracy' ('auto': entity F1 for IOB tags, accuracy otherwise)."""
  if metric not in METRICS:
    raise ValueError(f'eval.metric={metric!r}: expected one of {", ".join(METRICS)}')
  if metric == 'auto':
    return 'entity' if is_iob(labels) else 'accuracy'
  return metric


def scores(gold: List[List[str]], pred: List[List[str]], metric: str) -> Dict[str, Any]:
  """Word accuracy, and for ``metric='entity'`` seqeval's precision, recall, F1 (micro)
  and the per-type table; ``main`` is the F1 or the accuracy."""
  flat_gold = [t for s in gold for t in s]
  flat_pred = [t for s in pred for t in s]
  if len(flat_gold) != len(flat_pred):
    raise ValueError(f'{len(flat_pred)} predicted tags for {len(flat_gold)} words')
  correct = sum(g == p for g, p in zip(flat_gold, flat_pred))
  out: Dict[str, Any] = {'accuracy': correct / max(len(flat_gold), 1),
                         'num_words': len(flat_gold)}
  if metric == 'entity':
    report = seqeval_metrics.classification_report(gold, pred, output_dict=True,
                                                   zero_division=0)
    micro = report['micro avg']
    out.update(precision=float(micro['precision']), recall=float(micro['recall']),
               f1=float(micro['f1-score']))
    out['per_type'] = {
        name: {'precision': float(v['precision']), 'recall': float(v['recall']),
               'f1': float(v['f1-score']), 'support': int(v['support'])}
        for name, v in report.items() if not name.endswith(' avg')}
    out['main'] = out['f1']
  else:
    out['main'] = out['accuracy']
  return out


def dev_loss(logits: np.ndarray, enc: tagging_data.EncodedSplit) -> float:
  """Mean cross-entropy over the scored words (float64)."""
  logits = logits.astype(np.float64)
  top = logits.max(axis=-1, keepdims=True)
  logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
  label_logit = np.take_along_axis(logits, enc.labels[..., None].astype(np.int64), -1)[..., 0]
  return float(((logz - label_logit) * enc.weights).sum() / max(enc.weights.sum(), 1.0))


def predicted_tags(logits: np.ndarray, enc: tagging_data.EncodedSplit,
                   labels: Sequence[str]) -> List[List[str]]:
  """One predicted tag per word of each sentence, from the window that scores it."""
  ids = tagging_data.words_from_windows(enc, np.argmax(logits, axis=-1))
  return [[labels[i] for i in sentence] for sentence in ids]


def gold_tags(enc: tagging_data.EncodedSplit) -> List[List[str]]:
  return [list(s.tags) for s in enc.sentences]


def conll_text(sentences: Sequence[tagging_data.Sentence], pred: List[List[str]]) -> str:
  """``word gold predicted`` lines, a blank line after each sentence: conlleval's input.
  Whitespace inside a word (possible in CoNLL-U) is written as '_' so each line keeps
  three fields."""
  lines = []
  for sentence, tags in zip(sentences, pred):
    for word, gold, guess in zip(sentence.words, sentence.tags, tags):
      lines.append(f'{"_".join(word.split()) or "_"} {gold} {guess}')
    lines.append('')
  return '\n'.join(lines) + '\n'


def type_table(result: Dict[str, Any]) -> str:
  """The per-entity-type table (and the micro average) as aligned text."""
  rows = [('type', 'precision', 'recall', 'f1', 'support')]
  for name, v in sorted(result.get('per_type', {}).items()):
    rows.append((name, f'{100 * v["precision"]:.2f}', f'{100 * v["recall"]:.2f}',
                 f'{100 * v["f1"]:.2f}', str(v['support'])))
  if 'f1' in result:
    support = sum(v['support'] for v in result['per_type'].values())
    rows.append(('all', f'{100 * result["precision"]:.2f}', f'{100 * result["recall"]:.2f}',
                 f'{100 * result["f1"]:.2f}', str(support)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def write_predictions(path: str, sentences, pred) -> str:
  return atomic.write_text(path, conll_text(sentences, pred))


def eval_record(epoch: int, result: Dict[str, Any], loss: float) -> Dict[str, Any]:
  record = {'epoch': epoch, 'loss': loss, 'score': result['main'],
            'accuracy': result['accuracy']}
  for key in ('precision', 'recall', 'f1'):
    if key in result:
      record[key] = result[key]
  return record


@dataclasses.dataclass(frozen=True)
class TaggingTask:
  """A tagging run (``eval.finetune.Task``): its encoded splits (``train``, ``dev``, maybe
  ``test``), its tags and metric, where its outputs go, and what its checkpoint's
  metadata names (the trunk's source, the config)."""
  data: Dict[str, tagging_data.EncodedSplit]
  labels: List[str]
  metric: str
  run_dir: str
  init: str
  config_json: str
  error = TaggingError
  head = staticmethod(transform.token_classifier)
  # The batch fields the token classifier reads (the others are its targets).
  model_inputs = ('input_ids', 'input_mask', 'positions', 'slot_mask')

  @property
  def num_outputs(self) -> int:
    return len(self.labels)

  def loss_fn(self, model):
    """(params, rng, batch, is_training) -> (loss sum over scored words, metric sums)."""

    def loss_fn(params, rng, batch, is_training):
      logits = model.apply(params, rng, batch['input_ids'], batch['input_mask'], is_training,
                           batch['positions'], batch['slot_mask'])
      return losses.softmax_cross_entropy(logits, batch['labels'], batch['weights'])

    return loss_fn

  def predict_fn(self, model):
    """(params, batch) -> float32 logits [B, slots, num_labels] at the words' first bytes."""

    def predict_fn(params, batch):
      return model.apply(params, None, batch['input_ids'], batch['input_mask'], False,
                         batch['positions'], batch['slot_mask']).astype(jnp.float32)

    return predict_fn

  @staticmethod
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

  def describe_train(self) -> str:
    train = self.data['train']
    return f'{len(train)} train windows ({train.num_words} words)'

  def evaluate(self, name: str, predict):
    """(scores, mean loss, predicted tags per sentence) of the split ``name``."""
    enc = self.data[name]
    logits = predict(enc)
    pred = predicted_tags(logits, enc, self.labels)
    return scores(gold_tags(enc), pred, self.metric), dev_loss(logits, enc), pred

  def score(self, epoch, predict) -> epochs.Scored:
    result, loss, _ = self.evaluate('dev', predict)
    return epochs.Scored(result['main'], result, loss, eval_record(epoch, result, loss),
                         metadata=dict(token_labels=list(self.labels), metric=self.metric,
                                       init=self.init, tagging_config=self.config_json))

  def write_best(self, predict) -> Dict[str, Dict[str, Any]]:
    """The best epoch's predictions and entity tables of dev (and test); its scores."""
    written = {}
    for name in [n for n in ('dev', 'test') if n in self.data]:
      scored, loss, pred = self.evaluate(name, predict)
      write_predictions(os.path.join(self.run_dir, f'{name}_predictions.txt'),
                        self.data[name].sentences, pred)
      written[name] = dict(scored, loss=loss)
      if 'per_type' in scored:
        atomic.write_text(os.path.join(self.run_dir, f'{name}_entity_table.txt'),
                          type_table(scored) + '\n')
    return written

  def train_fields(self, report, window) -> Dict[str, Any]:
    del report, window
    return {}

  def summary_fields(self, best, written) -> Dict[str, Any]:
    del best
    data = self.data
    return {
        'results': written['dev'], 'test_results': written.get('test'),
        'metric': self.metric, 'labels': list(self.labels),
        'num_sentences': {n: len(enc.sentences) for n, enc in data.items()},
        'num_words': {n: enc.num_words for n, enc in data.items()},
        'num_windows': {n: len(enc) for n, enc in data.items()},
        'num_split_sentences': {n: enc.num_split_sentences for n, enc in data.items()},
        'num_cut_words': {n: enc.num_cut_words for n, enc in data.items()},
        'padded_length': {n: enc.length for n, enc in data.items()},
    }
