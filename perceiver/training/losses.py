"""Losses as weighted sums, the form ``step.train_step_fn`` divides by the global count.

Returning sums (not means) lets the step take the exact mean over the global batch
however it is split across devices and accumulation steps.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp


def softmax_cross_entropy(logits, labels, weights) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Sum of ``weights`` x cross-entropy, and the weighted count of correct argmaxes.

  Args:
    logits: [..., C], any float dtype (computed in float32).
    labels: [...] int class ids.
    weights: [...] (0 where a position or example does not count).

  Returns:
    (loss sum, {'correct': weighted sum of argmax == label}).
  """
  logits = logits.astype(jnp.float32)
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  xent = jax.nn.logsumexp(logits, axis=-1) - label_logits
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(xent * weights), {'correct': jnp.sum(correct * weights)}


def squared_error(predictions, targets, weights) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Sum of ``weights`` x (prediction - target)^2 (regression, e.g. STS-B); no metrics."""
  error = predictions.astype(jnp.float32) - targets
  return jnp.sum(weights * error * error), {}
