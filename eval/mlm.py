r"""Masked-byte scores of any checkpoint on any text, beside what context-free guessing scores.

    python -m eval.mlm --checkpoint=checkpoints/small/ckpt_000003000 \
      --data=../shared/data/text/wikipedia/valid.jsonl --out=valid.json

The checkpoint may be a run's checkpoint directory (or the run's directory: its newest),
DeepMind's pickle, a Hugging Face ``PerceiverForMaskedLM`` directory or this project's
``.npz`` (anything ``perceiver.params.loading.load_any`` reads); its tensors
are checked against the masked LM its config builds. The text is
read with the pretraining readers (``*.json[l][.gz]`` and ``*.parquet`` with a ``text``
field or column, or the one ``--text_field`` names, a Parquet file's checked before the
checkpoint is read; ``*.txt`` and ``*.raw`` with blank-line separated documents), all
of it, in order: documents joined by the separator and cut into consecutive windows of
``--seq_len`` bytes (the last one padded), so every byte is scored once.

Masks are drawn per document with a generator seeded by ``(--seed, document number)``:
the same ``--seed`` masks the same bytes on every run, whatever the checkpoint, the
window length or the batch size, so scores of different checkpoints are comparable.

Reported (nats and bits are per masked byte):

- ``loss``, ``accuracy``, ``bits_per_byte``: the model's cross-entropy and argmax accuracy
  on the masked bytes;
- ``baseline_accuracy``, ``baseline_loss``, ``baseline_bits_per_byte``: a model without
  context, which always predicts the most frequent masked byte (``baseline_byte``) and
  has the masked bytes' own distribution as its probabilities (its loss is their entropy);
- ``accuracy_gap`` (accuracy minus baseline), ``accuracy_ratio`` (accuracy over
  baseline) and ``loss_gap`` (baseline loss minus loss): above 0 (ratio above 1) once the
  model uses context.
"""

from __future__ import annotations

# First, before the imports below (JAX takes seconds): a signal while they run is
# handled (see perceiver/command/signal_guard.py).
from perceiver.command import signal_guard  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  signal_guard.install(stop_status=None)

import json
import math
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from perceiver.command import atomic
from perceiver.params import params_file
from perceiver.command import cli
from perceiver.command import errors
from perceiver.params import loading
from perceiver.model import layers
from perceiver.model import tokenizer as tokenizer_lib
from perceiver import transform
from perceiver.training import losses
from train import data as data_lib
from train import masking

_FIELDS = ('input_ids', 'input_mask', 'labels', 'weights')


class EvalError(errors.UserError, ValueError):
  """A flag or input the evaluation cannot use; the message names it."""


# --------------------------------------------------------------------------------------
# Masked windows.

def masked_documents(files: Sequence[str], masker: masking.WordMasker, seed: int,
                     text_field: str = 'text') -> Iterator[Dict[str, np.ndarray]]:
  """Each document of ``files`` in order, masked by its own seeded generator.

  Yields dicts of [len] arrays (``input_ids``, ``labels``, ``weights``) and the
  document's ``file_index``.
  """
  number = 0
  for file_index, path in enumerate(files):
    for doc in data_lib.read_documents(path, text_field, field_flag='--text_field'):
      ids = np.frombuffer(doc, np.uint8).astype(np.int32)[None] + tokenizer_lib.NUM_SPECIAL
      rng = np.random.default_rng([seed, number])
      batch = masker(ids, np.ones_like(ids), rng)
      number += 1
      yield {'input_ids': batch['input_ids'][0], 'labels': batch['labels'][0],
             'weights': batch['weights'][0], 'file_index': file_index}


def masked_windows(documents: Iterator[Dict[str, np.ndarray]], seq_len: int,
                   separator: Sequence[int]) -> Iterator[Dict[str, np.ndarray]]:
  """Masked documents, joined by ``separator`` -> consecutive [seq_len] windows.

  Each window has ``input_ids``, ``input_mask``, ``labels``, ``weights`` and the
  ``file_index`` of the document it ends in. The last window is padded (PAD ids, mask 0).
  """
  separator = np.asarray(separator, np.int32)
  sep = {'input_ids': separator, 'labels': separator,
         'weights': np.zeros(len(separator), np.float32)}
  pending = {k: [] for k in sep}
  size = 0
  first = True
  file_index = 0
  for doc in documents:
    file_index = doc['file_index']
    for key in sep:
      if not first and len(separator):
        pending[key].append(sep[key])
      pending[key].append(doc[key])
    size += len(doc['input_ids']) + (0 if first else len(separator))
    first = False
    if size < seq_len:
      continue
    joined = {k: np.concatenate(v) for k, v in pending.items()}
    full = size // seq_len * seq_len
    for start in range(0, full, seq_len):
      window = {k: v[start:start + seq_len] for k, v in joined.items()}
      window['input_mask'] = np.ones(seq_len, np.int32)
      window['file_index'] = file_index
      yield window
    pending = {k: [v[full:]] for k, v in joined.items()}
    size -= full
  if size:
    joined = {k: np.concatenate(v) for k, v in pending.items()}
    window = {k: np.zeros(seq_len, v.dtype) for k, v in joined.items()}
    for k, v in joined.items():
      window[k][:size] = v
    window['input_mask'] = (np.arange(seq_len) < size).astype(np.int32)
    window['file_index'] = file_index
    yield window


def batches(windows: Iterator[Dict[str, np.ndarray]], batch_size: int,
            max_examples: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Stacks windows into [batch_size, seq_len] batches (the last padded with empty rows).

  Each batch also has ``rows`` (its real windows) and ``file_index`` (of its last one).
  """
  rows: List[Dict[str, np.ndarray]] = []
  taken = 0
  for window in windows:
    if max_examples and taken >= max_examples:
      break
    rows.append(window)
    taken += 1
    if len(rows) == batch_size:
      yield _stack(rows, batch_size)
      rows = []
  if rows:
    yield _stack(rows, batch_size)


def _stack(rows, batch_size):
  batch = {}
  for key in _FIELDS:
    stacked = np.zeros((batch_size,) + rows[0][key].shape, rows[0][key].dtype)
    stacked[:len(rows)] = np.stack([r[key] for r in rows])
    batch[key] = stacked
  batch['rows'] = len(rows)
  batch['file_index'] = rows[-1]['file_index']
  return batch


# --------------------------------------------------------------------------------------
# Scores.

def context_free_baseline(counts: np.ndarray) -> Dict[str, float]:
  """``masking.context_free_baseline`` of the masked bytes' label counts, in bits too."""
  out = masking.context_free_baseline(counts)
  if not out:
    raise EvalError('--data: no masked bytes to score (the files hold no text, or too '
                    'little for --mask_prob to mask any)')
  out['baseline_bits_per_byte'] = out['baseline_loss'] / math.log(2)
  return out


def make_score_fn(config):
  """A jitted (params, batch) -> sums of masked-byte loss, correct predictions, count,
  computing as this host's devices do best (XLA:CPU's kernels on a CPU)."""
  model = transform.masked_lm(config, platform=layers.platform())

  @jax.jit
  def score(params, input_ids, input_mask, labels, weights):
    logits = model.apply(params, None, input_ids, input_mask)
    loss, sums = losses.softmax_cross_entropy(logits, labels, weights)
    return {'loss': loss, **sums, 'count': jnp.sum(weights)}

  return score


def summarize(sums: Dict[str, float], counts: np.ndarray) -> Dict[str, float]:
  """Model scores from summed metrics, beside the context-free baseline and the gaps."""
  out = context_free_baseline(counts)
  count = sums['count']
  loss = sums['loss'] / count
  accuracy = sums['correct'] / count
  out.update({
      'loss': loss, 'accuracy': accuracy, 'bits_per_byte': loss / math.log(2),
      'masked_bytes': int(count),
      'accuracy_gap': accuracy - out['baseline_accuracy'],
      'accuracy_ratio': accuracy / out['baseline_accuracy'],
      'loss_gap': out['baseline_loss'] - loss,
  })
  return out


class _Progress:
  """A line on stderr every ``every`` seconds: where the evaluation is, and how fast."""

  def __init__(self, num_files: int, max_examples: int, every: float = 10.0, stream=None):
    self.num_files, self.max_examples, self.every = num_files, max_examples, every
    self.stream = stream or sys.stderr
    self.start = self.last = time.time()

  def update(self, examples, file_index, sums, force=False):
    now = time.time()
    if not force and now - self.last < self.every:
      return
    self.last = now
    elapsed = now - self.start
    where = f'file {file_index + 1}/{self.num_files}, {examples} windows'
    if self.max_examples:
      pct = 100.0 * examples / self.max_examples
      eta = elapsed / max(examples, 1) * (self.max_examples - examples)
      where += f' of at most {self.max_examples} ({pct:.0f}%, eta {eta:.0f}s)'
    acc = sums['correct'] / max(sums['count'], 1)
    print(f'eval.mlm: {where}, {int(sums["count"])} masked bytes, accuracy {acc:.4f}, '
          f'{elapsed:.0f}s', file=self.stream, flush=True)


def evaluate(params, config, files: Sequence[str], *, seed: int = 0, batch_size: int = 16,
             seq_len: Optional[int] = None, max_examples: int = 0,
             masker: Optional[masking.WordMasker] = None, separator: str = 'sep',
             text_field: str = 'text', progress_every: float = 10.0,
             stream=None) -> Dict[str, float]:
  """Scores ``params`` (a masked LM of ``config``) on every document of ``files``.

  Returns the dict described in the module docstring, plus ``examples`` (windows
  scored), ``seq_len`` and ``seconds``.
  """
  seq_len = seq_len or config.max_seq_len
  if seq_len > config.max_seq_len:
    raise EvalError(f'--seq_len={seq_len} exceeds the checkpoint\'s max_seq_len '
                    f'({config.max_seq_len})')
  if seq_len < 1:
    raise EvalError(f'--seq_len must be >= 1, got {seq_len}')
  if batch_size < 1:
    raise EvalError(f'--batch_size must be >= 1, got {batch_size}')
  if separator not in data_lib.SEPARATORS:
    raise EvalError(f'--separator must be one of {", ".join(sorted(data_lib.SEPARATORS))}, '
                    f'got {separator!r}')
  masker = masker or masking.WordMasker()
  score = make_score_fn(config)
  params = jax.device_put(params)
  docs = masked_documents(files, masker, seed, text_field)
  windows = masked_windows(docs, seq_len, data_lib.SEPARATORS[separator])
  sums = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
  counts = np.zeros(tokenizer_lib.VOCAB_SIZE, np.int64)
  progress = _Progress(len(files), max_examples, progress_every, stream)
  start = time.time()
  examples = 0
  file_index = 0
  pending = None   # the previous batch's device results, read while this one runs

  def drain(result):
    for k, v in jax.device_get(result).items():
      sums[k] += float(v)

  for batch in batches(windows, batch_size, max_examples):
    signal_guard.check()   # a signal whose exception was lost (see signal_guard) stops here
    np.add.at(counts, batch['labels'][batch['weights'] > 0], 1)
    result = score(params, *(jnp.asarray(batch[k]) for k in _FIELDS))
    if pending is not None:
      drain(pending)
    pending = result
    examples += batch['rows']
    file_index = batch['file_index']
    progress.update(examples, file_index, sums)
  if pending is not None:
    drain(pending)
  progress.update(examples, file_index, sums, force=True)
  out = summarize(sums, counts)
  out.update({'examples': examples, 'seq_len': seq_len, 'seconds': time.time() - start})
  return out


# --------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('checkpoint', None, "DeepMind's pickle, a Hugging Face checkpoint "
                      "directory, or this project's .npz.")
  flags.DEFINE_string('data', None, 'Comma-separated globs of text files: '
                      '*.json[l][.gz] (JSON lines), *.parquet, *.txt / *.raw (blank-line '
                      'separated).')
  flags.DEFINE_integer('seed', 0, 'Seeds the masks: the same seed masks the same bytes for '
                       'every checkpoint.')
  flags.DEFINE_integer('batch_size', 16, 'Windows per forward pass.')
  flags.DEFINE_integer('seq_len', 0, "Window length in bytes (0: the checkpoint's "
                       'max_seq_len).')
  flags.DEFINE_integer('max_examples', 0, 'Score at most this many windows (0: all).')
  flags.DEFINE_float('mask_prob', 0.15, 'Probability of masking each unit (paper: 15%).')
  flags.DEFINE_enum('unit', 'word', list(masking.UNITS), 'Masking unit: whole words (the '
                    "paper's) or single bytes.")
  flags.DEFINE_bool('include_leading_space', True, "A masked word's mask also covers the "
                    'whitespace before it (as train.mlm masks by default).')
  flags.DEFINE_string('separator', 'sep', 'Between documents: sep, eos, newline or none.')
  flags.DEFINE_string('text_field', 'text', 'The JSON field or Parquet column holding '
                      'the text.')
  flags.DEFINE_string('out', None, 'Also write the results to this JSON file.')
  flags.mark_flags_as_required(['checkpoint', 'data'])


def run(checkpoint_path: str, data: str, out: Optional[str] = None, **kwargs):
  """Loads the checkpoint and data, evaluates, prints and optionally writes JSON."""
  mask_prob = kwargs.get('mask_prob', 0.15)
  if not 0 < mask_prob < 1:
    raise EvalError(f'--mask_prob must be in (0, 1), got {mask_prob}')
  if out:
    atomic.check_writable(out, '--out')   # before the evaluation, not after it
  files = data_lib.expand_paths(data, '--data')
  for path in files:   # a Parquet file's columns are known before anything is read
    if path.endswith('.parquet'):
      data_lib.parquet_row_groups(path, kwargs.get('text_field', 'text'), '--text_field')
  params, config, _ = loading.load_any(checkpoint_path)
  params_file.check_params(params, params_file.expected_shapes(transform.masked_lm(config),
                                                             config),
                          source=f'{checkpoint_path} (the masked language model)')
  unit = kwargs.pop('unit', 'word')
  masker = masking.WordMasker(kwargs.pop('mask_prob', 0.15),
                              kwargs.pop('include_leading_space', True), unit=unit)
  result = evaluate(params, config, files, masker=masker, **kwargs)
  result = {'checkpoint': checkpoint_path, 'data': files,
            'masking': {'unit': unit, 'mask_prob': masker.mask_prob,
                        'include_leading_space': masker.include_leading_space,
                        'seed': kwargs.get('seed', 0)},
            **result}
  if out:
    if os.path.dirname(os.path.abspath(out)):
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic.atomic_write(out, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
  return result


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2

  def command():
    result = run(FLAGS.checkpoint, FLAGS.data, FLAGS.out, seed=FLAGS.seed,
                 batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len or None,
                 max_examples=FLAGS.max_examples, mask_prob=FLAGS.mask_prob,
                 unit=FLAGS.unit, include_leading_space=FLAGS.include_leading_space,
                 separator=FLAGS.separator, text_field=FLAGS.text_field)
    keys = ('examples', 'masked_bytes', 'loss', 'accuracy', 'bits_per_byte',
            'baseline_accuracy', 'baseline_loss', 'accuracy_gap', 'accuracy_ratio',
            'loss_gap')
    print(' '.join(f'{k} {result[k]:.4f}' if isinstance(result[k], float) else
                   f'{k} {result[k]}' for k in keys))
    print(f'baseline_byte {result["baseline_byte"]!r}')

  return cli.run(command)


if __name__ == '__main__':
  cli.start(main, define_flags)
