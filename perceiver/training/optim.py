"""Optimizers and learning-rate schedules shared by pretraining and GLUE fine-tuning."""

from __future__ import annotations

import functools
from typing import Optional

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


IMPLEMENTATIONS = ('auto', 'fused', 'optax')


def make(config, platform: Optional[str] = None) -> optax.GradientTransformation:
  """The optimizer from an ``optimizer`` config block.

  Fields: name ('lamb' | 'adamw'), learning_rate, warmup_steps, decay, decay_steps,
  weight_decay, b1, b2, eps, clip_grad_norm (<= 0 disables clipping), and optionally
  implementation (LAMB only): 'optax', the reference chain of optax's transformations;
  'fused', the same algorithm and state in fewer memory passes (``fused_lamb``), which
  is faster on XLA:CPU; or 'auto' (the default): 'fused' for a step compiled for the CPU
  (``platform='cpu'``, which the training commands pass from their devices), 'optax'
  for any other platform or an unknown one. All three have the same state.
  """
  implementation = config.get('implementation', 'auto')
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'optimizer.implementation must be one of {", ".join(IMPLEMENTATIONS)}; '
                     f'got {implementation!r}')
  if config.name != 'lamb' or implementation == 'optax':
    return reference(config)
  if implementation == 'auto':
    implementation = 'fused' if platform == 'cpu' else 'optax'
  return fused_lamb(config) if implementation == 'fused' else reference(config)


def reference(config) -> optax.GradientTransformation:
  """The optimizer as a chain of optax's own transformations (see ``make``)."""
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


def unpack_lamb_state(state):
  """``optax.lamb``'s state as (adam moments, weight-decay mask, trust ratio, schedule).

  ``fused_lamb`` reads and writes optax's own state so that checkpoints serve either
  implementation; this is where it depends on optax's internals. An optax release that
  lays the state out differently is refused here, naming the fix.
  """
  ok = (isinstance(state, tuple) and len(state) == 4
        and isinstance(state[0], optax.ScaleByAdamState)
        and isinstance(state[1], optax.MaskedState)
        and isinstance(state[3], optax.ScaleByScheduleState))
  if not ok:
    raise TypeError(f'optax {optax.__version__}: optax.lamb\'s state is not the (adam, '
                    'masked weight decay, trust ratio, schedule) tuple that the fused LAMB '
                    "updates; set optimizer.implementation='optax'")
  return state


def _lamb_leaf(g, mu, nu, p, decay, *, scale, bias1, bias2, step_size, b1, b2, eps,
               weight_decay):
  """One leaf of ``fused_lamb``'s update: (update, new mu, new nu)."""
  g = g * scale
  mu = (1 - b1) * g + b1 * mu
  nu = (1 - b2) * g ** 2 + b2 * nu
  u = (mu / bias1) / (jnp.sqrt(nu / bias2) + eps)
  if decay and weight_decay:
    u = u + weight_decay * p
  p_norm = jnp.sqrt(jnp.sum(p * p))
  u_norm = jnp.sqrt(jnp.sum(u * u))
  ratio = jnp.where((p_norm == 0.0) | (u_norm == 0.0), 1.0, p_norm / u_norm)
  # The new moments are written in place of the old ones, which the update direction also
  # reads (XLA recomputes the moments there rather than reading them back). Adding
  # 0 * ||u|| (exactly 0: the norm is finite) makes those writes wait for that read;
  # otherwise XLA copies both moments first (see bench/RESULTS.md).
  after = 0.0 * u_norm
  return step_size * (u * ratio), mu + after, nu + after


def fused_lamb(config) -> optax.GradientTransformation:
  """LAMB with gradient clipping, computed in few passes over the parameters.

  The same algorithm, hyperparameters and state (pytree structure, dtypes, counters) as
  ``reference(config)``: clip by global norm, Adam moments with bias correction, weight
  decay on ``decay_mask`` leaves, per-leaf trust ratio ||p|| / ||u|| (1 where either is
  zero), scheduled learning rate. A checkpoint's optimizer state serves either.

  Why: the chain of optax transformations makes XLA:CPU materialise each stage's result
  per leaf (the clipped gradient, the bias-corrected moments, the decayed update) and
  compute each trust-ratio norm twice (``safe_norm``), about 21 memory passes of a
  parameter's size per leaf, and XLA:CPU also copied both moments inside the step. Here
  each leaf takes about 15: ||g||^2, the new moments (in place), the update direction,
  ||u||^2 and ||p||^2, then the parameter update (figures: ``bench/RESULTS.md``).

  Numerics: the clip multiplies by ``max_norm / ||g||`` where optax divides by ``||g||``
  then multiplies by ``max_norm`` (<= 1 ulp apart when clipping triggers); everything else
  is the same expression in the same order.
  """
  ref = reference(config)
  lr_fn = schedule(config)
  b1, b2, eps, weight_decay = config.b1, config.b2, config.eps, config.weight_decay
  max_norm = config.clip_grad_norm if config.clip_grad_norm and config.clip_grad_norm > 0 \
      else None

  def update(grads, state, params):
    if params is None:
      raise ValueError('fused_lamb needs params (weight decay, trust ratio)')
    clip_state, lamb_state = (state if max_norm is not None else (None, state))
    adam, masked, trust, sched = unpack_lamb_state(lamb_state)
    scale = 1.0
    if max_norm is not None:
      g_norm = optax.tree.norm(grads)  # the step's grad_norm metric: computed once (CSE)
      scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)
    count = optax.safe_increment(adam.count)
    bias1 = 1 - b1 ** count
    bias2 = 1 - b2 ** count
    step_size = -lr_fn(sched.count)

    treedef = jax.tree.structure(params)
    leaf = functools.partial(_lamb_leaf, scale=scale, bias1=bias1, bias2=bias2,
                             step_size=step_size, b1=b1, b2=b2, eps=eps,
                             weight_decay=weight_decay)
    out = [leaf(*args) for args in zip(treedef.flatten_up_to(grads),
                                       treedef.flatten_up_to(adam.mu),
                                       treedef.flatten_up_to(adam.nu),
                                       jax.tree.leaves(params),
                                       jax.tree.leaves(decay_mask(params)))]
    updates, mu, nu = (jax.tree.unflatten(treedef, [o[i] for o in out]) for i in range(3))
    lamb_state = (adam._replace(count=count, mu=mu, nu=nu), masked, trust,
                  sched._replace(count=optax.safe_increment(sched.count)))
    return updates, ((clip_state, lamb_state) if max_norm is not None else lamb_state)

  return optax.GradientTransformation(ref.init, update)
