"""Hugging Face interop: ``PerceiverForMaskedLM`` checkpoints to and from this project.

    params, config = hf.load_hf_checkpoint('language-perceiver/')   # a transformers directory
    hf.export_hf(params, config, 'exported/')   # config.json + model.safetensors

Tensor correspondence (transformers' name -> Haiku ``module/name``); every ``*.weight`` of
an ``nn.Linear`` is stored [out, in] by PyTorch and [in, out] by Haiku, so it is transposed:

- ``perceiver.input_preprocessor.embeddings.weight`` -> ``embed/embeddings``
- ``perceiver.input_preprocessor.position_embeddings.weight`` ->
  ``trainable_position_encoding/pos_embs``
- ``perceiver.embeddings.latents`` -> ``perceiver_encoder/~/trainable_position_encoding/pos_embs``
- ``perceiver.encoder.cross_attention.*`` -> ``perceiver_encoder/~/cross_attention/*``
- ``perceiver.encoder.self_attends.{i}.*`` -> ``perceiver_encoder/~/self_attention[_i]/*``
  (both share these layers across ``num_blocks``)
- ``perceiver.decoder.output_position_encodings.position_embeddings`` ->
  ``basic_decoder/~/trainable_position_encoding/pos_embs``
- ``perceiver.decoder.decoding_cross_attention.*`` -> ``basic_decoder/cross_attention/*``
- ``embedding_decoder.bias`` -> ``embedding_decoder/bias`` (the output embedding is the
  input embedding in both: tied, stored once).

Inside an attention block: ``attention.self.{query,key,value}`` and ``attention.output.dense``
are ``attention/linear{,_1,_2,_3}``; ``mlp.dense{1,2}`` are ``mlp/linear{,_1}``;
``attention.self.layernorm1`` (queries) is ``layer_norm``, ``attention.self.layernorm2``
(keys/values, cross-attention only) ``layer_norm_1``, and ``layernorm`` (before the MLP)
the block's last one (``layer_norm_2`` in a cross-attention, ``layer_norm_1`` in a
self-attention). LayerNorm ``weight``/``bias`` are Haiku's ``scale``/``offset``.

How transformers' port computes differently from the original (and so from this project):

- ``hidden_act="gelu"`` (its default, and the hub model's) is the exact erf GELU; the
  original uses ``jax.nn.gelu``, the tanh approximation (``"gelu_new"`` in transformers).
  The import keeps the original's function (and says so); the export writes ``gelu_new``.
- ``layer_norm_eps`` is not read by its Perceiver modules: they use ``nn.LayerNorm``'s
  default eps 1e-5, which is Haiku's. The export writes 1e-5 so the config says so.
- It does not mask padded decoder queries: their rows are computed like any other, where
  the original zeroes their attention output. Logits at real positions agree.
- Its ``PerceiverForMaskedLM`` text decoder is fixed: 8 heads, qk 256, v ``d_model``, one
  query per position up to ``max_position_embeddings``, no query residual, no final
  projection. The export refuses configs it cannot express, naming the field.

Safetensors files are read and written with numpy alone (no torch, no ``safetensors``
package); ``pytorch_model.bin`` needs torch and is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import ml_collections
import numpy as np

from perceiver import atomic
from perceiver import checkpoint
from perceiver import configs

CheckpointError = checkpoint.CheckpointError

_log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
BIN_FILE = 'pytorch_model.bin'
_WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_FILE + '.index.json', BIN_FILE,
                 BIN_FILE + '.index.json')
_INSTALL_HINT = "pip install '.[hf]'"

# PerceiverForMaskedLM's text decoder, fixed in transformers' code.
HF_DECODER_HEADS = 8
HF_DECODER_QK_CHANNELS = 256

# PerceiverConfig's defaults, for fields a config.json leaves out.
_HF_DEFAULTS = {
    'num_latents': 256, 'd_latents': 1280, 'd_model': 768, 'num_blocks': 1,
    'num_self_attends_per_block': 26, 'num_self_attention_heads': 8,
    'num_cross_attention_heads': 8, 'qk_channels': None, 'v_channels': None,
    'cross_attention_shape_for_attention': 'kv', 'self_attention_widening_factor': 1,
    'cross_attention_widening_factor': 1, 'hidden_act': 'gelu', 'layer_norm_eps': 1e-12,
    'use_query_residual': True, 'vocab_size': 262, 'max_position_embeddings': 2048,
}
# Activations that are the original's tanh-approximated GELU.
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')
_HAIKU_LAYER_NORM_EPS = 1e-5


class UnsupportedConfigError(ValueError):
  """A configuration one side cannot express; the message names the field."""


# --------------------------------------------------------------------------------------
# Safetensors, with numpy only.

# safetensors dtype -> little-endian numpy dtype. BF16 is handled apart (numpy lacks it).
_ST_DTYPES = {
    'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'I64': '<i8', 'I32': '<i4', 'I16': '<i2',
    'I8': 'i1', 'U8': 'u1', 'BOOL': '?',
}
_NP_TO_ST = {np.dtype(v).newbyteorder('<') if np.dtype(v).itemsize > 1 else np.dtype(v): k
             for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
  """uint16 bit patterns of bfloat16 -> float32 (exact: bfloat16 is float32's top half)."""
  return (raw.astype('<u4') << 16).view('<f4')


def _safetensors_header(f, path, file_size) -> Tuple[dict, int]:
  """Reads and checks the header; returns (header dict, offset of the data buffer)."""
  prefix = f.read(8)
  if len(prefix) < 8:
    raise CheckpointError(f'{path}: not a safetensors file (shorter than its 8-byte header '
                          'length)')
  (length,) = struct.unpack('<Q', prefix)
  if length > min(_MAX_HEADER, file_size - 8):
    raise CheckpointError(f'{path}: corrupt safetensors header: length {length} exceeds '
                          f'the file ({file_size} bytes)')
  raw = f.read(length)
  try:
    header = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, ValueError) as e:
    raise CheckpointError(f'{path}: corrupt safetensors header (not JSON): {e}') from e
  if not isinstance(header, dict):
    raise CheckpointError(f'{path}: corrupt safetensors header: expected a JSON object')
  return header, 8 + length


def _check_entry(name, entry, data_size, path) -> Tuple[str, tuple, int, int]:
  """Validates one header entry; returns (dtype, shape, begin, end)."""
  if not isinstance(entry, dict):
    raise CheckpointError(f'{path}: tensor {name!r}: header entry is not an object')
  dtype, shape, offsets = entry.get('dtype'), entry.get('shape'), entry.get('data_offsets')
  if dtype != 'BF16' and dtype not in _ST_DTYPES:
    raise CheckpointError(f'{path}: tensor {name!r}: unsupported dtype {dtype!r}')
  if (not isinstance(shape, list) or
      not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
    raise CheckpointError(f'{path}: tensor {name!r}: bad shape {shape!r}')
  if (not isinstance(offsets, list) or len(offsets) != 2 or
      not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
    raise CheckpointError(f'{path}: tensor {name!r}: bad data_offsets {offsets!r}')
  begin, end = offsets
  itemsize = 2 if dtype == 'BF16' else np.dtype(_ST_DTYPES[dtype]).itemsize
  if not 0 <= begin <= end <= data_size:
    raise CheckpointError(f'{path}: tensor {name!r}: data_offsets {offsets} outside the '
                          f'{data_size}-byte data buffer (truncated file?)')
  if end - begin != math.prod(shape) * itemsize:
    raise CheckpointError(f'{path}: tensor {name!r}: data_offsets {offsets} hold '
                          f'{end - begin} bytes, but {dtype}{shape} needs '
                          f'{math.prod(shape) * itemsize}')
  return dtype, tuple(shape), begin, end


def _check_coverage(spans, data_size, path):
  """The tensors must tile the data buffer exactly: no overlaps, no holes."""
  position = 0
  for begin, end, name in sorted(spans):
    if begin != position:
      what = 'overlaps the previous tensor' if begin < position else 'leaves a hole before it'
      raise CheckpointError(f'{path}: tensor {name!r} at byte {begin} {what} '
                            f'(expected {position})')
    position = end
  if position != data_size:
    raise CheckpointError(f'{path}: {data_size - position} bytes after the last tensor are '
                          'not indexed by the header')


def read_safetensors(path) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """Reads a ``.safetensors`` file with numpy.

  Args:
    path: the file.

  Returns:
    ({name: array}, metadata). BF16 tensors become float32 (exactly); other dtypes keep
    theirs (F64/F32/F16, I64/I32/I16/I8, U8, BOOL).

  Raises:
    CheckpointError: naming the file (and tensor), when it is truncated or corrupt.
  """
  path = os.fspath(path)
  try:
    file_size = os.path.getsize(path)
    with open(path, 'rb') as f:
      header, data_start = _safetensors_header(f, path, file_size)
  except OSError as e:
    raise CheckpointError(f'{path}: cannot read: {e}') from e
  metadata = header.pop('__metadata__', None) or {}
  if not isinstance(metadata, dict):
    raise CheckpointError(f'{path}: corrupt safetensors header: __metadata__ is not an object')
  data_size = file_size - data_start
  entries = {name: _check_entry(name, entry, data_size, path) for name, entry in header.items()}
  _check_coverage([(b, e, n) for n, (_, _, b, e) in entries.items()], data_size, path)
  if data_size == 0:
    buffer = np.zeros(0, np.uint8)
  else:
    buffer = np.memmap(path, dtype=np.uint8, mode='r', offset=data_start, shape=(data_size,))
  tensors = {}
  for name, (dtype, shape, begin, end) in entries.items():
    chunk = buffer[begin:end]
    if dtype == 'BF16':
      tensors[name] = _bf16_to_f32(chunk.view('<u2')).reshape(shape)
    else:
      tensors[name] = chunk.view(_ST_DTYPES[dtype]).reshape(shape).copy()
  del buffer
  return tensors, {str(k): str(v) for k, v in metadata.items()}


def _st_dtype(name, array) -> str:
  if array.dtype.name == 'bfloat16':   # ml_dtypes' bfloat16 (jax's)
    return 'BF16'
  dtype = array.dtype.newbyteorder('<') if array.dtype.itemsize > 1 else array.dtype
  if dtype not in _NP_TO_ST:
    raise TypeError(f'tensor {name!r}: dtype {array.dtype} has no safetensors equivalent')
  return _NP_TO_ST[dtype]


def write_safetensors(path, tensors: Mapping[str, Any],
                      metadata: Optional[Mapping[str, str]] = None) -> str:
  """Writes ``{name: array}`` as a ``.safetensors`` file, atomically, with numpy.

  Tensors are stored in name order, little-endian, tiling the data buffer; the header is
  space-padded to a multiple of 8 bytes, as the reference writer does.

  Args:
    path: the file to write (replaced atomically).
    tensors: {name: array-like}.
    metadata: optional {str: str}, stored as ``__metadata__``.

  Returns:
    ``path``.
  """
  path = os.fspath(path)
  header: Dict[str, Any] = {}
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  arrays, position = [], 0
  for name in sorted(tensors):
    array = np.asarray(tensors[name])
    dtype = _st_dtype(name, array)
    if dtype == 'BF16':
      data = np.ascontiguousarray(array).view(np.uint16).astype('<u2').tobytes()
    else:
      data = np.ascontiguousarray(array, dtype=_ST_DTYPES[dtype]).tobytes()
    header[name] = {'dtype': dtype, 'shape': list(array.shape),
                    'data_offsets': [position, position + len(data)]}
    arrays.append(data)
    position += len(data)
  encoded = json.dumps(header, separators=(',', ':')).encode('utf-8')
  encoded += b' ' * (-len(encoded) % 8)
  _atomic_write(path, [struct.pack('<Q', len(encoded)), encoded] + arrays)
  return path


def _atomic_write(path, chunks):
  with atomic.atomic_write(path) as f:
    for chunk in chunks:
      f.write(chunk)


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
# Configurations.

def _int_field(hf_config, field, source, allow_none=False):
  value = hf_config.get(field, _HF_DEFAULTS[field])
  if value is None and allow_none:
    return None
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise UnsupportedConfigError(f'{source}: {field}={value!r} must be a positive integer'
                                 + (' or null' if allow_none else ''))
  return value


def config_from_hf(hf_config: Mapping, source=CONFIG_FILE
                   ) -> Tuple[ml_collections.ConfigDict, List[str]]:
  """This project's config for a transformers ``PerceiverForMaskedLM`` config.json.

  Args:
    hf_config: the parsed config.json.
    source: the file, for messages.

  Returns:
    (ConfigDict for ``transform.masked_lm``, notes on how the computation differs from
    transformers' with this config.json).

  Raises:
    UnsupportedConfigError: naming the field the original model cannot express.
  """
  notes = []
  model_type = hf_config.get('model_type', 'perceiver')
  if model_type != 'perceiver':
    raise UnsupportedConfigError(f"{source}: model_type={model_type!r}, expected 'perceiver'")
  architectures = hf_config.get('architectures') or ['PerceiverForMaskedLM']
  if 'PerceiverForMaskedLM' not in architectures:
    raise UnsupportedConfigError(f'{source}: architectures={architectures!r}; only '
                                 'PerceiverForMaskedLM checkpoints can be converted')
  ints = {f: _int_field(hf_config, f, source) for f in (
      'd_model', 'd_latents', 'num_latents', 'num_blocks', 'num_self_attends_per_block',
      'num_self_attention_heads', 'num_cross_attention_heads', 'vocab_size',
      'max_position_embeddings', 'self_attention_widening_factor',
      'cross_attention_widening_factor')}
  qk = _int_field(hf_config, 'qk_channels', source, allow_none=True)
  v = _int_field(hf_config, 'v_channels', source, allow_none=True)
  shape_for_attn = hf_config.get('cross_attention_shape_for_attention', 'kv')
  if shape_for_attn not in ('q', 'kv'):
    raise UnsupportedConfigError(f"{source}: cross_attention_shape_for_attention="
                                 f"{shape_for_attn!r} must be 'q' or 'kv'")
  query_residual = hf_config.get('use_query_residual', True)
  if not isinstance(query_residual, bool):
    raise UnsupportedConfigError(f'{source}: use_query_residual={query_residual!r} must be '
                                 'true or false')
  activation = hf_config.get('hidden_act', _HF_DEFAULTS['hidden_act'])
  if activation == 'gelu':
    notes.append(f'{source}: hidden_act="gelu" is the exact (erf) GELU in transformers; '
                 'the original model, and this conversion, use the tanh approximation '
                 '(jax.nn.gelu = transformers\' "gelu_new"). Logits differ from '
                 'transformers\' by ~1e-4 relative; they match the original.')
  elif activation not in _TANH_GELUS:
    raise UnsupportedConfigError(
        f'{source}: hidden_act={activation!r}; the original model\'s MLPs use GELU: '
        f'accepted are "gelu" and the tanh forms {", ".join(_TANH_GELUS)}')
  eps = hf_config.get('layer_norm_eps', _HF_DEFAULTS['layer_norm_eps'])
  if eps != _HAIKU_LAYER_NORM_EPS:
    notes.append(f'{source}: layer_norm_eps={eps} is not read by transformers\' Perceiver '
                 '(its LayerNorms use PyTorch\'s default eps 1e-5, which is Haiku\'s); '
                 'nothing to convert.')
  d_model = ints['d_model']
  if d_model % HF_DECODER_HEADS:
    raise UnsupportedConfigError(f'{source}: d_model={d_model} must be divisible by the '
                                 f'text decoder\'s {HF_DECODER_HEADS} heads')
  base = configs.language_mlm().to_dict()
  base.update(vocab_size=ints['vocab_size'], d_model=d_model,
              max_seq_len=ints['max_position_embeddings'])
  base['encoder'] = dict(
      num_self_attends_per_block=ints['num_self_attends_per_block'],
      num_blocks=ints['num_blocks'],
      z_index_dim=ints['num_latents'],
      num_z_channels=ints['d_latents'],
      num_self_attend_heads=ints['num_self_attention_heads'],
      num_cross_attend_heads=ints['num_cross_attention_heads'],
      qk_channels=qk,
      v_channels=v,
      use_query_residual=query_residual,
      cross_attend_widening_factor=ints['cross_attention_widening_factor'],
      self_attend_widening_factor=ints['self_attention_widening_factor'],
      cross_attention_shape_for_attn=shape_for_attn)
  text_decoder = dict(qk_channels=HF_DECODER_QK_CHANNELS, v_channels=d_model,
                      num_heads=HF_DECODER_HEADS,
                      trainable_position_encoding_kwargs=dict(num_channels=d_model))
  base['decoder'].update(text_decoder, output_num_channels=ints['d_latents'],
                         output_index_dims=ints['max_position_embeddings'],
                         num_z_channels=ints['d_latents'])
  base['classifier']['decoder'].update(text_decoder)
  base['classifier']['head_hidden_size'] = d_model
  config = ml_collections.ConfigDict(base)
  try:
    configs.validate(config)
  except ValueError as e:
    raise UnsupportedConfigError(f'{source}: {e}') from e
  return config, notes


def _effective_decoder_channels(config) -> Tuple[int, int]:
  """The decoder's (qk, v) channels as the model resolves them (kv-shaped default)."""
  dec = config.decoder
  qk = dec.get('qk_channels') or config.encoder.num_z_channels
  return qk, dec.get('v_channels') or qk


def hf_config_from(config) -> Tuple[dict, List[str]]:
  """The config.json of ``PerceiverForMaskedLM`` computing what ``config``'s model computes.

  Returns:
    (config.json dict, notes).

  Raises:
    UnsupportedConfigError: naming the field that transformers cannot express.
  """
  configs.validate(config)
  enc, dec = config.encoder, config.decoder
  notes = []

  def refuse(field, value, why):
    raise UnsupportedConfigError(f'config field {field}={value!r}: {why}; transformers\' '
                                 'PerceiverForMaskedLM cannot express it')

  fixed = 'its text decoder is fixed'
  qk, v = _effective_decoder_channels(config)
  if dec.get('position_encoding_type', 'trainable') != 'trainable':
    refuse('decoder.position_encoding_type', dec.position_encoding_type,
           'its decoder queries are trainable positions')
  if dec.get('num_heads', 1) != HF_DECODER_HEADS:
    refuse('decoder.num_heads', dec.get('num_heads', 1), f'{fixed} at {HF_DECODER_HEADS} heads')
  if qk != HF_DECODER_QK_CHANNELS:
    refuse('decoder.qk_channels', dec.get('qk_channels'),
           f'{fixed} at qk_channels={HF_DECODER_QK_CHANNELS}')
  if v != config.d_model:
    refuse('decoder.v_channels', dec.get('v_channels'), f'{fixed} at v_channels=d_model')
  for field, wanted in (('final_project', False), ('use_query_residual', False),
                        ('concat_preprocessed_input', False)):
    default = {'final_project': True}.get(field, False)
    if dec.get(field, default) != wanted:
      refuse(f'decoder.{field}', dec.get(field, default), f'{fixed} with {field}={wanted}')
  if dec.output_index_dims != config.max_seq_len:
    refuse('decoder.output_index_dims', dec.output_index_dims,
           f'{fixed} at one query per input position (max_seq_len={config.max_seq_len})')
  shape_for_attn = enc.get('cross_attention_shape_for_attn', 'kv')
  if config.get('compute_dtype', 'float32') != 'float32':
    notes.append(f'compute_dtype={config.compute_dtype!r}: the exported parameters are '
                 'float32 and transformers computes in its own dtype.')
  hf_config = {
      'architectures': ['PerceiverForMaskedLM'],
      'model_type': 'perceiver',
      'vocab_size': config.vocab_size,
      'd_model': config.d_model,
      'max_position_embeddings': config.max_seq_len,
      'num_latents': enc.z_index_dim,
      'd_latents': enc.num_z_channels,
      'num_blocks': enc.get('num_blocks', 8),
      'num_self_attends_per_block': enc.get('num_self_attends_per_block', 6),
      'num_self_attention_heads': enc.get('num_self_attend_heads', 8),
      'num_cross_attention_heads': enc.get('num_cross_attend_heads', 1),
      'qk_channels': enc.get('qk_channels'),
      'v_channels': enc.get('v_channels'),
      'cross_attention_shape_for_attention': shape_for_attn,
      'self_attention_widening_factor': enc.get('self_attend_widening_factor', 1),
      'cross_attention_widening_factor': enc.get('cross_attend_widening_factor', 1),
      'use_query_residual': bool(enc.get('use_query_residual', True)),
      'hidden_act': 'gelu_new',
      'layer_norm_eps': _HAIKU_LAYER_NORM_EPS,
      'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02,
  }
  return hf_config, notes


# --------------------------------------------------------------------------------------
# The tensor correspondence.

@dataclasses.dataclass(frozen=True)
class _Pair:
  hf: str          # transformers' state-dict name
  module: str      # Haiku module path
  name: str        # Haiku parameter name
  transpose: bool  # an nn.Linear weight: [out, in] in PyTorch, [in, out] in Haiku


_ATTENTION_LINEARS = (('attention.self.query', 'attention/linear'),
                      ('attention.self.key', 'attention/linear_1'),
                      ('attention.self.value', 'attention/linear_2'),
                      ('attention.output.dense', 'attention/linear_3'),
                      ('mlp.dense1', 'mlp/linear'),
                      ('mlp.dense2', 'mlp/linear_1'))
_CROSS_NORMS = (('attention.self.layernorm1', 'layer_norm'),
                ('attention.self.layernorm2', 'layer_norm_1'),
                ('layernorm', 'layer_norm_2'))
_SELF_NORMS = (('attention.self.layernorm1', 'layer_norm'),
               ('layernorm', 'layer_norm_1'))


def _block(hf_prefix, hk_prefix, cross) -> List[_Pair]:
  pairs = []
  for hf_name, hk_name in _ATTENTION_LINEARS:
    pairs.append(_Pair(f'{hf_prefix}.{hf_name}.weight', f'{hk_prefix}/{hk_name}', 'w', True))
    pairs.append(_Pair(f'{hf_prefix}.{hf_name}.bias', f'{hk_prefix}/{hk_name}', 'b', False))
  for hf_name, hk_name in (_CROSS_NORMS if cross else _SELF_NORMS):
    pairs.append(_Pair(f'{hf_prefix}.{hf_name}.weight', f'{hk_prefix}/{hk_name}', 'scale',
                       False))
    pairs.append(_Pair(f'{hf_prefix}.{hf_name}.bias', f'{hk_prefix}/{hk_name}', 'offset',
                       False))
  return pairs


def tensor_pairs(config) -> List[_Pair]:
  """Every (transformers tensor, Haiku parameter) pair of the masked LM, one to one."""
  pairs = [
      _Pair('perceiver.input_preprocessor.embeddings.weight', 'embed', 'embeddings', False),
      _Pair('perceiver.input_preprocessor.position_embeddings.weight',
            'trainable_position_encoding', 'pos_embs', False),
      _Pair('perceiver.embeddings.latents', 'perceiver_encoder/~/trainable_position_encoding',
            'pos_embs', False),
      _Pair('perceiver.decoder.output_position_encodings.position_embeddings',
            'basic_decoder/~/trainable_position_encoding', 'pos_embs', False),
      _Pair('embedding_decoder.bias', 'embedding_decoder', 'bias', False),
  ]
  pairs += _block('perceiver.encoder.cross_attention', 'perceiver_encoder/~/cross_attention',
                  cross=True)
  for i in range(config.encoder.num_self_attends_per_block):
    suffix = '' if i == 0 else f'_{i}'
    pairs += _block(f'perceiver.encoder.self_attends.{i}',
                    f'perceiver_encoder/~/self_attention{suffix}', cross=False)
  pairs += _block('perceiver.decoder.decoding_cross_attention', 'basic_decoder/cross_attention',
                  cross=True)
  hf_names = [p.hf for p in pairs]
  hk_names = [(p.module, p.name) for p in pairs]
  assert len(set(hf_names)) == len(pairs) and len(set(hk_names)) == len(pairs), 'not 1:1'
  return pairs


def _expected(config):
  from perceiver import transform  # pylint: disable=import-outside-toplevel
  return checkpoint.expected_shapes(transform.masked_lm(config), config)


def _format_problems(source, missing, extra, wrong) -> str:
  problems = []
  if missing:
    problems.append(f'missing {len(missing)}: ' + ', '.join(missing[:20]))
  if extra:
    problems.append(f'unexpected {len(extra)}: ' + ', '.join(extra[:20]))
  if wrong:
    problems.append(f'mis-shaped {len(wrong)}: ' + ', '.join(wrong[:20]))
  return f'{source} does not match the model: ' + '; '.join(problems)


def expected_hf_shapes(config) -> Dict[str, tuple]:
  """{transformers tensor name: shape} of ``PerceiverForMaskedLM`` for this config."""
  expected = _expected(config)
  shapes = {}
  for pair in tensor_pairs(config):
    shape = tuple(expected[pair.module][pair.name])
    shapes[pair.hf] = shape[::-1] if pair.transpose else shape
  return shapes


def hf_to_params(tensors: Mapping[str, np.ndarray], config, source='state dict') -> dict:
  """Maps a ``PerceiverForMaskedLM`` state dict onto the masked LM's Haiku parameters.

  Every tensor must be used exactly once and every parameter filled.

  Args:
    tensors: {transformers name: array}.
    config: this project's config (e.g. from ``config_from_hf``).
    source: the file, for messages.

  Returns:
    {module: {name: float32 np.ndarray}}, checked against the model's shapes.

  Raises:
    CheckpointError: naming every missing, unexpected and mis-shaped tensor.
  """
  expected = _expected(config)
  pairs = tensor_pairs(config)
  missing, wrong = [], []
  params: dict = {}
  for pair in pairs:
    want = tuple(expected[pair.module][pair.name])
    want_hf = want[::-1] if pair.transpose else want
    if pair.hf not in tensors:
      missing.append(pair.hf)
      continue
    value = np.asarray(tensors[pair.hf])
    if value.shape != want_hf:
      wrong.append(f'{pair.hf} {list(value.shape)} (expected {list(want_hf)})')
      continue
    value = value.T if pair.transpose else value
    params.setdefault(pair.module, {})[pair.name] = np.ascontiguousarray(value, np.float32)
  extra = sorted(set(tensors) - {p.hf for p in pairs})
  if missing or extra or wrong:
    raise CheckpointError(_format_problems(source, missing, extra, wrong))
  checkpoint.check_params(params, expected, source=source)
  return params


def params_to_hf(params, config) -> Dict[str, np.ndarray]:
  """The inverse of ``hf_to_params``: {transformers name: float32 array}.

  Raises:
    CheckpointError: naming the missing, unexpected or mis-shaped Haiku parameters.
  """
  checkpoint.check_params(params, _expected(config), source='parameters')
  tensors = {}
  for pair in tensor_pairs(config):
    value = np.asarray(params[pair.module][pair.name], np.float32)
    tensors[pair.hf] = np.ascontiguousarray(value.T if pair.transpose else value)
  return tensors


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
  config, notes = config_from_hf(read_hf_config(config_path), source=config_path)
  tensors = read_hf_tensors(weights_path)
  narrow = sorted({str(v.dtype) for v in tensors.values()
                   if v.dtype.kind == 'f' and v.dtype != np.float32})
  if narrow:
    notes.append(f'{weights_path}: {"/".join(narrow)} tensors converted to float32.')
  params = hf_to_params(tensors, config, source=weights_path)
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
    UnsupportedConfigError: naming the config field transformers cannot express.
    CheckpointError: naming missing, unexpected or mis-shaped parameters.
    FileExistsError: ``out_dir`` exists and is a file or a non-empty directory.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  hf_config, notes = hf_config_from(config)
  tensors = params_to_hf(params, config)
  _prepare_destination(out_dir, overwrite)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.', suffix='.tmp', dir=parent)
  try:
    _atomic_write(os.path.join(tmp, CONFIG_FILE),
                  [json.dumps(hf_config, indent=2, sort_keys=True).encode() + b'\n'])
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
