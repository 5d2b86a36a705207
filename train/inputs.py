"""The MLM inputs a config asks for: training batches, held-out batches, the baseline.

Training batches mix the configured sources (``train.data``), this host's share of
them, masked by ``train.masking``; ``data.hosts`` can make one host read the shares of
several, to reproduce a multi-host run's global batches on one machine. Held-out
batches are a fixed list, the same at every evaluation and in every run. The
context-free baseline says what a model ignoring context scores on them.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np

from perceiver.model import tokenizer
from train import corpus
from train import data as data_lib
from train import masking
from train import workers


def data_hosts(config) -> List[Tuple[int, int]]:
  """The (host index, host count) shares this host reads: its own, or ``data.hosts``.

  ``data.hosts`` ('0/2,1/2') names other hosts' shares; their batches are concatenated
  in that order, so a one-host run with as many devices sees the global batches of the
  multi-host run it reproduces.

  Raises:
    ValueError: naming ``data.hosts`` when it is malformed or used on several hosts.
  """
  spec = config.data.get('hosts', '')
  if not spec:
    return [(jax.process_index(), jax.process_count())]
  return parse_hosts(spec, config.distributed.enabled)


def parse_hosts(spec: str, distributed: bool) -> List[Tuple[int, int]]:
  """The shares ``data.hosts`` names (no JAX call: usable before JAX starts)."""
  if distributed:
    raise ValueError(f'data.hosts={spec!r} reproduces other hosts\' data on one host; '
                     'leave it empty in a multi-host run')
  shares = []
  for part in spec.split(','):
    index, _, count = part.strip().partition('/')
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
      raise ValueError(f'data.hosts={spec!r}: {part!r} is not INDEX/COUNT with '
                       'INDEX < COUNT')
    shares.append((int(index), int(count)))
  if len({count for _, count in shares}) != 1 or len(set(shares)) != len(shares):
    raise ValueError(f'data.hosts={spec!r}: the shares must be distinct, of one host count')
  return shares


def make_masker(config, for_training=True) -> masking.WordMasker:
  seq_len = config.model.max_seq_len
  max_predictions = None
  if for_training and config.train.decode_masked_only:
    max_predictions = config.train.max_predictions or masking.default_max_predictions(
        seq_len, config.masking.mask_prob)
  return masking.WordMasker(config.masking.mask_prob, config.masking.include_leading_space,
                            config.masking.bert_replacement, max_predictions,
                            unit=config.masking.get('unit', 'word'))


def stream_specs(config, workdir, host_batch) -> List[data_lib.StreamSpec]:
  """This host's shares (``data_hosts``) as ``data.StreamSpec``s of ``data.streams``
  streams each (fewer where a source has too few records: ``data.fitting_streams``),
  with the config's data, masking and batch settings."""
  shares = data_hosts(config)
  if host_batch % len(shares):
    raise ValueError(f'data.hosts: {len(shares)} shares do not split the host batch of '
                     f'{host_batch}')
  cache_dir = os.path.join(workdir, 'data')
  sources = []
  for name, spec in sorted(config.data.sources.items()):
    paths, _ = corpus.resolve(spec['paths'], cache_dir)
    files = data_lib.expand_paths(paths, f'data.sources.{name}.paths')
    sources.append(data_lib.SourceSpec(name, tuple(files), float(spec['weight']),
                                       spec.get('text_field', 'text')))
  streams, why = data_lib.fitting_streams(sources, shares[0][1], config.data.streams)
  if why:
    print(f'data.streams={config.data.streams} -> {streams} on this corpus: {why}; each '
          'record stays in one stream (set data.streams to at most this to silence this)')
  masker = make_masker(config)
  return [data_lib.StreamSpec(
      tuple(sources), seq_len=config.model.max_seq_len,
      docs_per_example=config.data.docs_per_example, separator=config.data.separator,
      block_size=config.data.block_size,
      open_concatenations=config.data.open_concatenations,
      seed=config.seed,
      batch_size=host_batch // len(shares), masker=masker, host=host, hosts=hosts,
      streams=streams) for host, hosts in shares]


def train_batches(config, workdir, host_batch, state=None) -> Iterator[Tuple[Dict, object]]:
  """Endless (masked batch, data position) pairs of this host's share; ``state`` (a
  position from a checkpoint) resumes exactly. With ``data.workers`` > 0 the batches are
  computed in that many processes (``train.workers.WorkerPool``: close it with
  ``train.workers.close``); the batches are the same at any number of workers."""
  return workers.host_batches(stream_specs(config, workdir, host_batch),
                              config.data.workers, state)


def eval_batches(config, workdir, host_batch) -> List[Dict[str, np.ndarray]]:
  """A fixed list of held-out masked batches (same every evaluation and every run)."""
  if (not config.data.eval_paths or config.train.eval_batches <= 0
      or config.train.eval_every <= 0):
    return []
  paths, _ = corpus.resolve(config.data.eval_paths, os.path.join(workdir, 'data'))
  files = data_lib.expand_paths(paths, 'data.eval_paths')
  source = data_lib.DocumentSource('eval', files, seed=config.seed + 1,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(),
                                   text_field=config.data.eval_text_field)
  stream = data_lib.ExampleStream(
      [source], [1.0], seq_len=config.model.max_seq_len,
      docs_per_example=config.data.docs_per_example, separator=config.data.separator,
      block_size=max(host_batch, 16),
      open_concatenations=config.data.open_concatenations,
      seed=config.seed + 1,
      process_index=jax.process_index())
  it = data_lib.batches(stream, host_batch, make_masker(config, for_training=False))
  return [next(it)[0] for _ in range(config.train.eval_batches)]


def unigram_baseline(batches) -> Dict[str, float]:
  """``masking.context_free_baseline`` of these batches' masked bytes, counted over every
  host's batches: ``baseline_accuracy`` and ``baseline_loss``."""
  counts = np.zeros(tokenizer.VOCAB_SIZE)
  for batch in batches:
    np.add.at(counts, batch['labels'][batch['weights'] > 0], 1)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
  baseline = masking.context_free_baseline(counts)
  return {k: baseline[k] for k in ('baseline_accuracy', 'baseline_loss') if k in baseline}
