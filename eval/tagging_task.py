"""What the tagger optimises and how its predictions are scored and written.

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

from typing import Any, Dict, List, Sequence

import jax.numpy as jnp
import numpy as np
from seqeval import metrics as seqeval_metrics

from eval import glue_io
from eval import tagging_data
from perceiver.training import losses

METRICS = ('auto', 'entity', 'accuracy')


def make_loss_fn(model):
  """(params, rng, batch, is_training) -> (loss sum over scored words, metric sums)."""

  def loss_fn(params, rng, batch, is_training):
    logits = model.apply(params, rng, batch['input_ids'], batch['input_mask'], is_training,
                         batch['positions'], batch['slot_mask'])
    return losses.softmax_cross_entropy(logits, batch['labels'], batch['weights'])

  return loss_fn


def count_fn(batch):
  return jnp.sum(batch['weights'])


def make_predict_fn(model):
  """(params, batch) -> float32 logits [B, slots, num_labels] at the words' first bytes."""

  def predict_fn(params, batch):
    return model.apply(params, None, batch['input_ids'], batch['input_mask'], False,
                       batch['positions'], batch['slot_mask']).astype(jnp.float32)

  return predict_fn


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
  return glue_io.write_text_atomic(path, conll_text(sentences, pred))


def eval_record(epoch: int, result: Dict[str, Any], loss: float) -> Dict[str, Any]:
  record = {'epoch': epoch, 'loss': loss, 'score': result['main'],
            'accuracy': result['accuracy']}
  for key in ('precision', 'recall', 'f1'):
    if key in result:
      record[key] = result[key]
  return record
