"""Perceiver IO for language in JAX/Haiku, faithful to DeepMind's released model.

The package by concern, each a folder:
- ``perceiver.configs``, ``perceiver.transform``: the public face -- the model's configs
  as plain data, and the pure ``init``/``apply`` functions research code imports;
- ``perceiver.model``: the Haiku modules, the byte tokenizer, the position encodings, the
  XLA:CPU kernels and the FLOP count;
- ``perceiver.params``: parameter files and conversions (this project's ``.npz``,
  DeepMind's pickle, Hugging Face, run checkpoints read on one host, ``load_any``);
- ``perceiver.deploy``: ``jax.export`` artifacts and the ONNX route;
- ``perceiver.command``: command plumbing (start-up, signals, the one-line errors, atomic
  writes);
- ``perceiver.training``: the training library every task shares.
The modules beside ``configs`` and ``transform`` are commands
(``python -m perceiver.fill_mask | convert | export | onnx_route | verify_released``).

The submodules are imported on first use, not by ``import perceiver``: a command imports
``perceiver.command.signal_guard`` before anything else, so a signal during the seconds
JAX takes to import is already handled; and a process needing only a light module -- a
data worker importing ``perceiver.command.errors`` and ``perceiver.model.tokenizer``
(``train/workers.py``) -- starts without importing JAX and Haiku.
"""

import importlib

__version__ = '0.1.0'

__all__ = ['BytesTokenizer', 'configs', 'transform']

_SUBMODULES = ('configs', 'transform', 'model', 'params', 'deploy', 'command', 'training')


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f'{__name__}.{name}')
  if name == 'BytesTokenizer':
    return importlib.import_module(f'{__name__}.model.tokenizer').BytesTokenizer
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES) + ['BytesTokenizer'])
