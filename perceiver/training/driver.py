"""One training run, whatever the task: what ``train.mlm`` and ``eval.glue`` share.

A task brings its own parts: the model's loss (``loss_fn``, ``count_fn``: see
``perceiver.training.step``), its host batches with their data positions, how it
evaluates and what it saves (``Loop`` callbacks), and its error for a non-finite step.
The driver owns the rest:

    run = driver.Run.create(config.mesh, config.optimizer, config.model)
    model = run.build(transform.masked_lm)                  # computing as the mesh's devices do
    restored = run.restore(manager, shapes, ...)            # a named result, or None
    state = run.place(restored, shardings) or run.init(make_state)   # in its layout
    result = run.train(loss_fn, count_fn, state, batches, ...)

``Run.create`` resolves the platform once, from the mesh's devices, and with it how the
model computes (``run.compute``, a ``perceiver.model.layers.Compute``: XLA:CPU's kernels on a
CPU under ``kernels='auto'``) and which optimizer update runs (fused LAMB on a CPU). A
task builds its model through ``run.build``, which passes ``run.compute``, so no task can
build the slower program by forgetting the platform.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from perceiver.command import atomic
from perceiver.model import layers
from perceiver.training import feed
from perceiver.training import hosts
from perceiver.training import loop as loop_lib
from perceiver.training import mesh as mesh_lib
from perceiver.training import optim
from perceiver.training import run_checkpoints
from perceiver.training import step as step_lib


def check_optimizer_config(o) -> None:
  """Refuses an ``optimizer`` block that cannot run, naming the field (ValueError); the
  one check both commands apply. ``decay_steps`` may be 0 where the command fills it in
  (GLUE: the run's length)."""

  def need(ok, field, value, requirement):
    if not ok:
      raise ValueError(f'optimizer.{field} must be {requirement}, got {value!r}')

  finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  need(o.name in ('lamb', 'adamw'), 'name', o.name, "'lamb' or 'adamw'")
  need(finite(o.learning_rate) and o.learning_rate > 0, 'learning_rate', o.learning_rate,
       'a finite number > 0')
  need(finite(o.weight_decay) and o.weight_decay >= 0, 'weight_decay', o.weight_decay,
       'a finite number >= 0')
  for field in ('b1', 'b2'):
    need(finite(o[field]) and 0 <= o[field] < 1, field, o[field], 'in [0, 1)')
  need(finite(o.eps) and o.eps > 0, 'eps', o.eps, 'a finite number > 0')
  need(finite(o.clip_grad_norm), 'clip_grad_norm', o.clip_grad_norm,
       'a finite number (<= 0 disables clipping)')
  need(is_int(o.warmup_steps) and o.warmup_steps >= 0, 'warmup_steps', o.warmup_steps,
       'an integer >= 0')
  need(o.decay in ('cosine', 'linear', 'constant'), 'decay', o.decay,
       "'cosine', 'linear' or 'constant'")
  need(o.decay == 'constant' or (is_int(o.decay_steps) and (
      o.decay_steps == 0 or o.decay_steps > o.warmup_steps)), 'decay_steps', o.decay_steps,
       f'an integer > optimizer.warmup_steps ({o.warmup_steps})')
  need(o.get('implementation', 'auto') in optim.IMPLEMENTATIONS, 'implementation',
       o.get('implementation'), ' or '.join(repr(i) for i in optim.IMPLEMENTATIONS))


def check_checkpoint_room(directory: str, shapes: step_lib.TrainState, field: str) -> None:
  """Refuses to start a fine-tuning run whose checkpoints cannot fit where they go.

  Such a run keeps two: the best epoch's (parameters) and the resume one (parameters and
  optimizer state), each written beside the one it replaces before that is removed, so
  twice their size is needed (``perceiver.command.atomic.check_free_space``; checked only where
  the filesystem reports its free space).
  """
  size = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize
                          for x in jax.tree.leaves(tree))
  need = 2 * (2 * size(shapes.params) + size(shapes.opt_state))
  atomic.check_free_space(directory, need, 'the best and resume checkpoints (each written '
                          'beside the one it replaces)', field)


def compute_for(model_config, devices) -> layers.Compute:
  """How a model of ``model_config`` computes on ``devices`` (any of them: a mesh's
  devices share one platform): its config's dtype and kernels, 'auto' resolved for their
  platform. For the commands that run a model without a ``Run`` (scoring, prediction)."""
  first = next(iter(np.asarray(devices, dtype=object).flat))
  return layers.Compute.resolve(model_config, step_lib.platform(first))


@dataclasses.dataclass(frozen=True)
class Run:
  """The mesh, the platform resolved from its devices, how the model computes there,
  and the optimizer of one run."""
  mesh: jax.sharding.Mesh
  platform: str
  model_config: Any
  compute: layers.Compute
  optimizer: Any
  learning_rate_fn: Callable

  @classmethod
  def create(cls, mesh_config, optimizer_config, model_config, devices=None) -> 'Run':
    """ValueError naming the field when the mesh does not fit the devices."""
    mesh = mesh_lib.make(mesh_config, devices)
    platform = step_lib.platform(mesh.devices.flat[0])
    return cls(mesh, platform, model_config, layers.Compute.resolve(model_config, platform),
               optim.make(optimizer_config, platform=platform),
               optim.schedule(optimizer_config))

  def build(self, make: Callable, *args) -> Any:
    """``make(model_config, *args, compute=self.compute)``: a ``perceiver.transform``
    model (``masked_lm``, ``classifier``, ...) of this run's config, built for its devices."""
    return make(self.model_config, *args, compute=self.compute)

  def shardings(self, shapes: step_lib.TrainState) -> step_lib.TrainState:
    """The layout of a state of ``shapes`` on this run's mesh (``mesh.RULES``)."""
    return step_lib.state_shardings(self.mesh, shapes)

  def init(self, make_state: Callable[[], step_lib.TrainState]) -> step_lib.TrainState:
    """A fresh state, created in its layout (``step.init_state``)."""
    return step_lib.init_state(self.mesh, make_state)[0]

  def restore(self, manager: run_checkpoints.CheckpointManager, shapes: step_lib.TrainState,
              note: Callable[[str], None], check: Optional[Callable] = None
              ) -> Optional[run_checkpoints.Restored]:
    """The newest checkpoint of ``manager`` that reads back, read straight into this
    run's layout (any mesh, any number of hosts wrote it; see
    ``CheckpointManager.restore_latest``), or None."""
    return manager.restore_latest(shapes, self.shardings(shapes), note=note, check=check)

  @staticmethod
  def place(restored: run_checkpoints.Restored,
            shardings: step_lib.TrainState) -> step_lib.TrainState:
    """The ``TrainState`` of a restored checkpoint (its arrays already in ``shardings``)."""
    step = mesh_lib.place(np.asarray(restored.step, np.int32), shardings.step)
    return step_lib.TrainState(step, restored.params, restored.opt_state, restored.rng)

  def train(self, loss_fn: Callable, count_fn: Callable, state: step_lib.TrainState,
            shardings: step_lib.TrainState, batches: Iterator, *, accum_steps: int,
            prefetch: int, start_step: int, stop_timeout_s: float,
            note: Callable[[str], None], on_non_finite: Callable[[Exception], Exception],
            checkpoints: Sequence[run_checkpoints.CheckpointManager] = (),
            **loop_kwargs) -> loop_lib.Result:
    """Runs ``Loop`` (``loop_kwargs``: total_steps, writer, log_every, evaluate, save, ...)
    over ``batches`` ((host batch, data position) pairs), each put on the mesh by a
    prefetching thread, under a stop every host agrees on. A non-finite step raises
    ``on_non_finite(error)`` (the task's error naming what it kept). Each report also
    holds ``input_wait``: the share of its window the loop spent waiting for input.
    However the loop ends (done, stopped, an error), the saves of ``checkpoints`` still
    being written are waited for before this returns or raises."""
    train_step = step_lib.make_train_step(loss_fn, count_fn, self.optimizer,
                                          self.learning_rate_fn, self.mesh, shardings)
    fed = feed.Prefetcher(batches, prefetch, prepare=lambda item: (
        mesh_lib.shard_batch(item[0], self.mesh, accum_steps), item[1]))
    task_report = loop_kwargs.pop('extra_report', None)
    waited = [0.0]   # the Prefetcher's waiting time at the last report

    def extra_report(step, report, window):
      extra = dict(task_report(step, report, window)) if task_report else {}
      # The share of the window's time the loop spent waiting for input.
      extra['input_wait'] = (fed.waited_s - waited[0]) / max(
          report['step_time_s'] * window.steps, 1e-9)
      waited[0] = fed.waited_s
      return extra

    with hosts.StopAgreement(stop_timeout_s, note) as stop:
      run = loop_lib.Loop(train_step, stop=stop, extra_report=extra_report, **loop_kwargs)
      try:
        return run.run(state, fed, start_step)
      except loop_lib.NonFiniteError as e:
        raise on_non_finite(e) from None
      finally:
        stop.finished()
        fed.close()
        for manager in checkpoints:
          manager.close()
