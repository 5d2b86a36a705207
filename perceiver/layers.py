"""Attention building blocks of the Perceiver, named and initialised as in DeepMind's code.

Shapes use B for batch, N for query positions, M for key/value positions, H for heads.

Mixed precision: every module takes ``compute_dtype``. Parameters stay float32; with
``compute_dtype=bfloat16`` the inputs and weights of each matmul are cast to bfloat16 and
the products accumulate in float32, so layer norms, softmax, residuals and the loss all
stay float32. With float32 (the default) the computation is the original's.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp

# The original masks attention logits with -1e30 (float32) before the softmax.
_LARGE = 1e30


def low_precision_dtype(compute_dtype) -> Optional[jnp.dtype]:
  """The dtype to cast matmul inputs to, or None when computing in float32."""
  dtype = jnp.dtype(compute_dtype)
  return None if dtype == jnp.float32 else dtype


def attend(q, k, v, *, attention_mask=None, dropout_prob=0.0, compute_dtype=jnp.float32):
  """Multi-head scaled dot-product attention.

  Args:
    q: [B, N, H, Dqk] queries.
    k: [B, M, H, Dqk] keys.
    v: [B, M, H, Dv] values.
    attention_mask: optional [B, N, M]; nonzero where query n may attend to key m.
    dropout_prob: dropout on the attention weights (applied only if > 0).
    compute_dtype: dtype of the two matmuls' inputs (accumulation is float32).

  Returns:
    [B, N, H * Dv]. A query row whose mask is all zero outputs zeros, as in the original
    (a fully masked softmax row would otherwise average every value uniformly).
  """
  batch, n, heads, d_qk = q.shape
  d_v = v.shape[-1]
  mask = None if attention_mask is None else attention_mask != 0
  if dropout_prob > 0:
    out = _attention_with_dropout(q, k, v, mask, dropout_prob, compute_dtype)
  else:
    out = _attention_core(_heads_major(q), _heads_major(k), _heads_major(v), mask, heads,
                          jnp.dtype(compute_dtype))
  out = out.reshape(batch, heads, n, d_v).transpose(0, 2, 1, 3).reshape(batch, n, heads * d_v)
  if attention_mask is not None:
    nothing_to_attend = jnp.all(attention_mask == 0, axis=2, keepdims=True)  # [B, N, 1]
    out = jnp.where(nothing_to_attend, jnp.zeros_like(out), out)
  return out


def _attention_with_dropout(q, k, v, mask, dropout_prob, compute_dtype):
  """``attend``'s products and softmax with dropout on the weights; [B * H, N, Dv]."""
  batch, n, heads, d_qk = q.shape
  low = low_precision_dtype(compute_dtype)
  if low is not None:
    q, k, v = q.astype(low), k.astype(low), v.astype(low)
  logits = jnp.einsum('xnd,xmd->xnm', _heads_major(q), _heads_major(k),
                      preferred_element_type=jnp.float32)
  weights = _softmax(logits * (1.0 / math.sqrt(d_qk)), mask, heads)
  # Dropout draws over [B, H, N, M], as before heads were merged into the batch.
  weights = hk.dropout(hk.next_rng_key(), dropout_prob, _by_batch(weights, heads)).reshape(
      weights.shape)
  if low is not None:
    weights = weights.astype(low)
  return jnp.einsum('xnm,xmd->xnd', weights, _heads_major(v),
                    preferred_element_type=jnp.float32)


def _by_batch(x, heads):
  """[B * H, N, M] -> [B, H, N, M]."""
  return x.reshape(x.shape[0] // heads, heads, *x.shape[1:])


def _softmax(logits, mask, heads):
  """Softmax over the last axis of [B * H, N, M] logits; masked keys get -1e30 first."""
  if mask is not None:
    logits = jnp.where(mask[:, None], _by_batch(logits, heads), -_LARGE).reshape(logits.shape)
  return jax.nn.softmax(logits)


def _swap(x):
  """[X, A, B] -> [X, B, A], written row-major (see ``opaque``)."""
  return opaque(x, lambda t: t.transpose(0, 2, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention_core(q, k, v, mask, heads, dtype):
  """softmax(q k^T / sqrt(D) [masked]) v for q [X, N, D], k [X, M, D], v [X, M, Dv].

  X is batch x heads; ``mask`` is None or bool [B, N, M]. The products take ``dtype``
  inputs and accumulate in float32; the softmax is float32.

  Why a hand-written backward: JAX derives the four backward products of these batched
  dots with float32 cotangents, in layouts (contracting a transposed operand) that
  XLA:CPU runs on its slow generic path: the released model's attention backward took
  about 0.4 s of a 3.2 s bfloat16 forward+backward pass at batch 4, at 60-200 GFLOP/s.
  Here every product, forward and backward, multiplies row-major operands (transposes
  are written out with ``opaque``), with ``dtype`` inputs. The gradient is the same
  formula (softmax's derivative w * (g - sum(g * w)), masked entries zero), in float32.
  """
  return _attention_core_fwd(q, k, v, mask, heads, dtype)[0]


def _attention_core_fwd(q, k, v, mask, heads, dtype):
  qc, kc, vc = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  logits = jnp.einsum('xnd,xdm->xnm', qc, _swap(kc), preferred_element_type=jnp.float32)
  weights = _softmax(logits * (1.0 / math.sqrt(q.shape[-1])), mask, heads)
  out = jnp.einsum('xnm,xmd->xnd', weights.astype(dtype), vc,
                   preferred_element_type=jnp.float32)
  dtypes = jnp.zeros((0,), q.dtype), jnp.zeros((0,), k.dtype), jnp.zeros((0,), v.dtype)
  return out, (qc, kc, vc, weights, mask, dtypes)


def _attention_core_bwd(heads, dtype, residuals, d_out):
  qc, kc, vc, weights, mask, (q_like, k_like, v_like) = residuals
  d_out = d_out.astype(dtype)
  d_weights = jnp.einsum('xnd,xdm->xnm', d_out, _swap(vc), preferred_element_type=jnp.float32)
  dv = jnp.einsum('xmn,xnd->xmd', _swap(weights.astype(dtype)), d_out,
                  preferred_element_type=jnp.float32)
  d_logits = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
  if mask is not None:
    d_logits = jnp.where(mask[:, None], _by_batch(d_logits, heads), 0.0).reshape(
        d_logits.shape)
  d_logits = (d_logits * (1.0 / math.sqrt(qc.shape[-1]))).astype(dtype)
  dq = jnp.einsum('xnm,xmd->xnd', d_logits, kc, preferred_element_type=jnp.float32)
  dk = jnp.einsum('xmn,xnd->xmd', _swap(d_logits), qc, preferred_element_type=jnp.float32)
  return (dq.astype(q_like.dtype), dk.astype(k_like.dtype), dv.astype(v_like.dtype), None)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def _heads_major(x):
  """[B, N, H, D] -> [B * H, N, D].

  Why: with batch and heads as two batch dimensions, XLA:CPU ran the released model's
  batch-4 attention logits at 35 GFLOP/s (100 ms of a 0.75 s bfloat16 forward pass);
  with one, the bfloat16 forward pass took 0.785 against 0.841 s at batch 4 and 0.210
  against 0.228 s at batch 1 (same process, interleaved). Values are unchanged.
  """
  b, n, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)


def cross_attention_mask(query_mask, kv_mask):
  """[B, N] x [B, M] -> [B, N, M] outer product of two validity masks."""
  return query_mask[:, :, None] * kv_mask[:, None, :]


def layer_norm(x, name=None):
  """Layer norm over the last axis with learned scale and offset (Haiku's eps 1e-5)."""
  return LayerNorm(name=name)(x)


class LayerNorm(hk.Module):
  """``hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)``: the same module
  name, parameters (``scale`` ones, ``offset`` zeros, [C]) and formula, in the same order.

  Only the parameters' gradients are arranged differently (``broadcast_rows``).
  """

  def __init__(self, eps=1e-5, name=None):
    super().__init__(name=name)
    self.eps = eps

  def __call__(self, x):
    """[..., C] -> [..., C]."""
    shape = x.shape
    scale = hk.get_parameter('scale', shape[-1:], x.dtype, init=jnp.ones)
    offset = hk.get_parameter('offset', shape[-1:], x.dtype, init=jnp.zeros)
    # Computed on a [rows, C] view. Why: XLA:CPU differentiated the row reductions of
    # [1, N, C] (batch 1) 4-8x slower than those of [N, C]: 1.26 against 0.33 ms for
    # [1, 256, 1280], 5.7 against 0.69 ms for [1, 2048, 768]; one per layer norm.
    x = x.reshape(-1, shape[-1])
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.var(x, axis=-1, keepdims=True)
    inv = broadcast_rows(scale, x.shape) * jax.lax.rsqrt(
        variance + jax.lax.convert_element_type(self.eps, variance.dtype))
    y = inv * (x - jnp.broadcast_to(mean, x.shape)) + broadcast_rows(offset, x.shape)
    return y.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_rows(v, shape):
  """``jnp.broadcast_to(v, shape)`` for a per-channel ``v`` [C] and ``shape`` [..., C].

  The gradient is the same sum over the leading axes, taken over a [rows, C] view of the
  cotangent. Why: JAX transposes the broadcast into a reduction over the middle axis of
  [1, N, C] at batch 1, which XLA:CPU (its YNNPACK reduce) ran 60x slower than the same
  sum over [N, C] rows: 19 ms against 0.3 ms for [1, 2048, 768], 1.7 against 0.07 ms for
  [1, 256, 1280]. Every bias and layer-norm parameter takes one: 170 ms of the released
  model's 0.9 s bfloat16 forward+backward at batch 1.
  """
  return jnp.broadcast_to(v, shape)


def _broadcast_rows_fwd(v, shape):
  return jnp.broadcast_to(v, shape), None


def _broadcast_rows_bwd(shape, _, cotangent):
  return (jnp.sum(cotangent.reshape(-1, shape[-1]), axis=0),)


broadcast_rows.defvjp(_broadcast_rows_fwd, _broadcast_rows_bwd)


def opaque(x, fn=lambda t: t):
  """``fn(x)`` (default: ``x``), computed into a buffer of its own that XLA cannot see
  through.

  ``fn`` runs inside both branches of a ``lax.cond`` on a predicate only known at run
  time (the second branch flips twice, because XLA turns a conditional whose branches
  are all cheap elementwise ops back into a select); ``fn`` must be cheap, e.g. a
  transpose, which is then written straight into the result.
  What it is for, on XLA:CPU:

  - a fusion boundary (``fusion_barrier``): the ops producing ``x`` cannot be fused into,
    and recomputed by, its consumers;
  - a transposed operand materialised row-major for a dot: XLA otherwise folds the
    transpose into the dot's dimension numbers, a layout its bfloat16 kernels do not take
    (it then upcasts the product to float32). ``jax.lax.optimization_barrier`` does not
    do either: XLA:CPU removes it before fusion and before transpose folding.
  """
  flat = x.reshape(-1)
  always = jnp.logical_not(jnp.isnan(flat[0]) & jnp.isinf(flat[0]))  # unknown to XLA
  return jax.lax.cond(always, fn, lambda t: jnp.flip(jnp.flip(fn(t), -1), -1), x)


def matmul(x, w, compute_dtype=jnp.float32):
  """``x @ w`` for x [..., K], w [K, N], with float32 accumulation and result.

  Both inputs are cast to ``compute_dtype`` first (a no-op in float32). The value is
  ``jnp.dot(x.astype(c), w.astype(c), preferred_element_type=float32)``; only the
  backward pass is arranged differently from JAX's own (see ``_matmul``).
  """
  return _matmul(x, w, jnp.dtype(compute_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, dtype):
  """``matmul`` whose backward multiplies by a row-major copy of the transposed weight.

  Why: JAX's derivative of ``x @ w`` computes ``dx = dy @ w^T`` as a dot contracting the
  weight along its rows, a layout XLA:CPU's dot kernels handle much more slowly: on a
  256x1280 by 1280x1280 product, 211 against 650-790 GFLOP/s in bfloat16 (244 against 404
  in float32 inside the model's backward pass); ``dw = x^T @ dy`` likewise, and in
  bfloat16 XLA even upcasts it to float32. The backward pass therefore writes the (cast)
  transposed weight and the transposed input into buffers of their own (``opaque``) and
  multiplies those. Released model, forward+backward: float32 at batch 4 4.25 -> 3.87 s;
  bfloat16 at batch 1 1.22 -> 0.92 s, at batch 4 3.3 -> 2.3 s (with ``attend``'s own
  backward). The transposed weight is made from the parameter in the backward pass, one
  layer at a time, not saved from the forward pass (0.8 GB less at the same speed).

  Values: the forward pass is the plain product. In float32 the gradients are JAX's up to
  summation order. With bfloat16 the backward products follow the same policy as the
  forward ones (cotangent and weight cast to bfloat16, float32 accumulation, float32
  ``dx``), where JAX's own derivative would round ``dx`` to bfloat16.
  """
  return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _matmul_fwd(x, w, dtype):
  xc = x.astype(dtype)
  y = jnp.dot(xc, w.astype(dtype), preferred_element_type=jnp.float32)
  # The weight itself is the residual (the parameter, no copy); its transpose is written
  # in the backward pass, one layer at a time, rather than kept for every layer.
  # The empty array carries x's dtype (residuals must be arrays).
  return y, (xc, w, jnp.zeros((0,), x.dtype))


def _matmul_bwd(dtype, residuals, dy):
  xc, w, x_like = residuals
  dy = dy.astype(dtype)
  # The barrier keeps XLA from folding the transpose into the dot (it is removed before
  # fusion, by when layout assignment has made the transpose a row-major copy).
  w_t = jax.lax.optimization_barrier(w.T.astype(dtype))
  dx = jnp.dot(dy, w_t, preferred_element_type=jnp.float32)
  rows = lambda a: a.reshape(-1, a.shape[-1])
  dw = jnp.dot(opaque(rows(xc), jnp.transpose), rows(dy), preferred_element_type=jnp.float32)
  return dx.astype(x_like.dtype), dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(hk.Module):
  """A dense layer with the parameters of ``hk.Linear`` (``w`` [in, out], ``b`` [out]).

  Initialised as the original's ``conv_1d``: VarianceScaling(init_scale), fan-in,
  truncated normal; zero bias. ``w_init=None`` keeps Haiku's own default instead.
  """

  def __init__(self, output_size, *, init_scale=1.0, with_bias=True, w_init='variance_scaling',
               compute_dtype=jnp.float32, name=None):
    super().__init__(name=name)
    self.output_size = output_size
    self.with_bias = with_bias
    if w_init == 'variance_scaling':
      w_init = hk.initializers.VarianceScaling(init_scale)
    self.w_init = w_init
    self.compute_dtype = compute_dtype

  def __call__(self, x):
    """[..., in] -> [..., out]."""
    fan_in = x.shape[-1]
    w_init = self.w_init or hk.initializers.TruncatedNormal(1.0 / math.sqrt(fan_in))
    w = hk.get_parameter('w', [fan_in, self.output_size], jnp.float32, init=w_init)
    y = matmul(x, w, self.compute_dtype)
    if self.with_bias:
      b = hk.get_parameter('b', [self.output_size], jnp.float32, init=jnp.zeros)
      y = y + broadcast_rows(b, y.shape)
    return y


class Attention(hk.Module):
  """Multi-headed attention: Q/K/V projections, ``attend``, output projection.

  Its parameters are ``linear`` (Q), ``linear_1`` (K), ``linear_2`` (V), ``linear_3`` (out).
  Channel defaults follow the original: qk from the query input, v from qk, output from v.
  """

  def __init__(self, num_heads=8, init_scale=1.0, with_final_bias=True,
               final_init_scale_multiplier=1.0, dropout_prob=0.0, qk_channels=None,
               v_channels=None, output_channels=None, compute_dtype=jnp.float32, name=None):
    super().__init__(name=name)
    self.num_heads = num_heads
    self.init_scale = init_scale
    self.with_final_bias = with_final_bias
    self.final_init_scale = final_init_scale_multiplier * init_scale
    self.dropout_prob = dropout_prob
    self.qk_channels = qk_channels
    self.v_channels = v_channels
    self.output_channels = output_channels
    self.compute_dtype = compute_dtype

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
                                compute_dtype=self.compute_dtype)
    q = dense(qk_channels)(inputs_q)
    k = dense(qk_channels)(inputs_kv)
    v = dense(v_channels)(inputs_kv)
    heads = lambda x: x.reshape(x.shape[:2] + (self.num_heads, x.shape[-1] // self.num_heads))
    out = attend(heads(q), heads(k), heads(v), attention_mask=attention_mask,
                 dropout_prob=self.dropout_prob, compute_dtype=self.compute_dtype)
    return Linear(output_channels, init_scale=self.final_init_scale,
                  with_bias=self.with_final_bias, compute_dtype=self.compute_dtype)(out)


class MLP(hk.Module):
  """Transformer feed-forward: Linear(widening x C), GELU (tanh form, as jax.nn.gelu), Linear(C)."""

  def __init__(self, widening_factor=4, dropout_prob=0.0, init_scale=1.0,
               compute_dtype=jnp.float32, name=None):
    super().__init__(name=name)
    self.widening_factor = widening_factor
    self.dropout_prob = dropout_prob
    self.init_scale = init_scale
    self.compute_dtype = compute_dtype

  def __call__(self, x, *, is_training):
    """[B, N, C] -> [B, N, C]."""
    channels = x.shape[-1]
    x = Linear(self.widening_factor * channels, init_scale=self.init_scale,
               compute_dtype=self.compute_dtype)(x)
    x = jax.nn.gelu(x)
    x = Linear(channels, init_scale=self.init_scale, compute_dtype=self.compute_dtype)(x)
    return dropout(x, self.dropout_prob, is_training)


def dropout(x, rate, is_training):
  """Dropout at ``rate`` while training; the identity otherwise (no RNG needed)."""
  if is_training and rate > 0:
    return hk.dropout(hk.next_rng_key(), rate, x)
  return x


class SelfAttention(hk.Module):
  """Pre-norm self-attention block: x + Attn(LN(x)), then + MLP(LN(.))."""

  def __init__(self, widening_factor=4, dropout_prob=0.0, dropout_attn_prob=0.0, num_heads=8,
               att_init_scale=1.0, dense_init_scale=1.0, qk_channels=None, v_channels=None,
               compute_dtype=jnp.float32, name=None):
    super().__init__(name=name)
    self.widening_factor = widening_factor
    self.dropout_prob = dropout_prob
    self.dropout_attn_prob = dropout_attn_prob
    self.num_heads = num_heads
    self.att_init_scale = att_init_scale
    self.dense_init_scale = dense_init_scale
    self.qk_channels = qk_channels
    self.v_channels = v_channels
    self.compute_dtype = compute_dtype

  def __call__(self, inputs, *, attention_mask=None, is_training):
    """[B, N, C] -> [B, N, C]."""
    qkv = layer_norm(inputs)
    attention = Attention(
        num_heads=self.num_heads, init_scale=self.att_init_scale,
        qk_channels=self.qk_channels, v_channels=self.v_channels,
        dropout_prob=self.dropout_attn_prob if is_training else 0.0,
        compute_dtype=self.compute_dtype)(qkv, qkv, attention_mask=attention_mask)
    x = inputs + dropout(attention, self.dropout_prob, is_training)
    mlp = MLP(widening_factor=self.widening_factor, dropout_prob=self.dropout_prob,
              init_scale=self.dense_init_scale, compute_dtype=self.compute_dtype)
    return x + mlp(layer_norm(x), is_training=is_training)


class CrossAttention(hk.Module):
  """Pre-norm cross-attention block: [q +] Attn(LN(q), LN(kv)), then + MLP(LN(.)).

  The output has the query's channels. ``shape_for_attn`` picks the default qk width
  from the query ('q') or the key/value ('kv') input when ``qk_channels`` is None.
  """

  def __init__(self, widening_factor=1, dropout_prob=0.0, dropout_attn_prob=0.0, num_heads=8,
               att_init_scale=1.0, dense_init_scale=1.0, shape_for_attn='kv',
               use_query_residual=True, qk_channels=None, v_channels=None,
               compute_dtype=jnp.float32, name=None):
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
    self.compute_dtype = compute_dtype

  def __call__(self, inputs_q, inputs_kv, *, attention_mask=None, is_training):
    """[B, N, Cq], [B, M, Ckv] -> [B, N, Cq]."""
    default_qk = inputs_q.shape[-1] if self.shape_for_attn == 'q' else inputs_kv.shape[-1]
    attention = Attention(
        num_heads=self.num_heads, init_scale=self.att_init_scale,
        dropout_prob=self.dropout_attn_prob if is_training else 0.0,
        qk_channels=self.qk_channels or default_qk, v_channels=self.v_channels,
        output_channels=inputs_q.shape[-1], compute_dtype=self.compute_dtype)(
            layer_norm(inputs_q), layer_norm(inputs_kv), attention_mask=attention_mask)
    attention = dropout(attention, self.dropout_prob, is_training)
    # Without the query residual (decoders whose queries are positions, not content),
    # the block's output is the attention alone.
    x = inputs_q + attention if self.use_query_residual else attention
    mlp = MLP(widening_factor=self.widening_factor, dropout_prob=self.dropout_prob,
              init_scale=self.dense_init_scale, compute_dtype=self.compute_dtype)
    return x + mlp(layer_norm(x), is_training=is_training)


@jax.custom_vjp
def fusion_barrier(x):
  """Identity whose backward pass is a hard boundary for XLA's fusion.

  Why: in the backward pass of a deep pre-norm stack, the elementwise chain that
  accumulates the residual stream's cotangent through each layer's layer norms gets fused
  by XLA:CPU into the next layer's weight-gradient ops and recomputed there, once per
  layer: backward time grows quadratically with depth. A ``lax.cond`` is opaque to
  fusion, so routing the cotangent through one (on a predicate only known at run time)
  materialises it once per layer. ``optimization_barrier`` does not do this on CPU (XLA
  drops it before fusion). The forward pass and every value are unchanged.
  """
  return x


def _fusion_barrier_fwd(x):
  return x, None


def _fusion_barrier_bwd(_, cotangent):
  return (opaque(cotangent),)


fusion_barrier.defvjp(_fusion_barrier_fwd, _fusion_barrier_bwd)
