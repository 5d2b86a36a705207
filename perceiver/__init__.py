"""Perceiver IO for language in JAX/Haiku, faithful to DeepMind's released model.

The submodules are imported on first use (``perceiver.configs``, ``perceiver.transform``,
...), not by ``import perceiver``: a command imports ``perceiver.signal_guard`` before
anything else, so a signal during the seconds JAX takes to import is already handled.
"""

import importlib

__version__ = '0.1.0'

__all__ = ['BytesTokenizer', 'configs', 'layers', 'model', 'position_encoding', 'tokenizer',
           'transform']


def __getattr__(name):
  if name == 'BytesTokenizer':
    return importlib.import_module('perceiver.tokenizer').BytesTokenizer
  if name in __all__:
    return importlib.import_module(f'perceiver.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
