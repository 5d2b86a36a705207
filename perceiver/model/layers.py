"""Attention building blocks of the Perceiver, named and initialised as in DeepMind's code.

Shapes use B for batch, N for query positions, M for key/value positions, H for heads.

Two settings change how a module computes, never its parameters; every module takes
both in one ``Compute`` value (``compute=``), made once per model:

- ``dtype``: with float32 (the default) the arithmetic is the original's. With
  bfloat16 the inputs and weights of each matmul are cast to bfloat16 and the products
  accumulate in float32; parameters, layer norms, softmax, residuals and the loss stay
  float32.
- ``kernels``: ``'reference'`` computes the formulas below, as the original writes them,
  differentiated by JAX; ``'xla_cpu'`` computes the same values with the kernels of
  ``perceiver.model.xla_cpu`` (hand-written backward passes and a fusion boundary that XLA:CPU
  needs to run near its peak, and that would only hold a GPU or TPU back).

A config's ``kernels='auto'`` (the default) is ``xla_cpu`` for a program compiled for the
CPU and ``reference`` for any other; ``Compute.resolve(config, platform)`` resolves it,
and ``platform(device)`` names a device's platform. ``perceiver.transform``'s builders
take the platform (``masked_lm(config, platform='cpu')``, or
``platform=layers.platform()`` for this host's devices); the training and evaluation
commands pass the one of the devices they run on. Where the platform is not known (a
model built and exported from a CPU host for a GPU, or traced on a TPU host's CPU),
'auto' is ``reference``: the clean program, right on every platform. So a model built by
``perceiver.transform`` without a platform computes with the reference formulas in its
config's dtype, and a module built without ``compute`` with the reference formulas in
float32 (``REFERENCE``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver.model import xla_cpu

# The original masks attention logits with -1e30 (float32) before the softmax.
_LARGE = 1e30

KERNELS = ('auto', 'reference', 'xla_cpu')
RESOLVED_KERNELS = ('reference', 'xla_cpu')
COMPUTE_DTYPES = ('float32', 'bfloat16')
# The platforms a program is compiled for, as ``jax.export`` names them.
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def low_precision_dtype(compute_dtype) -> Optional[jnp.dtype]:
  """The dtype to cast matmul inputs to, or None when computing in float32."""
  dtype = jnp.dtype(compute_dtype)
  return None if dtype == jnp.float32 else dtype


def platform(device: Optional[jax.Device] = None) -> str:
  """The platform a program for ``device`` (default: this host's first local device) is
  compiled for, as ``jax.export`` names it: 'cpu', 'tpu', 'cuda' or 'rocm'. What
  ``perceiver.transform``'s ``platform=`` and ``Compute.resolve`` take."""
  device = device or jax.local_devices()[0]
  if device.platform != 'gpu':
    return device.platform
  version = getattr(device.client, 'platform_version', '') or ''
  return 'rocm' if 'rocm' in version.lower() else 'cuda'


def resolve_kernels(kernels: str, platform: Optional[str]) -> str:
  """The kernels a program compiled for ``platform`` ('cpu', 'cuda', 'rocm', 'tpu', or
  None when not known) computes with: 'reference' or 'xla_cpu'."""
  if kernels not in KERNELS:
    raise ValueError(f'kernels must be one of {", ".join(KERNELS)}; got {kernels!r}')
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(f'platform must be one of {", ".join(PLATFORMS)} (or None: not '
                     f'known); got {platform!r}')
  if kernels == 'auto':
    return 'xla_cpu' if platform == 'cpu' else 'reference'
  return kernels


@dataclasses.dataclass(frozen=True)
class Compute:
  """How the modules compute, never what: one value every module of a model receives.

  ``dtype`` is the matmul inputs' dtype (float32 or bfloat16; see the module docstring)
  and ``kernels`` the implementation of the ops, already resolved for the platform the
  program is compiled for: 'reference' or 'xla_cpu', never 'auto'. The default is the
  original's computation (float32, the reference formulas), right on every platform.
  Made once per model from a config (``Compute.resolve``), so that no module, and no
  caller that forgets the platform, can pick another.
  """
  dtype: Any = jnp.float32
  kernels: str = 'reference'

  def __post_init__(self):
    dtype = jnp.dtype(self.dtype)
    if dtype.name not in COMPUTE_DTYPES:
      raise ValueError(f'compute dtype must be one of {", ".join(COMPUTE_DTYPES)}; '
                       f'got {dtype.name!r}')
    if self.kernels not in RESOLVED_KERNELS:
      raise ValueError(f'Compute.kernels must be one of {", ".join(RESOLVED_KERNELS)} '
                       f'(resolved for a platform: see Compute.resolve); got '
                       f'{self.kernels!r}')
    object.__setattr__(self, 'dtype', dtype)   # frozen: normalised once, here

  @classmethod
  def resolve(cls, config, platform: Optional[str] = None) -> 'Compute':
    """From a model config's ``compute_dtype`` and ``kernels``, for a program compiled
    for ``platform`` ('cpu', 'cuda', 'rocm', 'tpu'; None when not known, which resolves
    'auto' to the reference formulas)."""
    return cls(jnp.dtype(config.get('compute_dtype', 'float32')),
               resolve_kernels(config.get('kernels', 'auto'), platform))

  @property
  def low_precision(self) -> Optional[jnp.dtype]:
    """The dtype matmul inputs are cast to, or None in float32."""
    return low_precision_dtype(self.dtype)

  def select(self, reference: Callable, cpu: Callable) -> Callable:
    """The implementation of one op: ``cpu`` under the XLA:CPU kernels, else
    ``reference`` (the two compute the same values)."""
    return cpu if self.kernels == 'xla_cpu' else reference


REFERENCE = Compute()


# --------------------------------------------------------------------------------------
# The reference formulas.

def dense_formula(x, w, b=None, *, dtype=jnp.float32):
  """``x @ w (+ b)`` with ``dtype`` inputs and a float32 result, as ``hk.Linear``."""
  y = jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  return y if b is None else y + b


def layer_norm_formula(x, scale, offset, *, eps):
  """``hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)``'s expression."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  variance = jnp.var(x, axis=-1, keepdims=True)
  inv = scale * jax.lax.rsqrt(variance + jax.lax.convert_element_type(eps, variance.dtype))
  return inv * (x - mean) + offset


def attention_formula(q, k, v, mask=None, *, dtype=jnp.float32, dropout=None):
  """softmax(q k^T / sqrt(D), masked keys at -1e30) v, as the original's ``attend``.

  Args:
    q: [B, N, H, D]; k: [B, M, H, D]; v: [B, M, H, Dv].
    mask: optional bool [B, N, M], True where query n may attend to key m.
    dtype: the products' input dtype (float32 accumulation; the softmax is float32).
    dropout: optional function applied to the attention weights.

  Returns:
    [B, N, H * Dv].
  """
  batch, n, heads, d_qk = q.shape
  low = low_precision_dtype(dtype)
  if low is not None:
    q, k, v = q.astype(low), k.astype(low), v.astype(low)
  attention = jnp.einsum('bthd,bThd->bhtT', q, k, preferred_element_type=jnp.float32)
  attention = attention * (1.0 / math.sqrt(d_qk))
  if mask is not None:
    attention = jnp.where(mask[:, None, :, :], attention, -_LARGE)
  normalized = jax.nn.softmax(attention)
  if dropout is not None:
    normalized = dropout(normalized)
  if low is not None:
    normalized = normalized.astype(low)
  summed = jnp.einsum('bhtT,bThd->bthd', normalized, v, preferred_element_type=jnp.float32)
  return summed.reshape(batch, n, heads * v.shape[-1])


def attend(q, k, v, *, attention_mask=None, dropout_prob=0.0, compute=REFERENCE):
  """Multi-head scaled dot-product attention (``attention_formula``).

  Args:
    q: [B, N, H, Dqk] queries.
    k: [B, M, H, Dqk] keys.
    v: [B, M, H, Dv] values.
    attention_mask: optional [B, N, M]; nonzero where query n may attend to key m.
    dropout_prob: dropout on the attention weights (applied only if > 0).
    compute: the two matmuls' input dtype (accumulation is float32) and the kernels
      (see ``Compute``).

  Returns:
    [B, N, H * Dv]. A query row whose mask is all zero outputs zeros, as in the original
    (a fully masked softmax row would otherwise average every value uniformly).
  """
  mask = None if attention_mask is None else attention_mask != 0
  arrays = (q, k, v) if mask is None else (q, k, v, mask)
  if dropout_prob > 0:
    key = hk.next_rng_key()
    out = attention_formula(*arrays, dtype=compute.dtype,
                            dropout=lambda w: hk.dropout(key, dropout_prob, w))
  else:
    out = compute.select(functools.partial(attention_formula, dtype=compute.dtype),
                         functools.partial(xla_cpu.attention_weighted_values,
                                           dtype=compute.dtype))(*arrays)
  if attention_mask is not None:
    nothing_to_attend = jnp.all(attention_mask == 0, axis=2, keepdims=True)  # [B, N, 1]
    out = jnp.where(nothing_to_attend, jnp.zeros_like(out), out)
  return out


def cross_attention_mask(query_mask, kv_mask):
  """[B, N] x [B, M] -> [B, N, M] outer product of two validity masks."""
  return query_mask[:, :, None] * kv_mask[:, None, :]


def residual_boundary(z, compute=REFERENCE):
  """Where one latent layer's output enters the next: the identity, and with the XLA:CPU
  kernels a fusion boundary for the backward pass (``xla_cpu.fusion_barrier``)."""
  return compute.select(lambda x: x, xla_cpu.fusion_barrier)(z)


# --------------------------------------------------------------------------------------
# Modules.

def layer_norm(x, compute=REFERENCE, name=None):
  """Layer norm over the last axis with learned scale and offset (Haiku's eps 1e-5)."""
  return LayerNorm(compute=compute, name=name)(x)


class LayerNorm(hk.Module):
  """``hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)``: the same module
  name, parameters (``scale`` ones, ``offset`` zeros, [C]) and expression."""

  def __init__(self, eps=1e-5, compute=REFERENCE, name=None):
    super().__init__(name=name)
    self.eps = eps
    self.compute = compute

  def __call__(self, x):
    """[..., C] -> [..., C]."""
    scale = hk.get_parameter('scale', x.shape[-1:], x.dtype, init=jnp.ones)
    offset = hk.get_parameter('offset', x.shape[-1:], x.dtype, init=jnp.zeros)
    return self.compute.select(functools.partial(layer_norm_formula, eps=self.eps),
                               functools.partial(xla_cpu.layer_norm, eps=self.eps))(
                                   x, scale, offset)


class Linear(hk.Module):
  """A dense layer with the parameters of ``hk.Linear`` (``w`` [in, out], ``b`` [out]).

  Initialised as the original's ``conv_1d``: VarianceScaling(init_scale), fan-in,
  truncated normal; zero bias. ``w_init=None`` keeps Haiku's own default instead.
  """

  def __init__(self, output_size, *, init_scale=1.0, with_bias=True, w_init='variance_scaling',
               compute=REFERENCE, name=None):
    super().__init__(name=name)
    self.output_size = output_size
    self.with_bias = with_bias
    if w_init == 'variance_scaling':
      w_init = hk.initializers.VarianceScaling(init_scale)
    self.w_init = w_init
    self.compute = compute

  def __call__(self, x):
    """[..., in] -> [..., out]."""
    fan_in = x.shape[-1]
    w_init = self.w_init or hk.initializers.TruncatedNormal(1.0 / math.sqrt(fan_in))
    arrays = (x, hk.get_parameter('w', [fan_in, self.output_size], jnp.float32, init=w_init))
    if self.with_bias:
      arrays += (hk.get_parameter('b', [self.output_size], jnp.float32, init=jnp.zeros),)
    dtype = self.compute.dtype
    return self.compute.select(functools.partial(dense_formula, dtype=dtype),
                               functools.partial(xla_cpu.dense, dtype=dtype))(*arrays)


class Attention(hk.Module):
  """Multi-headed attention: Q/K/V projections, ``attend``, output projection.

  Its parameters are ``linear`` (Q), ``linear_1`` (K), ``linear_2`` (V), ``linear_3`` (out).
  Channel defaults follow the original: qk from the query input, v from qk, output from v.
  """

  def __init__(self, num_heads=8, init_scale=1.0, with_final_bias=True,
               final_init_scale_multiplier=1.0, dropout_prob=0.0, qk_channels=None,
               v_channels=None, output_channels=None, compute=REFERENCE, name=None):
    super().__init__(name=name)
    self.num_heads = num_heads
    self.init_scale = init_scale
    self.with_final_bias = with_final_bias
    self.final_init_scale = final_init_scale_multiplier * init_scale
    self.dropout_prob = dropout_prob
    self.qk_channels = qk_channels
    self.v_channels = v_channels
    self.output_channels = output_channels
    self.compute = compute

  def __call__(self, inputs_q, inputs_kv, attention_mask=None):
    """[B, N, Cq], [B, M, Ckv] -> [B, N, output_channels]."""
    qk_channels = self.qk_channels or inputs_q.shape[-1]
    v_channels = self.v_channels or qk_channels
    output_channels = self.output_channels or v_channels
    for what, channels in (('qk_channels', qk_channels), ('v_channels', v_channels)):
      if channels % self.num_heads:
        raise ValueError(f'{what} ({channels}) must be divisible by num_heads '
                         f'({self.num_heads}).')
    dense = lambda size: Linear(size, init_scale=self.init_scale,
                                compute=self.compute)
    q = dense(qk_channels)(inputs_q)
    k = dense(qk_channels)(inputs_kv)
    v = dense(v_channels)(inputs_kv)
    heads = lambda x: x.reshape(x.shape[:2] + (self.num_heads, x.shape[-1] // self.num_heads))
    out = attend(heads(q), heads(k), heads(v), attention_mask=attention_mask,
                 dropout_prob=self.dropout_prob, compute=self.compute)
    return Linear(output_channels, init_scale=self.final_init_scale,
                  with_bias=self.with_final_bias, compute=self.compute)(out)


class MLP(hk.Module):
  """Transformer feed-forward: Linear(widening x C), GELU (tanh form, as jax.nn.gelu), Linear(C)."""

  def __init__(self, widening_factor=4, dropout_prob=0.0, init_scale=1.0,
               compute=REFERENCE, name=None):
    super().__init__(name=name)
    self.widening_factor = widening_factor
    self.dropout_prob = dropout_prob
    self.init_scale = init_scale
    self.compute = compute

  def __call__(self, x, *, is_training):
    """[B, N, C] -> [B, N, C]."""
    channels = x.shape[-1]
    dense = lambda size: Linear(size, init_scale=self.init_scale, compute=self.compute)
    x = jax.nn.gelu(dense(self.widening_factor * channels)(x))
    return dropout(dense(channels)(x), self.dropout_prob, is_training)


def dropout(x, rate, is_training):
  """Dropout at ``rate`` while training; the identity otherwise (no RNG needed)."""
  if is_training and rate > 0:
    return hk.dropout(hk.next_rng_key(), rate, x)
  return x


class SelfAttention(hk.Module):
  """Pre-norm self-attention block: x + Attn(LN(x)), then + MLP(LN(.))."""

  def __init__(self, widening_factor=4, dropout_prob=0.0, dropout_attn_prob=0.0, num_heads=8,
               att_init_scale=1.0, dense_init_scale=1.0, qk_channels=None, v_channels=None,
               compute=REFERENCE, name=None):
    super().__init__(name=name)
    self.widening_factor = widening_factor
    self.dropout_prob = dropout_prob
    self.dropout_attn_prob = dropout_attn_prob
    self.num_heads = num_heads
    self.att_init_scale = att_init_scale
    self.dense_init_scale = dense_init_scale
    self.qk_channels = qk_channels
    self.v_channels = v_channels
    self.compute = compute

  def __call__(self, inputs, *, attention_mask=None, is_training):
    """[B, N, C] -> [B, N, C]."""
    qkv = layer_norm(inputs, self.compute)
    attention = Attention(
        num_heads=self.num_heads, init_scale=self.att_init_scale,
        qk_channels=self.qk_channels, v_channels=self.v_channels,
        dropout_prob=self.dropout_attn_prob if is_training else 0.0,
        compute=self.compute)(qkv, qkv, attention_mask=attention_mask)
    x = inputs + dropout(attention, self.dropout_prob, is_training)
    mlp = MLP(widening_factor=self.widening_factor, dropout_prob=self.dropout_prob,
              init_scale=self.dense_init_scale, compute=self.compute)
    return x + mlp(layer_norm(x, self.compute), is_training=is_training)


class CrossAttention(hk.Module):
  """Pre-norm cross-attention block: [q +] Attn(LN(q), LN(kv)), then + MLP(LN(.)).

  The output has the query's channels. ``shape_for_attn`` picks the default qk width
  from the query ('q') or the key/value ('kv') input when ``qk_channels`` is None.
  """

  def __init__(self, widening_factor=1, dropout_prob=0.0, dropout_attn_prob=0.0, num_heads=8,
               att_init_scale=1.0, dense_init_scale=1.0, shape_for_attn='kv',
               use_query_residual=True, qk_channels=None, v_channels=None,
               compute=REFERENCE, name=None):
    super().__init__(name=name)
    if shape_for_attn not in ('q', 'kv'):
      raise ValueError(f"shape_for_attn must be 'q' or 'kv', got {shape_for_attn!r}")
    self.widening_factor = widening_factor
    self.dropout_prob = dropout_prob
    self.dropout_attn_prob = dropout_attn_prob
    self.num_heads = num_heads
    self.att_init_scale = att_init_scale
    self.dense_init_scale = dense_init_scale
    self.shape_for_attn = shape_for_attn
    self.use_query_residual = use_query_residual
    self.qk_channels = qk_channels
    self.v_channels = v_channels
    self.compute = compute

  def __call__(self, inputs_q, inputs_kv, *, attention_mask=None, is_training):
    """[B, N, Cq], [B, M, Ckv] -> [B, N, Cq]."""
    default_qk = inputs_q.shape[-1] if self.shape_for_attn == 'q' else inputs_kv.shape[-1]
    attention = Attention(
        num_heads=self.num_heads, init_scale=self.att_init_scale,
        dropout_prob=self.dropout_attn_prob if is_training else 0.0,
        qk_channels=self.qk_channels or default_qk, v_channels=self.v_channels,
        output_channels=inputs_q.shape[-1], compute=self.compute)(
            layer_norm(inputs_q, self.compute), layer_norm(inputs_kv, self.compute),
            attention_mask=attention_mask)
    attention = dropout(attention, self.dropout_prob, is_training)
    # Without the query residual (decoders whose queries are positions, not content),
    # the block's output is the attention alone.
    x = inputs_q + attention if self.use_query_residual else attention
    mlp = MLP(widening_factor=self.widening_factor, dropout_prob=self.dropout_prob,
              init_scale=self.dense_init_scale, compute=self.compute)
    return x + mlp(layer_norm(x, self.compute), is_training=is_training)
