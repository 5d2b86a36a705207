"""Throughput of the pretraining data pipeline: masked batches per second on one thread.

It runs ``train.inputs.train_batches`` (documents -> concatenated, cropped, block-shuffled
examples -> whole-word masking) on the built-in corpus (the Python standard library's
docstrings, no download) with the pretraining preset's settings, and counts batches over
at least two shuffle blocks, so that the block builds are in the rate. Training consumes
one batch per step: the pipeline's rate over the step's is the headroom.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Dict, Optional

from train import inputs
from train.configs import mlm as mlm_configs

BUILTIN = 'builtin:stdlib_docstrings/train'


def pipeline_config(model_config, shuffle_block: Optional[int] = None):
  """The pretraining data settings (``paper`` preset) over the built-in corpus."""
  config = mlm_configs.get_config('paper')
  config.unlock()
  config.model = model_config
  config.data.sources = {'stdlib': {'paths': BUILTIN, 'weight': 1.0, 'text_field': 'text'}}
  if shuffle_block:
    config.data.shuffle_block = shuffle_block
  config.lock()
  return config


def measure(model_config, batch: int, *, min_seconds: float = 3.0,
            shuffle_block: Optional[int] = None, cache_dir: Optional[str] = None
            ) -> Dict[str, float]:
  """Masked batches per second, and bytes per second, of ``batch`` sequences."""
  config = pipeline_config(model_config, shuffle_block)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = cache_dir or tmp
    batches = inputs.train_batches(config, workdir, batch)
    next(batches)   # corpus extraction and the first block are set-up, not throughput
    blocks = 2 * config.data.shuffle_block
    count, start = 0, time.perf_counter()
    while count * batch < blocks or time.perf_counter() - start < min_seconds:
      next(batches)
      count += 1
    elapsed = time.perf_counter() - start
  seq_len = config.model.max_seq_len
  return {'batch': batch, 'seq_len': seq_len, 'batches': count, 'seconds': elapsed,
          'batches_per_s': count / elapsed, 'bytes_per_s': count * batch * seq_len / elapsed,
          'shuffle_block': config.data.shuffle_block, 'corpus': BUILTIN,
          'masking': f'whole words, p={config.masking.mask_prob}'}


def default_cache_dir() -> str:
  """Where the built-in corpus is extracted once (reused across runs)."""
  return os.path.join(tempfile.gettempdir(), 'perceiver_bench_corpus')
