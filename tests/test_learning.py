"""Training learns from context: held-out masked-byte accuracy ends above the baseline."""

import json

import numpy as np
import pytest

from perceiver import configs as model_configs
from tests import helpers
from train import mlm
from train.configs import mlm as mlm_configs




def _cycles(path, seed, count):
  """Documents that are runs of the alphabet from random letters: 'klmnopq...zab...'.

  Every letter is equally frequent, so a context-free guess scores about 1/26 on masked
  bytes, while a masked letter is fixed by either neighbour: only a model that reads the
  bytes beside a masked position beats the baseline.
  """
  rng = np.random.default_rng(seed)
  abc = 'abcdefghijklmnopqrstuvwxyz'
  with open(path, 'w', encoding='utf-8') as f:
    for _ in range(count):
      start, length = rng.integers(26), rng.integers(40, 100)
      f.write(json.dumps({'text': ''.join(abc[(start + k) % 26] for k in range(length))}) + '\n')
  return str(path)


@pytest.mark.slow
def test_held_out_accuracy_ends_above_the_context_free_baseline(tmp_path):
  config = helpers.mlm_tiny_config(tmp_path)
  config.unlock()
  config.data.sources = {'abc': {'paths': _cycles(tmp_path / 'train.jsonl', 0, 300),
                                 'weight': 1.0, 'text_field': 'text'}}
  config.data.eval_paths = _cycles(tmp_path / 'valid.jsonl', 1, 50)
  config.data.docs_per_example = 1
  config.model = model_configs.language(d_model=32, d_latents=64, num_latents=16,
                                        num_self_attends=1, max_seq_len=32, qk_channels=32,
                                        num_heads=2)
  config.model.encoder.dropout_prob = 0.0
  # The cpu and smoke presets' learning settings (train/LEARNING.md): single-byte masking,
  # sinusoid-initialised position tables, the unmasked bytes' reconstruction term.
  mlm_configs.learning_settings(config)
  config.optimizer.decay = 'constant'
  config.train.update(dict(steps=400, batch_size=16, log_every=100, eval_every=100,
                           eval_batches=4))
  config.lock()
  mlm.train(config, str(tmp_path / 'run'))
  held_out = helpers.records(tmp_path / 'run', 'eval')
  first, last = held_out[0], held_out[-1]
  assert last['baseline_accuracy'] < 0.1            # about 1/26: no byte dominates
  assert last['accuracy'] > 3 * last['baseline_accuracy'], held_out
  assert last['accuracy_gap'] > 0.2 and last['loss'] < last['baseline_loss'] - 0.5
  assert last['accuracy'] > first['accuracy']
