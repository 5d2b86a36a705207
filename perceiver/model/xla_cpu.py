"""Kernels arranged for XLA:CPU: the same values as ``layers``' reference formulas.

Every function here computes what its counterpart in ``perceiver.model.layers`` computes (the
original's formula, differentiated by JAX) and only arranges the work differently, so
that XLA:CPU's kernels run at their peak: backward passes written by hand on row-major
operands, parameter-gradient reductions over [rows, C] views, and a fusion boundary
between layers in the backward pass. None of it helps a GPU or TPU, and some of it would
hurt there (a conditional on a run-time predicate, optimization barriers), so
``layers`` uses these functions only for a program compiled for the CPU
(``kernels='auto'`` resolved for 'cpu') or when asked to (``kernels='xla_cpu'``).

What each arrangement bought on the benchmark CPU is in ``bench/RESULTS.md`` ("Why the
XLA:CPU kernels"). Each function takes the arrays its reference formula takes, static
settings as keyword arguments.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# The original masks attention logits with -1e30 (float32) before the softmax.
_LARGE = 1e30


# --------------------------------------------------------------------------------------
# Materialising a value: a fusion boundary, or a transposed operand written row-major.

def opaque(x, fn=lambda t: t):
  """``fn(x)`` (default: ``x``), computed into a buffer of its own that XLA cannot see
  through.

  ``fn`` runs inside both branches of a ``lax.cond`` on a predicate known only at run
  time (the second branch flips twice, because XLA turns a conditional whose branches are
  all cheap elementwise ops back into a select); ``fn`` must be cheap, e.g. a transpose,
  which is then written straight into the result. It serves as a fusion boundary (the ops
  producing ``x`` are not fused into, and recomputed by, its consumers) and to write a
  transposed dot operand row-major (XLA otherwise folds the transpose into the dot's
  dimension numbers, a layout its bfloat16 kernels do not take).
  ``jax.lax.optimization_barrier`` does neither on XLA:CPU: it is removed before fusion
  and before transpose folding.
  """
  flat = x.reshape(-1)
  always = jnp.logical_not(jnp.isnan(flat[0]) & jnp.isinf(flat[0]))  # unknown to XLA
  return jax.lax.cond(always, fn, lambda t: jnp.flip(jnp.flip(fn(t), -1), -1), x)


@jax.custom_vjp
def fusion_barrier(x):
  """Identity whose backward pass materialises the cotangent (``opaque``).

  In the backward pass of a deep pre-norm stack, XLA:CPU fuses the elementwise chain that
  carries the residual stream's cotangent through each layer's norms into the next
  layer's weight-gradient ops, and recomputes it there once per layer: backward time then
  grows with the square of the depth. Materialising the cotangent between layers stops it.
  """
  return x


def _fusion_barrier_fwd(x):
  return x, None


def _fusion_barrier_bwd(_, cotangent):
  return (opaque(cotangent),)


fusion_barrier.defvjp(_fusion_barrier_fwd, _fusion_barrier_bwd)


def _swap(x):
  """[X, A, B] -> [X, B, A], written row-major."""
  return opaque(x, lambda t: t.transpose(0, 2, 1))


# --------------------------------------------------------------------------------------
# Per-channel parameters: their gradients summed over a [rows, C] view.

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_rows(v, shape):
  """``jnp.broadcast_to(v, shape)`` for a per-channel ``v`` [C] and ``shape`` [..., C].

  The gradient is the same sum over the leading axes, taken over a [rows, C] view of the
  cotangent: JAX's own transpose reduces the middle axis of [1, N, C] at batch 1, which
  XLA:CPU runs far slower than a reduction over rows.
  """
  return jnp.broadcast_to(v, shape)


def _broadcast_rows_fwd(v, shape):
  return jnp.broadcast_to(v, shape), None


def _broadcast_rows_bwd(shape, _, cotangent):
  return (jnp.sum(cotangent.reshape(-1, shape[-1]), axis=0),)


broadcast_rows.defvjp(_broadcast_rows_fwd, _broadcast_rows_bwd)


def layer_norm(x, scale, offset, *, eps):
  """``layers.layer_norm_formula`` computed on a [rows, C] view of ``x``.

  The same expression in the same order (bit-identical values); XLA:CPU differentiates
  the row reductions of a [rows, C] array several times faster than those of [1, N, C].
  """
  shape = x.shape
  x = x.reshape(-1, shape[-1])
  mean = jnp.mean(x, axis=-1, keepdims=True)
  variance = jnp.var(x, axis=-1, keepdims=True)
  inv = broadcast_rows(scale, x.shape) * jax.lax.rsqrt(
      variance + jax.lax.convert_element_type(eps, variance.dtype))
  y = inv * (x - jnp.broadcast_to(mean, x.shape)) + broadcast_rows(offset, x.shape)
  return y.reshape(shape)


# --------------------------------------------------------------------------------------
# Dense layers.

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, dtype):
  """``x @ w`` (``dtype`` inputs, float32 accumulation) whose backward pass multiplies
  row-major copies of the transposed weight and input.

  JAX's own derivative contracts ``w`` along its rows for ``dx = dy @ w^T`` and ``x``
  along its rows for ``dw = x^T @ dy``, layouts XLA:CPU's dot kernels run on a slow path
  (and in bfloat16 upcast to float32). The transposed weight is made from the parameter
  in the backward pass, one layer at a time, not saved from the forward pass.

  In float32 the gradients are JAX's up to summation order. In bfloat16 the backward
  products follow the forward's policy (bfloat16 inputs, float32 accumulation, float32
  ``dx``), where JAX's own derivative would round ``dx`` to bfloat16.
  """
  return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _matmul_fwd(x, w, dtype):
  xc = x.astype(dtype)
  y = jnp.dot(xc, w.astype(dtype), preferred_element_type=jnp.float32)
  # The parameter itself is the residual (no copy); the empty array carries x's dtype.
  return y, (xc, w, jnp.zeros((0,), x.dtype))


def _matmul_bwd(dtype, residuals, dy):
  xc, w, x_like = residuals
  dy = dy.astype(dtype)
  # The barrier keeps XLA from folding the transpose into the dot; it is removed before
  # fusion, by when layout assignment has made the transpose a row-major copy.
  w_t = jax.lax.optimization_barrier(w.T.astype(dtype))
  dx = jnp.dot(dy, w_t, preferred_element_type=jnp.float32)
  rows = lambda a: a.reshape(-1, a.shape[-1])
  dw = jnp.dot(opaque(rows(xc), jnp.transpose), rows(dy), preferred_element_type=jnp.float32)
  return dx.astype(x_like.dtype), dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x, w, *, dtype=jnp.float32):
  """``x @ w`` for x [..., K], w [K, N]: ``dtype`` inputs, float32 result."""
  return _matmul(x, w, jnp.dtype(dtype))


def dense(x, w, b=None, *, dtype=jnp.float32):
  """``x @ w + b`` (``layers.dense_formula``) with the backward passes above."""
  y = matmul(x, w, dtype=dtype)
  return y if b is None else y + broadcast_rows(b, y.shape)


def add_bias(y, b):
  """``y + b`` for a per-channel ``b`` (``broadcast_rows``' gradient)."""
  return y + broadcast_rows(b, y.shape)


# --------------------------------------------------------------------------------------
# Attention.

def _heads_major(x):
  """[B, N, H, D] -> [B * H, N, D]: one batch dimension, which XLA:CPU's batched dots
  run much faster than two (batch and heads)."""
  b, n, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)


def _by_batch(x, heads):
  """[B * H, N, M] -> [B, H, N, M]."""
  return x.reshape(x.shape[0] // heads, heads, *x.shape[1:])


def _softmax(logits, mask, heads):
  """Softmax over the last axis of [B * H, N, M] logits; masked keys get -1e30 first."""
  if mask is not None:
    logits = jnp.where(mask[:, None], _by_batch(logits, heads), -_LARGE).reshape(logits.shape)
  return jax.nn.softmax(logits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention_core(q, k, v, mask, heads, dtype):
  """softmax(q k^T / sqrt(D) [masked]) v for q [X, N, D], k [X, M, D], v [X, M, Dv].

  X is batch x heads; ``mask`` is None or bool [B, N, M]. Every product, forward and
  backward, multiplies row-major ``dtype`` operands with float32 accumulation; the
  softmax and its derivative w * (g - sum(g * w)) are float32, masked entries zero.
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


def attention_weighted_values(q, k, v, mask=None, *, dtype=jnp.float32):
  """``layers.attention_formula``: q [B, N, H, D], k [B, M, H, D], v [B, M, H, Dv] and an
  optional bool mask [B, N, M] -> [B, N, H * Dv] (before zeroing unattending rows)."""
  batch, n, heads, _ = q.shape
  d_v = v.shape[-1]
  out = _attention_core(_heads_major(q), _heads_major(k), _heads_major(v), mask, heads,
                        jnp.dtype(dtype))
  return out.reshape(batch, heads, n, d_v).transpose(0, 2, 1, 3).reshape(batch, n, heads * d_v)
