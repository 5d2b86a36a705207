"""Optimizers and learning-rate schedules shared by pretraining and GLUE fine-tuning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def schedule(config) -> optax.Schedule:
  """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then ``decay``.

  ``decay``: 'cosine' or 'linear' (both reach 0 at step ``decay_steps``, counted from
  step 0, so the paper's "cosine decay over 500,000 steps" is ``decay_steps=500_000``),
  or 'constant'.
  """
  lr, warmup, total = config.learning_rate, config.warmup_steps, config.decay_steps
  if config.decay == 'constant':
    after = optax.constant_schedule(lr)
  elif config.decay == 'cosine':
    after = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  elif config.decay == 'linear':
    after = optax.linear_schedule(lr, 0.0, max(total - warmup, 1))
  else:
    raise ValueError(f"optimizer.decay must be 'cosine', 'linear' or 'constant', got "
                     f'{config.decay!r}')
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params):
  """Weight decay on weight matrices and embeddings only, not on biases or norms."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make(config) -> optax.GradientTransformation:
  """The optimizer from an ``optimizer`` config block.

  Fields: name ('lamb' | 'adamw'), learning_rate, warmup_steps, decay, decay_steps,
  weight_decay, b1, b2, eps, clip_grad_norm (<= 0 disables clipping).
  """
  lr = schedule(config)
  if config.name == 'lamb':
    core = optax.lamb(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay, mask=decay_mask)
  elif config.name == 'adamw':
    core = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"optimizer.name must be 'lamb' or 'adamw', got {config.name!r}")
  if config.clip_grad_norm and config.clip_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), core)
  return core
