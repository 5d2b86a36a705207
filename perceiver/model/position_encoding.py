"""Trainable position encodings, as in DeepMind's ``position_encoding.py``."""

from __future__ import annotations

import math

import haiku as hk
import jax.numpy as jnp


def sinusoid_init(scale: float = 1.0, max_wavelength: float = 10_000.0):
  """An initialiser for [positions, channels] tables: ``scale`` x sines and cosines of the
  position at geometrically spaced wavelengths (2 pi to 2 pi x ``max_wavelength``), as in
  the Transformer's fixed encoding. This project's option: neighbouring rows start
  similar, so what is learned for one position carries to its neighbours."""

  def init(shape, dtype):
    positions, channels = shape
    half = channels // 2
    inv_freq = 1.0 / (max_wavelength ** (jnp.arange(half, dtype=jnp.float32) / max(half, 1)))
    angles = jnp.arange(positions, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    table = jnp.zeros(shape, jnp.float32)
    table = table.at[:, 0:2 * half:2].set(jnp.sin(angles))
    table = table.at[:, 1:2 * half:2].set(jnp.cos(angles))
    return (scale * table).astype(dtype)

  return init


INITS = ('truncated_normal', 'sinusoid')


class TrainablePositionEncoding(hk.Module):
  """A learned [index_dim, num_channels] table ``pos_embs``, truncated-normal initialised.

  ``init='sinusoid'`` (this project's option; the same parameter) starts it from
  ``sinusoid_init(init_scale)`` instead.
  """

  def __init__(self, index_dim, num_channels=128, init_scale=0.02, init='truncated_normal',
               name=None):
    super().__init__(name=name)
    if init not in INITS:
      raise ValueError(f'position encoding init must be one of {", ".join(INITS)}, '
                       f'got {init!r}')
    self.index_dim = int(index_dim)
    self.num_channels = num_channels
    self.init_scale = init_scale
    self.init = init

  def __call__(self, batch_size=None, positions=None):
    """Returns the table, optionally gathered and broadcast over a batch.

    Args:
      batch_size: if given, the result is broadcast to [batch_size, ...].
      positions: optional int indices, [L] or [B, L], into the table; the result then
        has their rows ([L, C] or [B, L, C]); otherwise all ``index_dim`` rows.

    Returns:
      [index_dim | L, C], or with a leading batch axis.
    """
    table = hk.get_parameter(
        'pos_embs', [self.index_dim, self.num_channels], jnp.float32,
        init=(sinusoid_init(self.init_scale) if self.init == 'sinusoid' else
              hk.initializers.TruncatedNormal(stddev=self.init_scale)))
    out = table if positions is None else jnp.take(table, positions, axis=0)
    if batch_size is not None and out.ndim == 2:
      out = jnp.broadcast_to(out[None], (batch_size,) + out.shape)
    return out


def build_position_encoding(position_encoding_type, index_dims, project_pos_dim=-1,
                            trainable_position_encoding_kwargs=None,
                            fourier_position_encoding_kwargs=None, name=None):
  """Builds the decoder's query encoding from the original's keyword arguments.

  Only 'trainable' is implemented: it is the one the language model uses. Fourier
  features and projected encodings belong to the original's image/video/flow models.
  """
  del fourier_position_encoding_kwargs  # Only meaningful for 'fourier'.
  if position_encoding_type != 'trainable':
    raise ValueError(
        f"position_encoding_type={position_encoding_type!r} is not supported by this "
        "language implementation; use 'trainable' (or 'none' and pass queries).")
  if project_pos_dim > 0:
    raise ValueError('project_pos_dim is not supported with trainable encodings here; '
                     'set the width with trainable_position_encoding_kwargs.num_channels.')
  if trainable_position_encoding_kwargs is None:
    raise ValueError("position_encoding_type='trainable' needs "
                     'trainable_position_encoding_kwargs (e.g. {"num_channels": 768}).')
  dims = index_dims if isinstance(index_dims, (tuple, list)) else (index_dims,)
  return TrainablePositionEncoding(index_dim=math.prod(dims), name=name,
                                   **trainable_position_encoding_kwargs)
