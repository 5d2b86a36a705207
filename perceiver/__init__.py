"""Perceiver IO for language in JAX/Haiku, faithful to DeepMind's released model.

The submodules are imported on first use (``perceiver.configs``, ``perceiver.transform``,
...), not by ``import perceiver``: a command imports ``perceiver.signal_guard`` before
anything else, so a signal during the seconds JAX takes to import is already handled; and
a process needing only a light module -- a data worker importing ``perceiver.errors`` and
``perceiver.tokenizer`` (``train/workers.py``) -- starts without importing JAX and Haiku.
"""

import importlib

__version__ = '0.1.0'

__all__ = ['BytesTokenizer', 'configs', 'layers', 'model', 'position_encoding', 'tokenizer',
           'transform']

_SUBMODULES = ('configs', 'layers', 'model', 'position_encoding', 'tokenizer', 'transform')


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f'{__name__}.{name}')
  if name == 'BytesTokenizer':
    return importlib.import_module(f'{__name__}.tokenizer').BytesTokenizer
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES) + ['BytesTokenizer'])
