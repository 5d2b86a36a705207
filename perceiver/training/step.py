"""The train, eval and predict steps, each one ``jax.jit`` over the run's device mesh
(the train step jitted by ``driver.Run.train_step``, the one place that does); shared by
every task.

A task supplies two pure functions:

- ``loss_fn(params, rng, batch, is_training) -> (loss_sum, metric_sums)``: the *sum* of
  the per-example (or per-masked-byte) losses of its micro-batch, and sums of any metrics
  (e.g. correct predictions);
- ``count_fn(batch) -> scalar``: how many terms that sum has (examples, masked bytes).

Each step is written for the *global* batch, as if on one device: the step divides by the
global count (summed over micro-batches) before differentiating, so the gradient is
exactly that of the mean loss over the global batch. ``jax.jit`` partitions it over the
mesh (``perceiver.training.mesh``): the batch split over every device, the state laid out
by the mesh's rules; XLA inserts the reductions, so the step holds no hand-written
collective, and one device and eight, replicated or FSDP, compute the same update to
float rounding (tested).

Train batches are [accum_steps, global micro-batch, ...] global arrays
(``mesh.shard_batch``); micro-batches are accumulated with ``lax.scan``. Dropout keys
come from the step and the micro-batch index alone, so they do not depend on the mesh
either (JAX's partitionable threefry).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import optax

from perceiver.training import mesh as mesh_lib


class TrainState(NamedTuple):
  step: jax.Array        # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array         # base PRNG key (uint32[2]); step keys are derived from it


def train_step_fn(loss_fn: Callable, count_fn: Callable,
                  optimizer: optax.GradientTransformation,
                  learning_rate_fn: Optional[Callable] = None,
                  param_shardings: Any = None) -> Callable:
  """``step(state, batch) -> (state, metrics)`` on the global batch, not yet jitted: the
  one train step, which ``driver.Run.train_step`` jits over a run's mesh.

  ``metrics`` holds global sums (``loss``, the task's metric sums, ``count``) plus
  ``grad_norm``, ``learning_rate`` and ``finite`` (1 if loss and gradients are finite).
  ``param_shardings``: the parameters' layout; the gradients are constrained to it (so
  XLA reduce-scatters them under FSDP rather than keeping them whole).
  """

  def step(state: TrainState, batch):
    accum = jax.tree.leaves(batch)[0].shape[0]
    total = jnp.maximum(jnp.sum(jax.vmap(count_fn)(batch)), 1)
    base_rng = jax.random.fold_in(state.rng, state.step)

    def micro_grads(index, micro_batch):
      def scaled(params):
        loss_sum, metric_sums = loss_fn(params, jax.random.fold_in(base_rng, index),
                                        micro_batch, True)
        return loss_sum / total, (loss_sum, metric_sums)

      grads, (loss_sum, metric_sums) = jax.grad(scaled, has_aux=True)(state.params)
      if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
      return grads, {'loss': loss_sum, **metric_sums}

    if accum == 1:
      # No accumulator: a loop of one would still zero-fill and add a gradient-sized
      # buffer (two extra passes over the parameters' size).
      grads, sums = micro_grads(jnp.asarray(0), jax.tree.map(lambda x: x[0], batch))
    else:
      def micro(carry, inputs):
        grads, sums = micro_grads(*inputs)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: micro_grads(jnp.asarray(0), jax.tree.map(lambda x: x[0], batch))[1]))
      (grads, sums), _ = jax.lax.scan(micro, (zeros, sums0), (jnp.arange(accum), batch))
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


def on_mesh(mesh: jax.sharding.Mesh, fn: Callable) -> Callable:
  """``fn`` traced under ``mesh`` (abstractly): the model then lays out its activations
  with the batch split over the mesh (``perceiver.model.modules.batch_layout``). On one
  device there is nothing to lay out, and ``fn`` is traced as it is."""
  if mesh.devices.size == 1:
    return fn

  @functools.wraps(fn)   # the arguments keep their names in the lowered program
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def new_state_fn(init_params: Callable, optimizer: optax.GradientTransformation,
                 rng: jax.Array, step: int = 0) -> Callable[[], TrainState]:
  """``make() -> TrainState``: fresh parameters (``init_params()``, e.g. ``lambda:
  model.init(key, ids)``), their optimizer state, ``rng`` and ``step``. Traced, never run
  on its own: ``jax.eval_shape(make)`` gives the state's shapes, ``init_state`` creates it."""

  def make():
    params = init_params()
    return TrainState(jnp.asarray(step, jnp.int32), params, optimizer.init(params), rng)

  return make


def init_state(mesh: jax.sharding.Mesh, make: Callable[[], TrainState]):
  """``(state, shardings)``: ``make()``'s state created directly in its layout on
  ``mesh`` (a model too large for one device never exists whole anywhere)."""
  shardings = mesh_lib.state_shardings(mesh, jax.eval_shape(make))
  return jax.jit(make, out_shardings=shardings)(), shardings


def state_from_params(params, optimizer: optax.GradientTransformation, rng: jax.Array,
                      shardings: TrainState) -> TrainState:
  """A step-0 ``TrainState`` around given parameters (host arrays, e.g. a pretrained
  trunk with a new head): placed by ``shardings``, the optimizer state created there."""
  placed = mesh_lib.place(params, shardings.params)
  make = lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), rng)
  return jax.jit(make, out_shardings=shardings, donate_argnums=(0,))(placed)


def make_eval_step(loss_fn: Callable, count_fn: Callable, mesh: jax.sharding.Mesh,
                   param_shardings: Any) -> Callable:
  """``eval_step(params, batch) -> global metric sums`` (replicated scalars; no
  dropout). ``batch`` is [batch, ...], split over the mesh (``mesh.shard_batch``)."""

  def step(params, batch):
    loss_sum, metric_sums = loss_fn(params, None, batch, False)
    return {'loss': loss_sum, **metric_sums, 'count': count_fn(batch).astype(jnp.float32)}

  return jax.jit(step, in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh, False)),
                 out_shardings=NamedSharding(mesh, P()))


def make_predict_step(predict_fn: Callable, mesh: jax.sharding.Mesh,
                      param_shardings: Any) -> Callable:
  """``predict_step(params, batch) -> per-example outputs`` (no dropout), split over the
  mesh like the batch; ``mesh.to_host`` gathers them in the batch's row order.

  ``predict_fn(params, batch)`` maps a batch [n, ...] to outputs [n, ...] (e.g. logits).
  """
  batch = mesh_lib.batch_sharding(mesh, False)
  return jax.jit(predict_fn, in_shardings=(param_shardings, batch), out_shardings=batch)
