"""The masked-LM commands on a checkpoint: ``perceiver.fill_mask`` end to end and
``perceiver.verify_released``'s published inputs and mismatch report."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver.params import params_file
from perceiver import configs
from perceiver import fill_mask
from perceiver import transform
from perceiver import verify_released
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tiny_params():
  return helpers.tiny_mlm_params()


@pytest.mark.slow
def test_fill_mask_fills_the_marked_span(tiny_params, tmp_path):
  data, spans = fill_mask.parse_marked(b'some words are[[ missing.]]')
  assert data == b'some words are missing.' and spans == [(14, 23)]
  config, params = tiny_params
  path = params_file.save(tmp_path / 'tiny.npz', params, config)
  ids, predicted, filled = fill_mask.fill(params, config, data, spans)
  assert np.all(ids[14:23] == 3) and len(predicted[0]) == 9
  logits = transform.masked_lm(config).apply(params, None, jnp.asarray(ids[None]))
  np.testing.assert_array_equal(predicted[0], np.argmax(logits[0, 14:23], -1))
  assert filled[:14] == data[:14]
  # The command, end to end, on the saved checkpoint.
  result = subprocess.run(
      [sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
       '--text=some words are[[ missing.]]'],
      cwd=ROOT, capture_output=True, text=True, check=True)
  assert "span 14:23 was ' missing.' -> " in result.stdout
  assert f'ids {predicted[0].tolist()}' in result.stdout
  result = subprocess.run(
      [sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
       '--text=some words are[[ missing.]]', '--span=0:4'],
      cwd=ROOT, capture_output=True, text=True, check=True)
  assert "span 0:4 was 'some' -> " in result.stdout
  assert "masked: '____ words are_________' (13 bytes" in result.stdout
  bad = subprocess.run([sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
                        '--text=abc', '--span=2:9'], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and '--span=' in bad.stderr and 'END <= 3' in bad.stderr


@pytest.mark.slow
def test_verify_released_inputs_and_mismatch_report():
  # The published example: the model card's sentence, bytes 51:60 (" missing.") masked.
  ids, mask = verify_released.published_inputs()
  assert ids.shape == mask.shape == (1, 2048)
  assert bytes(i - 6 for i in verify_released.KNOWN_ARGMAX) == b' missing.'
  assert verify_released.SENTENCE[51:60] == b' missing.'
  assert (ids[0, 51:60] == 3).all() and ids[0, 50] == ord('e') + 6
  assert mask.sum() == len(verify_released.SENTENCE) and (ids[0, mask[0] == 0] == 0).all()
  # Weights that are not the released ones are reported, naming both figures.
  config = configs.tiny(max_seq_len=2048)
  params = transform.masked_lm(config).init(jax.random.PRNGKey(0), ids, mask)
  problems = verify_released.check(params, config)
  assert len(problems) == 2
  assert problems[0].startswith('logits[0, :3, :3] = ') and 'published' in problems[0]
  assert problems[1].startswith('greedy fill of bytes 51:60 = ')
  assert verify_released.check(params, configs.tiny(max_seq_len=64)) == [
      'the checkpoint is not a byte model reading 2048 positions (vocab_size 262, '
      'max_seq_len 64)']
