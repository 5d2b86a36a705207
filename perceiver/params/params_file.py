"""The parameter file formats: DeepMind's released pickle (read safely) and this project's ``.npz``.

The project's format is one file, a zip (``.npz``-compatible: ``np.load`` opens it) of
``.npy`` arrays plus ``metadata.json``; no pickle is written or read:

- ``params/<module path>/<name>.npy``: the Haiku parameters.
- ``trees/<name>/<leaf index>.npy``: optional extra pytrees (optimizer state, RNG key),
  restored against a template of the same structure with ``load_tree``.
- ``metadata.json``: ``{"format": ..., "config": {...}, "metadata": {...}}``.

Writes are atomic: a temporary file in the same directory, flushed and fsynced, then
renamed over the target, so a crash or ``kill -9`` mid-write leaves the previous file
intact. DeepMind's pickle is read through an unpickler that admits numpy arrays and plain
containers only; anything else (a pickle that would call a function) is refused before
it runs.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from perceiver.command import atomic
from perceiver.command import errors
from perceiver import configs
from perceiver import transform

FORMAT = 'perceiver-io-checkpoint/1'
_METADATA = 'metadata.json'

Params = Mapping[str, Mapping[str, Any]]


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint file is unreadable, unsafe, or does not match the model."""


class CheckpointMismatch(CheckpointError):
  """A checkpoint that reads, but holds arrays of other shapes or structure than the
  model or optimizer it is loaded into (not damage: another run's checkpoint)."""


# --------------------------------------------------------------------------------------
# DeepMind's pickle.

# (module, name) pairs a numpy-array pickle needs, in numpy 1.x and 2.x spellings.
_SAFE_GLOBALS = frozenset({
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),   # arrays under pickle protocol 5
    ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('collections', 'OrderedDict'),
    ('_codecs', 'encode'),   # how protocol 2 spells a bytes object (str -> latin-1 bytes)
})


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) in _SAFE_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f'refused to load global {module}.{name}: only numpy arrays and plain containers '
        'are allowed in a parameter pickle')


def load_deepmind_pickle(path, config=None) -> dict:
  """Reads ``language_perceiver_io_bytes.pickle`` (module -> name -> array) safely.

  Args:
    path: the pickle file.
    config: if given, every parameter path and shape is checked against the masked LM
      this config builds (see ``check_params``).

  Returns:
    The parameters as a nested dict of numpy arrays.

  Raises:
    CheckpointError: naming the file, when it is not a safe parameter pickle or does
      not match the config.
  """
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      raw = _RestrictedUnpickler(f).load()
  except OSError as e:
    raise CheckpointError(f'{path}: cannot read: {e}') from e
  except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
          TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: not a safe parameter pickle: {e}') from e
  params = _as_params(raw, path)
  if config is not None:
    check_params(params, expected_shapes(transform.masked_lm(config), config), source=path)
  return params


def _as_params(raw, source) -> dict:
  if not isinstance(raw, Mapping):
    raise CheckpointError(f'{source}: expected a dict of modules, got {type(raw).__name__}')
  params = {}
  for module, leaves in raw.items():
    if not isinstance(module, str) or not isinstance(leaves, Mapping):
      raise CheckpointError(f'{source}: entry {module!r} is not module name -> dict')
    params[module] = {}
    for name, value in leaves.items():
      if not isinstance(value, np.ndarray) or value.dtype == object:
        raise CheckpointError(f'{source}: {module}/{name} is not a numeric numpy array '
                              f'({type(value).__name__})')
      params[module][name] = value
  return params


# --------------------------------------------------------------------------------------
# Checking a parameter tree.

def expected_shapes(transformed, config, num_positions=None) -> dict:
  """The {module: {name: shape}} an ``hk.Transformed`` of this project creates."""
  length = num_positions or min(config.max_seq_len, 8)
  ids = jax.ShapeDtypeStruct((1, length), np.int32)
  shapes = jax.eval_shape(lambda i: transformed.init(jax.random.PRNGKey(0), i, None), ids)
  return {m: {n: tuple(v.shape) for n, v in leaves.items()} for m, leaves in shapes.items()}


def check_params(params: Params, expected: Mapping[str, Mapping[str, tuple]],
                 source='parameters') -> None:
  """Raises CheckpointError listing every missing, unexpected and mis-shaped parameter."""
  have = {f'{m}/{n}': tuple(np.shape(v)) for m, leaves in params.items()
          for n, v in leaves.items()}
  want = {f'{m}/{n}': tuple(s) for m, leaves in expected.items() for n, s in leaves.items()}
  problems = []
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  if missing:
    problems.append(f'missing {len(missing)}: ' + ', '.join(missing[:20]))
  if extra:
    problems.append(f'unexpected {len(extra)}: ' + ', '.join(extra[:20]))
  if wrong:
    problems.append(f'mis-shaped {len(wrong)}: ' + ', '.join(
        f'{k} {list(have[k])} (expected {list(want[k])})' for k in wrong[:20]))
  if problems:
    raise CheckpointError(f'{source} does not match the model: ' + '; '.join(problems))


# --------------------------------------------------------------------------------------
# The project's own format.

def jsonable(value, what):
  """``value`` as JSON reads it back (a TypeError naming ``what`` if it is not JSON):
  the metadata of this format and of a run's checkpoints
  (``perceiver.training.run_checkpoints``)."""
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise TypeError(f'checkpoint {what} must be JSON-serialisable: {e}') from e


def _write_npy(zf: zipfile.ZipFile, name: str, array) -> None:
  array = np.asarray(array)
  if array.dtype == object:
    raise TypeError(f'{name}: object arrays cannot be saved')
  with zf.open(name, 'w', force_zip64=True) as f:
    np.lib.format.write_array(f, array, allow_pickle=False)


def _read_npy(zf: zipfile.ZipFile, name: str, source: str, expected_shape=None
              ) -> np.ndarray:
  """One ``.npy`` entry, its header checked before any data is read.

  The header's shape and dtype must account for the entry's declared size exactly (a
  header claiming 10^12 elements, or data past the declared end, is refused), and match
  ``expected_shape`` when given, so nothing is read or inflated beyond what the model
  needs.
  """
  try:
    info = zf.getinfo(name)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
      raise CheckpointError(f'{source}: entry {name} uses an unsupported compression')
    with zf.open(name) as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                     np.lib.format.read_array_header_2_0)
      shape, fortran_order, dtype = read_header(f)
      header_size = f.tell()
      if dtype.hasobject:
        raise CheckpointError(f'{source}: entry {name} holds Python objects')
      size = math.prod(shape) * dtype.itemsize
      if header_size + size != info.file_size:
        raise CheckpointError(
            f'{source}: entry {name} declares {list(shape)} {dtype} ({size:,} bytes), but '
            f'the file holds {info.file_size - header_size:,} bytes for it')
      if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise CheckpointMismatch(f'{source}: entry {name} has shape {list(shape)}, the '
                                 f'model needs {list(expected_shape)}')
      data = f.read(size)
  except CheckpointError:
    raise
  except (ValueError, KeyError, zipfile.BadZipFile, OSError, EOFError) as e:
    raise CheckpointError(f'{source}: entry {name} is unreadable: {e}') from e
  if len(data) != size:
    raise CheckpointError(f'{source}: entry {name} is truncated')
  array = np.frombuffer(data, dtype=dtype)
  if fortran_order:
    return array.reshape(shape[::-1]).transpose().copy()
  return array.reshape(shape).copy()


def check_finite(params: Params, source='parameters') -> None:
  """Raises CheckpointError naming the first parameters that hold NaN or infinity."""
  bad = [f'{module}/{name}' for module in sorted(params) for name in sorted(params[module])
         if np.issubdtype(np.asarray(params[module][name]).dtype, np.inexact)
         and not np.isfinite(params[module][name]).all()]
  if bad:
    raise CheckpointError(f'{source}: non-finite values (NaN or infinity) in '
                          f'{len(bad)} parameter(s): {", ".join(bad[:10])}')


def save(path, params: Params, config, *, trees: Mapping[str, Any] | None = None,
         **metadata) -> str:
  """Writes params (+ config, optional pytrees, JSON metadata) atomically to ``path``.

  Args:
    path: the checkpoint file (conventionally ``*.npz``); its directory is created.
    params: {module: {name: array}}, e.g. from ``init``.
    config: the model ConfigDict (or dict) that builds these params.
    trees: optional {name: pytree of arrays}, e.g. {'opt_state': ..., 'rng': key}.
    **metadata: JSON-serialisable values (step, data position, ...).

  Returns:
    ``path``.
  """
  path = os.fspath(path)
  config_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  header = {'format': FORMAT, 'config': jsonable(config_dict, 'config'),
            'metadata': jsonable(metadata, 'metadata'), 'trees': {}}
  with atomic.atomic_write(path) as raw:
    with zipfile.ZipFile(raw, 'w', zipfile.ZIP_STORED) as zf:
      for module in sorted(params):
        for name in sorted(params[module]):
          _write_npy(zf, f'params/{module}/{name}.npy', jax.device_get(params[module][name]))
      for tree_name, tree in (trees or {}).items():
        leaves, treedef = jax.tree.flatten(tree)
        header['trees'][tree_name] = {'num_leaves': len(leaves), 'treedef': str(treedef)}
        for i, leaf in enumerate(leaves):
          _write_npy(zf, f'trees/{tree_name}/{i}.npy', _plain_array(leaf))
      zf.writestr(_METADATA, json.dumps(header, indent=1, sort_keys=True))
  return path


def _plain_array(leaf):
  """Typed PRNG keys are stored as their raw uint32 data."""
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(jax.device_get(leaf))


def _open(path) -> zipfile.ZipFile:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such checkpoint')
  try:
    return zipfile.ZipFile(path, 'r')
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(f'{path}: not a {FORMAT} file: {e}') from e


def _header(zf, source) -> dict:
  try:
    header = json.loads(zf.read(_METADATA))
  except (KeyError, ValueError) as e:
    raise CheckpointError(f'{source}: missing or corrupt {_METADATA}: {e}') from e
  if not isinstance(header, dict) or header.get('format') != FORMAT:
    got = header.get('format') if isinstance(header, dict) else None
    raise CheckpointError(f'{source}: format {got!r}, expected {FORMAT!r}')
  if not isinstance(header.get('config'), dict):
    raise CheckpointError(f'{source}: {_METADATA} holds no model config (its "config" '
                          'entry is missing or not an object)')
  for key, kind in (('metadata', dict), ('trees', dict)):
    if not isinstance(header.setdefault(key, kind()), kind):
      raise CheckpointError(f'{source}: {_METADATA}: "{key}" is not an object')
  return header


_PARAM_ENTRY = re.compile(r'^params/(.+)/([^/]+)\.npy$')


def _model_shapes(config, metadata) -> Optional[dict]:
  """The {module: {name: shape}} the stored config builds (a classifier when the metadata
  has ``num_outputs``, a token classifier when it has ``token_labels``), or None when
  the config builds no model of this project."""
  try:
    if isinstance(metadata, dict) and metadata.get('token_labels'):
      return expected_shapes(
          transform.token_classifier(config, len(metadata['token_labels'])), config)
    if isinstance(metadata, dict) and metadata.get('num_outputs'):
      return expected_shapes(transform.classifier(config, int(metadata['num_outputs'])),
                             config)
    return expected_shapes(transform.masked_lm(config), config)
  except Exception:  # pylint: disable=broad-except  # any config a model rejects
    return None


def load(path):
  """Reads a checkpoint written by ``save``.

  Each parameter's declared shape is checked against the model its stored config builds
  before its data is read, and non-finite values are refused.

  Returns:
    (params {module: {name: np.ndarray}}, config ConfigDict, metadata dict).
  """
  source = os.fspath(path)
  with _open(path) as zf:
    header = _header(zf, source)
    config = configs.upgrade(ml_collections.ConfigDict(header['config']))
    shapes = _model_shapes(config, header['metadata']) or {}
    params: dict = {}
    for name in zf.namelist():
      match = _PARAM_ENTRY.match(name)
      if match:
        module, leaf = match.group(1), match.group(2)
        expected = shapes.get(module, {}).get(leaf)
        params.setdefault(module, {})[leaf] = _read_npy(zf, name, source, expected)
  if not params:
    raise CheckpointError(f'{source}: contains no parameters')
  check_finite(params, source)
  return params, config, header['metadata']


def load_config(path):
  """The model config of a checkpoint, without reading its arrays."""
  source = os.fspath(path)
  with _open(path) as zf:
    header = _header(zf, source)
  return configs.upgrade(ml_collections.ConfigDict(header['config']))


def load_tree(path, name: str, template):
  """Restores the pytree saved as ``trees[name]`` into the structure of ``template``."""
  source = os.fspath(path)
  with _open(path) as zf:
    header = _header(zf, source)
    info = header['trees'].get(name)
    if info is None:
      raise CheckpointError(f'{source}: has no saved tree {name!r} '
                            f'(has: {", ".join(header["trees"]) or "none"})')
    leaves, treedef = jax.tree.flatten(template)
    if len(leaves) != info['num_leaves']:
      raise CheckpointMismatch(f'{source}: tree {name!r} has {info["num_leaves"]} leaves, '
                               f'this run\'s {len(leaves)} (written with another model or '
                               'optimizer?)')
    restored = []
    for i, like in enumerate(leaves):
      key = isinstance(like, jax.Array) and jax.dtypes.issubdtype(like.dtype,
                                                                  jax.dtypes.prng_key)
      value = _read_npy(zf, f'trees/{name}/{i}.npy', source,
                        None if key else np.shape(like))
      if key:
        value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
      restored.append(value)
  return jax.tree.unflatten(treedef, restored)


def is_own_checkpoint(path) -> bool:
  """Whether ``path`` is a zip file (this project's format), whole or not: a truncated
  one is still recognised by its first bytes, so it is reported as a damaged checkpoint
  rather than tried as a pickle."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    return False
  try:
    with open(path, 'rb') as f:
      return f.read(4) == b'PK\x03\x04' or zipfile.is_zipfile(path)
  except OSError:
    return False
