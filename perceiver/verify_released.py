r"""Checks a checkpoint of the released model against its published outputs.

    python -m perceiver.verify_released --checkpoint=checkpoints/language_perceiver_io_bytes.pickle

The reference figures were published with transformers' converter for DeepMind's
checkpoint: the model card's sentence, padded with zeros to 2048 bytes (no CLS/SEP), bytes
51:60 (" missing.") replaced by the mask id. This is a command, not a test: the 800 MB
pickle is not part of this repository and is not downloaded. Exit status 0 when the
logits and the greedy fill match, 1 otherwise (with what differed).
"""

from __future__ import annotations

import sys
from typing import List, Tuple

from absl import app
from absl import flags
import jax
import numpy as np

from perceiver.command import cli
from perceiver.model import layers
from perceiver.params import loading
from perceiver import transform

SENTENCE = b'This is an incomplete sentence where some words are missing.'
MASKED = (51, 60)
SEQ_LEN = 2048
# logits[0, :3, :3] and argmax(logits[0, 51:60]) as published.
KNOWN_LOGITS = [[-11.8336, -11.6850, -11.8483], [-12.8149, -12.5863, -12.7904],
                [-12.8440, -12.6410, -12.8646]]
KNOWN_ARGMAX = [38, 115, 111, 121, 121, 111, 116, 109, 52]   # ' missing.' as byte ids
TOLERANCE = 1e-4


def published_inputs() -> Tuple[np.ndarray, np.ndarray]:
  """The published example's ids and mask, each int32 [1, 2048]."""
  ids = np.zeros((1, SEQ_LEN), np.int32)
  ids[0, :len(SENTENCE)] = np.frombuffer(SENTENCE, np.uint8) + 6
  ids[0, MASKED[0]:MASKED[1]] = 3
  mask = (ids != 0).astype(np.int32)
  return ids, mask


def check(params, config) -> List[str]:
  """Runs the published example; returns what differs from the published outputs (empty: all match)."""
  if config.vocab_size != 262 or config.max_seq_len < SEQ_LEN:
    return [f'the checkpoint is not a byte model reading {SEQ_LEN} positions '
            f'(vocab_size {config.vocab_size}, max_seq_len {config.max_seq_len})']
  ids, mask = published_inputs()
  # As this host's devices compute it best (XLA:CPU's kernels on a CPU): the published
  # outputs must come out of the program that runs here.
  model = transform.masked_lm(config, platform=layers.platform())
  logits = np.asarray(jax.jit(model.apply)(params, None, ids, mask))
  problems = []
  corner = logits[0, :3, :3]
  worst = float(np.max(np.abs(corner - np.array(KNOWN_LOGITS))))
  if not worst <= TOLERANCE:
    problems.append(f'logits[0, :3, :3] = {np.round(corner, 4).tolist()}, published '
                    f'{KNOWN_LOGITS} (max abs difference {worst:.3g} > {TOLERANCE})')
  argmax = np.argmax(logits[0, MASKED[0]:MASKED[1]], -1).tolist()
  if argmax != KNOWN_ARGMAX:
    problems.append(f'greedy fill of bytes {MASKED[0]}:{MASKED[1]} = {argmax}, published '
                    f'{KNOWN_ARGMAX} (" missing.")')
  return problems


FLAGS = flags.FLAGS


def main(argv):
  del argv

  def command():
    params, config, _ = loading.load_any(FLAGS.checkpoint)
    problems = check(params, config)
    for problem in problems:
      print(f'MISMATCH: {problem}')
    if problems:
      return 1
    print(f'{FLAGS.checkpoint}: logits within {TOLERANCE} of the published ones; '
          'greedy fill " missing." as published')
    return 0

  return cli.run(command)


if __name__ == '__main__':
  # Defined here, not at import, as every command's flags.
  flags.DEFINE_string('checkpoint', None, 'DeepMind pickle, project checkpoint, or HF '
                      'directory.')
  flags.mark_flag_as_required('checkpoint')
  sys.exit(app.run(main))
