"""Hugging Face checkpoint files: a ``PerceiverForMaskedLM`` directory in and out.

    params, config = hf_io.load_hf_checkpoint('language-perceiver/')   # a transformers dir
    hf_io.export_hf(params, config, 'exported/')   # config.json + model.safetensors

``config.json`` and the tensors are mapped by ``perceiver.params.hf``. ``model.safetensors`` is
read and written with the ``safetensors`` package's numpy API (a core dependency; no torch),
which checks the header against the file before reading any tensor;
``pytorch_model.bin`` needs torch and is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import ml_collections
import ml_dtypes  # noqa: F401  # registers bfloat16 with numpy (safetensors BF16)
import numpy as np

from perceiver.command import atomic
from perceiver.params import params_file
from perceiver.params import hf

CheckpointError = params_file.CheckpointError

_log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
BIN_FILE = 'pytorch_model.bin'
_WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_FILE + '.index.json', BIN_FILE,
                 BIN_FILE + '.index.json')
_INSTALL_HINT = "pip install '.[hf]'"


# --------------------------------------------------------------------------------------
# model.safetensors.

def _safetensors(path):
  try:
    import safetensors  # pylint: disable=import-outside-toplevel
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f'{path}: reading or writing .safetensors needs the safetensors '
                          'package, a dependency of this project: pip install safetensors') from e
  return safetensors


def read_safetensors(path) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """Reads a ``.safetensors`` file: ({name: array}, metadata).

  BF16 tensors become float32 (exactly); other dtypes keep theirs.

  Raises:
    CheckpointError: naming the file, when it is missing, truncated or corrupt.
  """
  path = os.fspath(path)
  st = _safetensors(path)
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file')
  try:
    with st.safe_open(path, framework='numpy') as f:
      metadata = f.metadata() or {}
      tensors = {}
      for name in f.keys():
        value = f.get_tensor(name)
        tensors[name] = value.astype(np.float32) if value.dtype.name == 'bfloat16' else value
  except (st.SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(f'{path}: not a readable safetensors file: {e}') from e
  return tensors, {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(path, tensors: Mapping[str, Any],
                      metadata: Optional[Mapping[str, str]] = None) -> str:
  """Writes ``{name: array}`` as a ``.safetensors`` file, atomically; returns ``path``."""
  path = os.fspath(path)
  st = _safetensors(path)
  arrays = {name: np.array(value, order='C', copy=None) for name, value in tensors.items()}
  data = st.numpy.save(arrays, metadata={str(k): str(v) for k, v in (metadata or {}).items()}
                       or None)
  with atomic.atomic_write(path) as f:
    f.write(data)
  return path


# --------------------------------------------------------------------------------------
# pytorch_model.bin (needs torch).

def read_torch_bin(path) -> Dict[str, np.ndarray]:
  """Reads a PyTorch state dict with ``torch.load(..., weights_only=True)``.

  Floating tensors become float32 numpy arrays (bfloat16 has no numpy type).

  Raises:
    CheckpointError: naming the file, when torch is missing or the file is not a plain
      state dict of tensors (weights-only mode refuses anything that would run code).
  """
  path = os.fspath(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f'{path}: reading a PyTorch .bin checkpoint needs torch '
                          f'({_INSTALL_HINT}); a model.safetensors needs nothing') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many kinds)
    raise CheckpointError(f'{path}: not a weights-only PyTorch state dict: {e}') from e
  if not isinstance(state, Mapping):
    raise CheckpointError(f'{path}: expected a state dict, got {type(state).__name__}')
  tensors = {}
  for name, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f'{path}: entry {name!r} is a {type(value).__name__}, not a tensor')
    value = value.detach()
    if value.is_floating_point():
      value = value.to(torch.float32)
    tensors[str(name)] = value.numpy().copy()
  return tensors


# --------------------------------------------------------------------------------------
# Finding and reading a transformers checkpoint.

def is_hf_checkpoint(path) -> bool:
  """A directory with config.json, or a weights file of ours with config.json beside it."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return os.path.isfile(os.path.join(path, CONFIG_FILE))
  name = os.path.basename(path)
  return (os.path.isfile(path) and name.endswith(('.safetensors', '.bin', '.index.json')) and
          os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)))


def _locate(path) -> Tuple[str, str]:
  """(config.json path, weights path) of a checkpoint directory or weights file."""
  path = os.fspath(path)
  if os.path.isdir(path):
    directory, weights = path, None
    for name in _WEIGHT_FILES:
      if os.path.isfile(os.path.join(path, name)):
        weights = os.path.join(path, name)
        break
    if weights is None:
      raise CheckpointError(f'{path}: no weights found (looked for {", ".join(_WEIGHT_FILES)})')
  elif os.path.isfile(path):
    directory, weights = os.path.dirname(os.path.abspath(path)), path
  else:
    raise CheckpointError(f'{path}: no such file or directory')
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise CheckpointError(f'{path}: a Hugging Face checkpoint needs {CONFIG_FILE} in '
                          f'{directory}')
  return config_path, weights


def _read_weights_file(path) -> Dict[str, np.ndarray]:
  if path.endswith('.safetensors'):
    return read_safetensors(path)[0]
  if path.endswith('.bin'):
    return read_torch_bin(path)
  raise CheckpointError(f'{path}: unknown weights format (expected .safetensors or .bin)')


def _read_sharded(index_path) -> Dict[str, np.ndarray]:
  try:
    with open(index_path) as f:
      weight_map = json.load(f)['weight_map']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'{index_path}: not a weights index (no weight_map): {e}') from e
  directory = os.path.dirname(os.path.abspath(index_path))
  tensors: Dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(directory, os.path.basename(shard))
    for name, value in _read_weights_file(shard_path).items():
      if name in tensors:
        raise CheckpointError(f'{shard_path}: tensor {name!r} is also in another shard')
      tensors[name] = value
  return tensors


def read_hf_tensors(weights_path) -> Dict[str, np.ndarray]:
  """All tensors of a weights file (.safetensors, .bin, or a sharded ``*.index.json``)."""
  weights_path = os.fspath(weights_path)
  if weights_path.endswith('.index.json'):
    return _read_sharded(weights_path)
  return _read_weights_file(weights_path)


def read_hf_config(config_path) -> dict:
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{config_path}: unreadable: {e}') from e
  if not isinstance(config, dict):
    raise CheckpointError(f'{config_path}: expected a JSON object')
  return config


# --------------------------------------------------------------------------------------
# Import and export.

@dataclasses.dataclass
class HFCheckpoint:
  """A converted transformers checkpoint."""
  params: dict
  config: ml_collections.ConfigDict
  notes: List[str]
  config_path: str
  weights_path: str
  num_tensors: int


def read_hf_checkpoint(path) -> HFCheckpoint:
  """Reads and converts a ``PerceiverForMaskedLM`` checkpoint (see ``load_hf_checkpoint``)."""
  config_path, weights_path = _locate(path)
  config, notes = hf.config_from_hf(read_hf_config(config_path), source=config_path)
  tensors = read_hf_tensors(weights_path)
  narrow = sorted({str(v.dtype) for v in tensors.values()
                   if v.dtype.kind == 'f' and v.dtype != np.float32})
  if narrow:
    notes.append(f'{weights_path}: {"/".join(narrow)} tensors converted to float32.')
  params = hf.hf_to_params(tensors, config, source=weights_path)
  return HFCheckpoint(params, config, notes, config_path, weights_path, len(tensors))


def load_hf_checkpoint(path) -> Tuple[dict, ml_collections.ConfigDict]:
  """Loads a transformers ``PerceiverForMaskedLM`` checkpoint as this project's model.

  Args:
    path: a directory with config.json and model.safetensors (or pytorch_model.bin, or a
      sharded ``*.index.json``), or one of those weights files with config.json beside it.

  Returns:
    (params {module: {name: float32 np.ndarray}}, ConfigDict for ``transform.masked_lm``).
    The model computes the original's function: notes on how it differs from
    transformers' (e.g. ``hidden_act="gelu"``) are logged as warnings.

  Raises:
    CheckpointError: naming the file and tensors when files are unreadable or tensors
      are missing, unexpected or mis-shaped.
    UnsupportedConfigError: naming the config.json field the model cannot express.
  """
  converted = read_hf_checkpoint(path)
  for note in converted.notes:
    _log.warning('%s', note)
  return converted.params, converted.config


def _prepare_destination(out_dir, overwrite):
  if os.path.isfile(out_dir) or os.path.islink(out_dir):
    raise FileExistsError(f'{out_dir}: exists and is not a directory')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir}: directory exists and is not empty (pass overwrite)')


def export_hf(params, config, out_dir, *, overwrite=False) -> List[str]:
  """Writes a directory that ``PerceiverForMaskedLM.from_pretrained`` loads.

  ``config.json`` reproduces the original's computation (``hidden_act="gelu_new"``,
  ``layer_norm_eps=1e-5``); ``model.safetensors`` holds float32 tensors. The directory
  is assembled under a temporary name beside ``out_dir`` and renamed into place, so a
  failure leaves no partial checkpoint.

  Args:
    params: the masked LM's parameters.
    config: their ConfigDict.
    out_dir: the directory to create; an existing non-empty one is refused unless
      ``overwrite`` (it is then replaced whole).
    overwrite: replace an existing directory.

  Returns:
    Notes on the conversion (may be empty).

  Raises:
    UnsupportedConfigError: naming the config field transformers cannot express, or
      refusing a token classifier (transformers has none for Perceiver).
    CheckpointError: naming missing, unexpected or mis-shaped parameters.
    FileExistsError: ``out_dir`` exists and is a file or a non-empty directory.
    CheckpointError: the parameters hold NaN or infinity (nothing is written).
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  hf.refuse_token_classifier(params)
  hf_config, notes = hf.hf_config_from(config)
  params_file.check_finite(params)
  tensors = hf.params_to_hf(params, config)
  _prepare_destination(out_dir, overwrite)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.', suffix='.tmp', dir=parent)
  # mkdtemp's directory is private (0700); the export gets a plain directory's mode.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)
  try:
    with atomic.atomic_write(os.path.join(tmp, CONFIG_FILE)) as f:
      f.write(json.dumps(hf_config, indent=2, sort_keys=True).encode() + b'\n')
    write_safetensors(os.path.join(tmp, SAFETENSORS_FILE), tensors, {'format': 'pt'})
    _replace_directory(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return notes


def _replace_directory(new, target):
  """Renames ``new`` to ``target``; an existing ``target`` is moved aside, then deleted."""
  old = None
  if os.path.isdir(target):
    if not os.listdir(target):
      os.rmdir(target)
    else:
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(target)}.', suffix='.old',
                             dir=os.path.dirname(target))
      os.rmdir(old)
      os.replace(target, old)
  try:
    os.replace(new, target)
  except BaseException:
    if old is not None:
      os.replace(old, target)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
