"""Parameters from any checkpoint this project reads, detected from the path.

- this project's checkpoint (``perceiver.checkpoint``: a zip of arrays and metadata), with
  the model config stored in it;
- DeepMind's released pickle (read by the restricted unpickler), with ``config`` or, by
  default, the released model's config;
- a Hugging Face ``PerceiverForMaskedLM`` directory (``config.json`` plus weights), or its
  weights file with ``config.json`` beside it (``perceiver.hf_io``).
"""

from __future__ import annotations

import os

from perceiver import checkpoint
from perceiver import configs
from perceiver import hf_io

CheckpointError = checkpoint.CheckpointError


def load_any(path, config=None):
  """Loads a checkpoint of any supported form (see the module docstring).

  Returns:
    (params {module: {name: np.ndarray}}, model config, metadata dict).

  Raises:
    CheckpointError: naming the file (and tensor), when it is missing, unreadable,
      unsafe, holds non-finite values or does not match its model.
  """
  path = os.fspath(path)
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, hf_io.CONFIG_FILE)):
    raise CheckpointError(f'{path}: a directory, but not a Hugging Face checkpoint '
                          f'(no {hf_io.CONFIG_FILE})')
  # Before the zip test: a PyTorch .bin is a zip file too.
  if hf_io.is_hf_checkpoint(path):
    params, hf_config = hf_io.load_hf_checkpoint(path)
    checkpoint.check_finite(params, path)
    return params, hf_config, {'source': 'huggingface', 'path': path}
  if checkpoint.is_own_checkpoint(path):
    return checkpoint.load(path)
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such checkpoint')
  config = config or configs.language_mlm()
  params = checkpoint.load_deepmind_pickle(path, config)
  checkpoint.check_finite(params, path)
  return params, config, {'source': 'deepmind', 'path': path}
