"""One training run, whatever the task: what ``train.mlm`` and ``eval.glue`` share.

A task brings its own parts: the model's loss (``loss_fn``, ``count_fn``: see
``perceiver.training.step``), its host batches with their data positions, how it
evaluates and what it saves (``Loop`` callbacks), and its error for a non-finite step.
The driver owns the rest:

    run = driver.Run.create(config.mesh, config.optimizer, config.model)
    model = run.build(transform.masked_lm)                  # computing as the mesh's devices do
    restored = run.restore(manager, shapes, ...)            # a named result, or None
    state = run.place(restored, shardings) or run.init(make_state)   # in its layout
    result = run.train(loss_fn, count_fn, state, shardings, batches, ...)

``Run.create`` resolves the platform once, from the mesh's devices (or as asked, to lower
the programs for another), and with it how the model computes (``run.build`` passes it
to ``perceiver.transform``: XLA:CPU's kernels on a CPU under ``kernels='auto'``) and which
optimizer update runs (fused LAMB on a CPU), so no task can build the slower program by
forgetting the platform. ``run.train_step`` is the one jitted train step: ``run.train``
runs it, and the benchmarks and tests lower, compile or run the same one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from perceiver.command import atomic
from perceiver.model import layers
from perceiver.training import feed
from perceiver.training import distributed
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


def check_checkpoint_room(directory: str, shapes: step_lib.TrainState, field: str,
                          more: Optional[int] = None, why: str = '') -> None:
  """Refuses to start a run whose checkpoints cannot fit where they go
  (``perceiver.command.atomic.check_free_space``, naming ``field``; checked only where the
  filesystem reports its free space).

  ``more``: room for that many more checkpoints of the parameters and optimizer state
  (pretraining; ``why`` says why that many). Without it, a fine-tuning run's two: the best
  epoch's (parameters) and the resume one (parameters and optimizer state), each written
  beside the one it replaces before that is removed, so twice their size.
  """
  size = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize
                          for x in jax.tree.leaves(tree))
  params, full = size(shapes.params), size((shapes.params, shapes.opt_state))
  if more is None:
    need, what = 2 * (params + full), ('the best and resume checkpoints (each written '
                                       'beside the one it replaces)')
  else:
    need, what = more * full, f'{more} more checkpoint(s) of {full / 2**20:,.1f} MiB ({why})'
  atomic.check_free_space(directory, need, what, field)


@dataclasses.dataclass(frozen=True)
class Run:
  """The mesh of one run, the platform its programs are built for, its model config and
  its optimizer."""
  mesh: jax.sharding.Mesh
  platform: str
  model_config: Any
  optimizer: Any
  learning_rate_fn: Callable

  @classmethod
  def create(cls, mesh_config, optimizer_config, model_config, devices=None,
             platform: Optional[str] = None) -> 'Run':
    """The run of these config blocks over ``devices`` (default: every device), its
    programs built for ``platform``: by default the devices' own; another one ('cuda',
    'tpu') builds them, from this host's devices, for lowering or exporting for that
    platform (``bench.lowering``).

    Raises:
      ValueError: naming the field when the mesh does not fit the devices.
    """
    mesh = mesh_lib.make(mesh_config, devices)
    platform = platform or layers.platform(mesh.devices.flat[0])
    return cls(mesh, platform, model_config, optim.make(optimizer_config, platform=platform),
               optim.schedule(optimizer_config))

  def build(self, make: Callable, *args) -> Any:
    """``make(model_config, *args, platform=self.platform)``: a ``perceiver.transform``
    model (``masked_lm``, ``classifier``, ...) of this run's config, computing as its
    platform does best (``perceiver.model.layers``)."""
    return make(self.model_config, *args, platform=self.platform)

  def train_step(self, loss_fn: Callable, count_fn: Callable,
                 shardings: step_lib.TrainState) -> Callable:
    """``step(state, batch) -> (state, metrics)``: ``step.train_step_fn`` of the task's
    loss with this run's optimizer and learning rate, jitted over its mesh; the state
    keeps ``shardings`` and is donated, the batch is [accum, global micro-batch, ...]
    split over every device, the metrics are replicated scalars. The one train step of
    every command, benchmark and test (``lower`` or ``jax.export`` it for the platform the
    run was created for)."""
    step = step_lib.on_mesh(self.mesh, step_lib.train_step_fn(
        loss_fn, count_fn, self.optimizer, self.learning_rate_fn, shardings.params))
    return jax.jit(step, in_shardings=(shardings, mesh_lib.batch_sharding(self.mesh, True)),
                   out_shardings=(shardings, NamedSharding(self.mesh, P())),
                   donate_argnums=(0,))

  def init(self, make_state: Callable[[], step_lib.TrainState]) -> step_lib.TrainState:
    """A fresh state, created in its layout (``step.init_state``)."""
    return step_lib.init_state(self.mesh, make_state)[0]

  def restore(self, manager: run_checkpoints.CheckpointManager, shapes: step_lib.TrainState,
              note: Callable[[str], None], check: Optional[Callable] = None
              ) -> Optional[run_checkpoints.Restored]:
    """The newest checkpoint of ``manager`` that reads back, read straight into this
    run's layout (any mesh, any number of hosts wrote it; see
    ``CheckpointManager.restore_latest``), or None."""
    return manager.restore_latest(shapes, mesh_lib.state_shardings(self.mesh, shapes),
                                  note=note, check=check)

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
    train_step = self.train_step(loss_fn, count_fn, shardings)
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

    with distributed.StopAgreement(stop_timeout_s, note) as stop:
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
