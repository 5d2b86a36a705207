"""One train step and one eval step, ``pmap``ped over all devices; shared by MLM and GLUE.

A task supplies two pure functions:

- ``loss_fn(params, rng, batch, is_training) -> (loss_sum, metric_sums)``: the *sum* of
  the per-example (or per-masked-byte) losses of its micro-batch, and sums of any metrics
  (e.g. correct predictions);
- ``count_fn(batch) -> scalar``: how many terms that sum has (examples, masked bytes).

The step divides by the global count (summed over micro-batches and devices) before
differentiating, so the gradient is exactly that of the mean loss over the global batch,
however it is split across devices and accumulation steps: one device and eight give the
same update for the same global batch.

Batches handed to a pmapped step are [devices, accum_steps, per_device_batch, ...].
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

AXIS = 'devices'


class TrainState(NamedTuple):
  step: jax.Array        # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array         # base PRNG key (uint32[2]); step keys are derived from it


def platform(device=None) -> str:
  """The platform programs for ``device`` (default: this host's first local device) are
  lowered for, as ``jax.export`` names it: 'cpu', 'tpu', 'cuda' or 'rocm'."""
  device = device or jax.local_devices()[0]
  if device.platform != 'gpu':
    return device.platform
  version = getattr(device.client, 'platform_version', '') or ''
  return 'rocm' if 'rocm' in version.lower() else 'cuda'


def _psum(tree):
  """Sum over all devices; the identity (and no copy through an all-reduce) on one."""
  if jax.device_count() == 1:
    return tree
  return jax.lax.psum(tree, AXIS)


def _device_rng(rng, step):
  return jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(AXIS))


def make_train_step(loss_fn: Callable, count_fn: Callable,
                    optimizer: optax.GradientTransformation,
                    learning_rate_fn: Callable | None = None) -> Callable:
  """Returns ``step(state, batch) -> (state, metrics)``, pmapped, donating ``state``.

  ``metrics`` holds global sums (``loss``, the task's metric sums, ``count``) plus
  ``grad_norm``, ``learning_rate`` and ``finite`` (1 if loss and gradients are finite).
  """
  step = train_step_fn(loss_fn, count_fn, optimizer, learning_rate_fn)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))


def train_step_fn(loss_fn: Callable, count_fn: Callable,
                  optimizer: optax.GradientTransformation,
                  learning_rate_fn: Callable | None = None) -> Callable:
  """The per-device body of ``make_train_step`` (it needs the ``AXIS`` axis name), for
  mapping or lowering it in other ways, e.g. ``jax.export`` for another platform."""

  def step(state: TrainState, batch):
    accum = jax.tree.leaves(batch)[0].shape[0]
    micro_batches = [jax.tree.map(lambda x, i=i: x[i], batch) for i in range(accum)]
    total = _psum(sum(count_fn(b) for b in micro_batches))
    total = jnp.maximum(total, 1)
    base_rng = _device_rng(state.rng, state.step)

    def micro_grads(index, micro_batch):
      def scaled(params):
        loss_sum, metric_sums = loss_fn(params, jax.random.fold_in(base_rng, index),
                                        micro_batch, True)
        return loss_sum / total, (loss_sum, metric_sums)

      grads, (loss_sum, metric_sums) = jax.grad(scaled, has_aux=True)(state.params)
      return grads, {'loss': loss_sum, **metric_sums}

    if accum == 1:
      # No accumulator: a loop of one would still zero-fill and add a gradient-sized
      # buffer (two extra passes over the parameters' size).
      grads, sums = micro_grads(jnp.asarray(0), micro_batches[0])
    else:
      def micro(carry, inputs):
        grads, sums = micro_grads(*inputs)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: micro_grads(jnp.asarray(0), micro_batches[0])[1]))
      (grads, sums), _ = jax.lax.scan(micro, (zeros, sums0), (jnp.arange(accum), batch))
    grads = _psum(grads)
    sums = _psum(sums)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(sums, count=total.astype(jnp.float32), grad_norm=grad_norm,
                   finite=(jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)).astype(
                       jnp.float32))
    if learning_rate_fn is not None:
      metrics['learning_rate'] = learning_rate_fn(state.step)
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics

  return step


def make_eval_step(loss_fn: Callable, count_fn: Callable) -> Callable:
  """Returns ``eval_step(params, batch) -> global metric sums`` (pmapped, no dropout).

  ``batch`` is [devices, per_device_batch, ...].
  """

  def step(params, batch):
    loss_sum, metric_sums = loss_fn(params, None, batch, False)
    sums = {'loss': loss_sum, **metric_sums, 'count': count_fn(batch).astype(jnp.float32)}
    return jax.lax.psum(sums, AXIS)

  return jax.pmap(step, axis_name=AXIS)


def make_predict_step(predict_fn: Callable) -> Callable:
  """Returns ``predict_step(params, batch) -> per-example outputs``, pmapped, no dropout.

  ``predict_fn(params, batch)`` maps a per-device batch [per_device, ...] to outputs
  [per_device, ...] (e.g. logits); nothing is summed across devices, so the caller gets
  every example's output, [devices, per_device, ...]; ``gather_examples`` puts them back
  in the order of the host batch handed to ``shard``.
  """
  return jax.pmap(predict_fn, axis_name=AXIS)


def gather_examples(tree):
  """Per-example outputs [devices, per_device, ...] -> host numpy [devices * per_device, ...].

  The inverse of ``shard(batch)`` (without accumulation): row i of the result is the
  output for row i of the host batch.
  """
  return jax.tree.map(
      lambda x: np.asarray(jax.device_get(x)).reshape((-1,) + tuple(x.shape[2:])), tree)


def _per_device(pieces):
  """One array per local device -> a [devices, ...] array laid out as pmap expects."""
  devices = jax.local_devices()
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                        jax.sharding.PartitionSpec(AXIS))
  arrays = [jax.device_put(np.asarray(p)[None], d) for p, d in zip(pieces, devices)]
  return jax.make_array_from_single_device_arrays(
      (len(devices),) + np.shape(pieces[0]), sharding, arrays)


def replicate(tree):
  """Copies a pytree to every local device (leading device axis)."""
  n = jax.local_device_count()
  return jax.tree.map(lambda x: _per_device([jax.device_get(x)] * n), tree)


def unreplicate(tree):
  """The first device's copy of a replicated pytree, as numpy arrays on the host."""
  return jax.device_get(jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree))


def shard(batch: Dict[str, np.ndarray], accum_steps: int | None = None):
  """[local_batch, ...] -> [devices, (accum_steps,) per_device, ...] on the devices."""
  n = jax.local_device_count()

  def split(x):
    if x.shape[0] % (n * (accum_steps or 1)):
      raise ValueError(f'local batch of {x.shape[0]} does not split over {n} devices x '
                       f'{accum_steps or 1} accumulation steps')
    shape = (n, accum_steps, -1) if accum_steps else (n, -1)
    return _per_device(list(x.reshape(shape + x.shape[1:])))

  return jax.tree.map(split, batch)
