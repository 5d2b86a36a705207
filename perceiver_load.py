"""Runs a model exported by ``python -m perceiver.export``, with only ``jax`` and ``safetensors``.

    import perceiver_load
    model = perceiver_load.load('exported/')
    logits = model(input_ids, input_mask)        # numpy or jax int arrays [batch, length]

This module is deliberately outside the ``perceiver`` package: importing anything under
``perceiver`` runs its ``__init__``, which imports Haiku and the whole model code, and the
point of an export is to need neither. ``perceiver.deploy.export`` also copies this file into
every export directory as ``load.py``, so the directory alone is enough to serve the
model (``sys.path.insert(0, 'exported'); import load``).

An export directory holds:

- ``model.jaxexport``: a serialized ``jax.export.Exported``, one program for every
  platform it names (cpu, cuda, tpu by default), taking ``(params, input_ids,
  input_mask)`` with a symbolic batch size and a symbolic length of at most the model's
  window (``max_seq_len``);
- ``params.safetensors``: the parameters, named ``module/name`` as Haiku names them;
- ``export.json``: what the program is (task, labels, window, dtypes, the JAX version
  that wrote it).

Inputs are the byte tokenizer's ids: a byte ``b`` is id ``b + 6``; 0 pads, 1 BOS, 2 EOS,
3 MASK, 4 CLS, 5 SEP (``encode`` applies the rule). ``input_mask`` is 1 on real bytes,
0 on padding. Each new (batch, length) pair compiles once; pad to a few fixed lengths to
avoid recompiling.

Every expected failure raises ``ExportError`` with a one-line message naming the file
or argument: a directory that is not an export, a program the installed JAX cannot run,
a batch of the wrong shape. Run as a command (``python perceiver_load.py DIR --text=...``)
such a failure is one ``error:`` line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

FORMAT = 'perceiver-io-jax-export/1'
MANIFEST = 'export.json'
PROGRAM = 'model.jaxexport'
PARAMS = 'params.safetensors'

# The byte tokenizer (perceiver.model.tokenizer): special ids, then byte b as b + NUM_SPECIAL.
PAD, BOS, EOS, MASK, CLS, SEP = range(6)
NUM_SPECIAL = 6

# JAX's promise for serialized programs (the jax.export documentation): a program
# written by one JAX runs on JAX releases up to 6 months newer (backward compatibility),
# and on releases up to about 1 month older (forward compatibility: StableHLO's window
# is 1 month, JAX's own custom calls 3 weeks), unless it uses newer features.
COMPATIBILITY = ('JAX runs a serialized program from a JAX up to 6 months older, or up '
                 'to about 1 month newer')

# safetensors' dtype names -> numpy dtypes (bfloat16 is ml_dtypes', which jax brings).
_DTYPES = {'F32': np.float32, 'F16': np.float16, 'BF16': jnp.bfloat16, 'F64': np.float64,
           'I32': np.int32, 'I64': np.int64}


class ExportError(ValueError):
  """An expected failure: the message names the file or argument at fault."""


def encode(texts, length=None):
  """Texts (str, UTF-8 encoded, or bytes) -> (input_ids, input_mask), int32 [batch, length].

  Byte ``b`` becomes id ``b + 6``; rows are padded with 0 (mask 0) to ``length``
  (default: the longest text). A text longer than ``length`` is an ``ExportError``.
  """
  rows = [t.encode('utf-8') if isinstance(t, str) else bytes(t) for t in texts]
  length = max((len(r) for r in rows), default=0) if length is None else length
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    if len(row) > length:
      raise ExportError(f'text {i}: {len(row)} bytes, longer than length {length}')
    ids[i, :len(row)] = np.frombuffer(row, np.uint8).astype(np.int32) + NUM_SPECIAL
    mask[i, :len(row)] = 1
  return ids, mask


def decode(ids):
  """Ids -> bytes, dropping special ids (the inverse of ``encode`` on real bytes)."""
  ids = np.asarray(ids).reshape(-1)
  return bytes((ids[ids >= NUM_SPECIAL] - NUM_SPECIAL).astype(np.uint8).tolist())


def read_manifest(directory):
  """``export.json`` of an export directory, checked to be one."""
  path = os.path.join(os.fspath(directory), MANIFEST)
  if not os.path.isdir(directory):
    raise ExportError(f'{directory}: not a directory (an export is a directory written '
                      'by python -m perceiver.export)')
  if not os.path.isfile(path):
    raise ExportError(f'{directory}: not an export (no {MANIFEST}; write one with '
                      'python -m perceiver.export)')
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f'{path}: unreadable: {e}') from e
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    found = manifest.get('format') if isinstance(manifest, dict) else None
    raise ExportError(f'{path}: format {found!r}, expected {FORMAT!r}')
  for field in ('task', 'max_seq_len', 'vocab_size', 'jax_version'):
    if field not in manifest:
      raise ExportError(f'{path}: missing field {field!r}')
  return manifest


def read_params(path):
  """{name: numpy array} from a safetensors file (bfloat16 included)."""
  try:
    with open(path, 'rb') as f:
      tensors = safetensors.deserialize(f.read())
  except FileNotFoundError as e:
    raise ExportError(f'{path}: missing (an export directory holds {PARAMS})') from e
  except Exception as e:  # pylint: disable=broad-except  # safetensors' own error types
    raise ExportError(f'{path}: not a readable safetensors file: {e}') from e
  params = {}
  for name, tensor in tensors:
    if tensor['dtype'] not in _DTYPES:
      raise ExportError(f'{path}: tensor {name!r} has dtype {tensor["dtype"]}, which '
                        'no export writes')
    params[name] = np.frombuffer(tensor['data'], _DTYPES[tensor['dtype']]).reshape(
        tensor['shape'])
  return params


def _check_version(exported, manifest, path):
  """The program's calling convention must be one the installed JAX runs."""
  low = jax.export.minimum_supported_calling_convention_version
  high = jax.export.maximum_supported_calling_convention_version
  version = exported.calling_convention_version
  if not low <= version <= high:
    raise ExportError(
        f'{path}: written by jax {manifest["jax_version"]} with calling convention '
        f'{version}; the installed jax {jax.__version__} runs {low} to {high} '
        f'({COMPATIBILITY}): install a jax within that window of '
        f'{manifest["jax_version"]}, or export again')


def read_program(directory, manifest):
  """The deserialized ``jax.export.Exported``, checked against the installed JAX."""
  path = os.path.join(os.fspath(directory), PROGRAM)
  try:
    with open(path, 'rb') as f:
      blob = bytearray(f.read())
  except FileNotFoundError as e:
    raise ExportError(f'{path}: missing (an export directory holds {PROGRAM})') from e
  try:
    exported = jax.export.deserialize(blob)
  except Exception as e:  # pylint: disable=broad-except  # flatbuffers raises anything
    raise ExportError(f'{path}: not a serialized jax.export program readable by jax '
                      f'{jax.__version__} (written by jax {manifest["jax_version"]}; '
                      f'{COMPATIBILITY}): {type(e).__name__}: {e}') from e
  _check_version(exported, manifest, path)
  here = jax.export.default_export_platform()
  if here not in exported.platforms:
    raise ExportError(f'{path}: exported for {", ".join(exported.platforms)}; this jax runs '
                      f'on {here} (export again with --platforms naming {here})')
  try:
    exported.mlir_module()   # Reads the StableHLO: fails here, not at the first call.
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f'{path}: its StableHLO does not load in jax {jax.__version__} '
                      f'(written by jax {manifest["jax_version"]}; {COMPATIBILITY}): '
                      f'{type(e).__name__}: {e}') from e
  return exported


class Model:
  """An exported model: ``model(input_ids, input_mask) -> outputs`` (a numpy array).

  Outputs: ``masked_lm`` logits [batch, length, vocab]; ``classifier`` logits
  [batch, classes] (``labels[i]`` names output i; one score for a regression); ``encoder``
  latents [batch, latents, channels].
  """

  def __init__(self, directory, manifest, exported, params, device=None):
    self.directory = os.fspath(directory)
    self.manifest = manifest
    self.exported = exported
    self.task = manifest['task']
    self.labels = manifest.get('labels')
    self.max_seq_len = int(manifest['max_seq_len'])
    self.vocab_size = int(manifest['vocab_size'])
    self.params = jax.device_put(params, device)
    self._call = jax.jit(exported.call)

  def check(self, input_ids, input_mask):
    """The inputs as int32 arrays, or an ``ExportError`` naming what is wrong."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, np.int32) if input_mask is None else np.asarray(input_mask)
    if ids.ndim != 2:
      raise ExportError(f'input_ids: shape {ids.shape}, expected [batch, length]')
    if mask.shape != ids.shape:
      raise ExportError(f'input_mask: shape {mask.shape}, expected input_ids\' '
                        f'{ids.shape}')
    batch, length = ids.shape
    if batch < 1 or not 1 <= length <= self.max_seq_len:
      raise ExportError(f'input_ids: shape {ids.shape}: batch must be at least 1 and '
                        f'length 1 to {self.max_seq_len} (the model\'s window)')
    for name, value in (('input_ids', ids), ('input_mask', mask)):
      if not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
        raise ExportError(f'{name}: dtype {value.dtype}, expected integers')
    if ids.min() < 0 or ids.max() >= self.vocab_size:
      raise ExportError(f'input_ids: values from {ids.min()} to {ids.max()}, expected 0 '
                        f'to {self.vocab_size - 1} (byte b is id b + {NUM_SPECIAL})')
    return ids.astype(np.int32), mask.astype(np.int32)

  def __call__(self, input_ids, input_mask=None):
    ids, mask = self.check(input_ids, input_mask)
    return np.asarray(self._call(self.params, ids, mask))


def load(directory, device=None) -> Model:
  """Reads an export directory; returns a ``Model`` (see the module docstring).

  ``device``: where the parameters live (default: JAX's default device).
  """
  manifest = read_manifest(directory)
  exported = read_program(directory, manifest)
  params = read_params(os.path.join(os.fspath(directory), PARAMS))
  expected = exported.in_avals[:len(params)]
  names = sorted(params)
  if len(exported.in_avals) != len(params) + 2 or any(
      tuple(params[n].shape) != tuple(a.shape) or params[n].dtype != a.dtype
      for n, a in zip(names, expected)):
    raise ExportError(f'{os.path.join(os.fspath(directory), PARAMS)}: its tensors do not '
                      f'match the program\'s {len(exported.in_avals) - 2} parameters '
                      '(files from two different exports?)')
  return Model(directory, manifest, exported, params, device)


def main(argv=None) -> int:
  """``python perceiver_load.py DIR --text=...``: what the exported model makes of texts."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('directory', help='an export directory (python -m perceiver.export)')
  parser.add_argument('--text', action='append', default=[],
                      help='a text to run (repeat for a batch); for a masked LM, "_" '
                           'bytes are masked and filled in')
  args = parser.parse_args(argv)
  try:
    model = load(args.directory)
    print(f'{args.directory}: {model.task}, window {model.max_seq_len} bytes, '
          f'platforms {", ".join(model.exported.platforms)}')
    if not args.text:
      return 0
    texts = [t.encode('utf-8') for t in args.text]
    ids, mask = encode(texts)
    if model.task == 'masked_lm':
      ids[ids == ord('_') + NUM_SPECIAL] = MASK
    out = model(ids, mask)
    for i, text in enumerate(texts):
      if model.task == 'masked_lm':
        filled = np.where(ids[i] == MASK, out[i].argmax(-1), ids[i])[:len(text)]
        print(decode(filled).decode('utf-8', errors='replace'))
      elif model.task == 'classifier' and model.labels:
        print(model.labels[int(out[i].argmax())])
      elif model.task == 'classifier':
        print(f'{float(out[i, 0]):.4f}')
      else:
        print(f'latents {out[i].shape}, mean {float(out[i].mean()):.4f}')
    return 0
  except ExportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
