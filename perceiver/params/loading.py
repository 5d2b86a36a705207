"""Parameters from any checkpoint this project reads, told apart by content
(``perceiver.params.formats``) before any loader runs; the one reader every command that reads
parameters goes through (``eval.glue --init_checkpoint``, ``eval.mlm``, ``fill_mask``,
``perceiver.deploy.export``, ``perceiver.convert`` and its Hugging Face export):

- this project's parameter file (``perceiver.params.params_file``: a zip of arrays and
  metadata), with the model config stored in it;
- a run checkpoint directory (``perceiver.training.run_checkpoints``: ``train.mlm``'s,
  ``eval.glue``'s), or a run's directory holding them (its newest is read), gathered to
  host numpy arrays, with the model config stored in it;
- DeepMind's released pickle (read by the restricted unpickler), with ``config`` or, by
  default, the released model's config;
- a Hugging Face ``PerceiverForMaskedLM`` directory (``config.json`` plus weights), or its
  weights file with ``config.json`` beside it (``perceiver.params.hf_io``).
"""

from __future__ import annotations

import os

from perceiver.params import params_file
from perceiver import configs
from perceiver.params import formats
from perceiver.params import hf_io

CheckpointError = params_file.CheckpointError


def load_any(path, config=None):
  """Loads a checkpoint of any supported form (see the module docstring).

  Returns:
    (params {module: {name: np.ndarray}}, model config, metadata dict).

  Raises:
    CheckpointError: naming the file (and tensor), when it is missing, unreadable,
      unsafe, holds non-finite values or does not match its model.
  """
  path = os.fspath(path)
  kind = formats.sniff(path)
  if kind == 'missing':
    raise CheckpointError(f'{path}: no such checkpoint')
  if kind == 'directory':
    raise CheckpointError(f'{path}: {formats.describe(path, kind)}')
  if kind in ('run_checkpoint', 'run_directory'):
    from perceiver.training import run_checkpoints  # pylint: disable=import-outside-toplevel
    return run_checkpoints.read(path)
  # Before the zip test: a PyTorch .bin is a zip file too.
  if hf_io.is_hf_checkpoint(path):
    params, hf_config = hf_io.load_hf_checkpoint(path)
    params_file.check_finite(params, path)
    return params, hf_config, {'source': 'huggingface', 'path': path}
  if kind == 'project':
    return params_file.load(path)
  if kind in ('torch', 'safetensors'):
    raise CheckpointError(f'{path}: {formats.describe(path, kind)} without '
                          f'{hf_io.CONFIG_FILE} beside it: give the Hugging Face directory '
                          'that holds both')
  if kind != 'pickle':
    raise CheckpointError(f'{path}: {formats.describe(path, kind)}; expected this project\'s '
                          "checkpoint, DeepMind's pickle or a Hugging Face directory")
  config = config or configs.language_mlm()
  params = params_file.load_deepmind_pickle(path, config)
  params_file.check_finite(params, path)
  return params, config, {'source': 'deepmind', 'path': path}
