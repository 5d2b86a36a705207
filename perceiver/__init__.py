"""Perceiver IO for language in JAX/Haiku, faithful to DeepMind's released model."""

from perceiver import configs
from perceiver import layers
from perceiver import model
from perceiver import position_encoding
from perceiver import tokenizer
from perceiver import transform
from perceiver.tokenizer import BytesTokenizer

__version__ = '0.1.0'

__all__ = ['BytesTokenizer', 'configs', 'layers', 'model', 'position_encoding', 'tokenizer',
           'transform']
