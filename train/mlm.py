r"""Masked-language-model pretraining of Perceiver IO on bytes.

    python -m train.mlm --config=train/configs/mlm.py:smoke --workdir=checkpoints/smoke

The same command runs on one CPU, one GPU, or every device of many hosts
(``--config.distributed.enabled=true``); the step is one ``jax.jit`` over a mesh of all
devices (``config.mesh``: data parallel, FSDP, or both). A run resumes from the newest checkpoint in ``--workdir`` by itself.
SIGTERM or Ctrl-C writes a checkpoint and exits 0; a non-finite loss stops the run with
an error and leaves the last good checkpoint in place. The loop, steps, checkpoints and
logs are ``perceiver.training``'s; this module holds what is MLM's own: the data, the
masked-byte loss and its held-out evaluation.
"""

from __future__ import annotations

# First, before the imports below (JAX takes seconds, and starts threads): the host
# memory policy, then the signal guard (see each one's docstring).
from perceiver.training import host_memory  # pylint: disable=g-bad-import-order
from perceiver.command import signal_guard  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  host_memory.retain_freed_memory()
  signal_guard.install(stop_status=0)

import json
import math
import os
import sys
from typing import Callable, Dict, NamedTuple

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from perceiver.command import cli
from perceiver import configs as model_configs
from perceiver.command import errors
from perceiver.model import flops
from perceiver import transform
from perceiver.training import distributed
from perceiver.training import driver
from perceiver.training import host_memory
from perceiver.training import losses
from perceiver.training import mesh as mesh_lib
from perceiver.training import run_checkpoints
from perceiver.training import step as step_lib
from perceiver.training import workdir_lock
from perceiver.training import writer as writer_lib
from train import data as data_lib
from train import inputs
from train import masking

_CONFIG_FILE = os.path.join(os.path.dirname(__file__), 'configs', 'mlm.py')


class TrainingError(errors.UserError, RuntimeError):
  """The run cannot continue (bad input, non-finite loss); the message says why."""


# --------------------------------------------------------------------------------------
# Set-up.

def batch_layout(config) -> Dict[str, int]:
  """Splits ``train.batch_size`` over hosts, devices and accumulation steps."""
  try:
    return mesh_lib.batch_layout(config.train.batch_size, config.train.grad_accum_steps,
                                 'train.batch_size', 'train.grad_accum_steps')
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


def _check(condition: bool, field: str, value, requirement: str) -> None:
  if not condition:
    raise errors.ConfigError(f'{field} must be {requirement}, got {value!r}')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_sources(sources) -> None:
  """Each data source names its files and a finite weight >= 0; not all weights zero."""
  _check(bool(sources), 'data.sources', dict(sources), 'at least one source')
  weights = []
  for name, spec in sources.items():
    _check(isinstance(spec.get('paths'), str) and spec.get('paths', '').strip(),
           f'data.sources.{name}.paths', spec.get('paths'), 'non-empty comma-separated globs')
    weight = spec.get('weight')
    finite = isinstance(weight, (int, float)) and math.isfinite(weight)
    _check(finite and weight >= 0, f'data.sources.{name}.weight', weight,
           'a finite number >= 0')
    weights.append(weight)
  _check(sum(weights) > 0, 'data.sources.*.weight', weights, 'not all zero')


def check_config(config) -> None:
  """Refuses config values that cannot run, naming the field, before anything compiles."""
  t, o, d, m = config.train, config.optimizer, config.data, config.masking
  for field, value, low in (('train.steps', t.steps, 1), ('train.batch_size', t.batch_size, 1),
                            ('train.grad_accum_steps', t.grad_accum_steps, 1),
                            ('train.log_every', t.log_every, 1),
                            ('train.checkpoint_every', t.checkpoint_every, 1),
                            ('train.keep_checkpoints', t.keep_checkpoints, 1),
                            ('train.eval_every', t.eval_every, 0),
                            ('train.eval_batches', t.eval_batches, 0),
                            ('train.max_predictions', t.max_predictions, 0),
                            ('data.docs_per_example', d.docs_per_example, 1),
                            ('data.block_size', d.block_size, 1),
                            ('data.open_concatenations', d.open_concatenations, 1),
                            ('data.prefetch', d.prefetch, 1),
                            ('data.streams', d.streams, 1),
                            ('data.workers', d.workers, 0),
                            ('seed', config.seed, 0)):
    _check(_is_int(value) and value >= low, field, value, f'an integer >= {low}')
  finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
  try:
    driver.check_optimizer_config(o)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  _check(o.decay == 'constant' or o.decay_steps > 0, 'optimizer.decay_steps', o.decay_steps,
         f'an integer > optimizer.warmup_steps ({o.warmup_steps})')
  _check(finite(m.mask_prob) and 0 < m.mask_prob < 1, 'masking.mask_prob', m.mask_prob,
         'in (0, 1)')
  _check(d.separator in data_lib.SEPARATORS, 'data.separator', d.separator,
         'one of ' + ', '.join(sorted(data_lib.SEPARATORS)))
  _check_sources(d.sources)
  _check(finite(t.max_seconds) and t.max_seconds >= 0, 'train.max_seconds', t.max_seconds,
         'a finite number >= 0 (0: no limit)')
  _check(finite(t.unmasked_loss_weight) and t.unmasked_loss_weight >= 0,
         'train.unmasked_loss_weight', t.unmasked_loss_weight, 'a finite number >= 0')
  _check(m.unit in masking.UNITS, 'masking.unit', m.unit,
         ' or '.join(repr(u) for u in masking.UNITS))
  _check(finite(d.batch_timeout_s) and d.batch_timeout_s >= 0, 'data.batch_timeout_s',
         d.batch_timeout_s, 'a finite number >= 0 (0: no bound)')
  _check(finite(t.stop_timeout_s) and t.stop_timeout_s > 0, 'train.stop_timeout_s',
         t.stop_timeout_s, 'a finite number > 0')
  timeout = config.distributed.get('initialization_timeout_s', 60.0)
  _check(finite(timeout) and timeout > 0, 'distributed.initialization_timeout_s', timeout,
         'a finite number > 0')
  _check(finite(t.peak_flops_per_device) and t.peak_flops_per_device >= 0,
         'train.peak_flops_per_device', t.peak_flops_per_device, 'a finite number >= 0')
  try:
    mesh_lib.resolve_shape(config.mesh.data, config.mesh.fsdp,
                           max(abs(config.mesh.data * config.mesh.fsdp), 1))
    model_configs.validate(config.model)
    if config.data.hosts:
      inputs.parse_hosts(config.data.hosts, config.distributed.enabled)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


# --------------------------------------------------------------------------------------
# The loss.

def make_loss_fn(model, decode_masked_only: bool, unmasked_weight: float = 0.0):
  """(params, rng, batch, is_training) -> (summed masked-byte cross-entropy, sums).

  ``unmasked_weight`` > 0 (this project's option, ``train.unmasked_loss_weight``): while
  training, each unmasked byte's cross-entropy (reconstructing the byte the model sees)
  is added to the objective with this weight relative to a masked byte. The logged
  ``loss`` stays the masked bytes' alone: it is returned as the ``loss`` metric sum,
  which the train step reports in place of the objective.
  """
  if unmasked_weight and decode_masked_only:
    raise errors.ConfigError('train.unmasked_loss_weight needs every position decoded: '
                             'set train.decode_masked_only=false')

  def loss_fn(params, rng, batch, is_training):
    if decode_masked_only and is_training:
      logits = model.apply(params, rng, batch['input_ids'], batch['input_mask'],
                           is_training, query_positions=batch['masked_positions'],
                           query_mask=(batch['masked_weights'] > 0).astype(jnp.int32))
      labels, weights = batch['masked_labels'], batch['masked_weights']
    else:
      logits = model.apply(params, rng, batch['input_ids'], batch['input_mask'], is_training)
      labels, weights = batch['labels'], batch['weights']
    loss, sums = losses.softmax_cross_entropy(logits, labels, weights)
    if unmasked_weight and is_training:
      unmasked = batch['input_mask'].astype(jnp.float32) * (1.0 - weights)
      reconstruction, _ = losses.softmax_cross_entropy(logits, labels, unmasked)
      sums['loss'] = loss
      loss = loss + unmasked_weight * reconstruction
    return loss, sums

  return loss_fn


def count_fn(batch):
  weights = batch['masked_weights'] if 'masked_weights' in batch else batch['weights']
  return jnp.sum(weights)


class Built(NamedTuple):
  """A run's masked LM: its training loss, and its training state (made by
  ``make_state``; its shapes, and its layout on the run's mesh)."""
  loss_fn: Callable
  make_state: Callable[[], step_lib.TrainState]
  shapes: step_lib.TrainState
  shardings: step_lib.TrainState


def build(run: driver.Run, seed: int = 0, decode_masked_only: bool = False,
          unmasked_weight: float = 0.0) -> Built:
  """The masked LM of ``run``'s model config, built for its platform (``run.build``),
  with ``make_loss_fn``'s loss; its parameters drawn from ``seed`` and its dropout keys
  from ``seed + 1``. Its train step is ``run.train_step(built.loss_fn, count_fn,
  built.shardings)``: what this command runs and the benchmarks and tests lower."""
  model = run.build(transform.masked_lm)
  ids = jnp.zeros((1, run.model_config.max_seq_len), jnp.int32)
  make_state = step_lib.new_state_fn(
      lambda: model.init(jax.random.PRNGKey(seed), ids, jnp.ones_like(ids)), run.optimizer,
      jax.random.PRNGKey(seed + 1))
  shapes = jax.eval_shape(make_state)
  return Built(make_loss_fn(model, decode_masked_only, unmasked_weight), make_state,
               shapes, mesh_lib.state_shardings(run.mesh, shapes))


# --------------------------------------------------------------------------------------
# The run.

def _check_resume_config(saved, current, path):
  """Refuses to resume with another model; how it computes (dtype, kernels) may change."""
  saved_d, current_d = saved.to_dict(), current.to_dict()
  diffs = [k for k in set(saved_d) | set(current_d)
           if k not in model_configs.COMPUTE_FIELDS and saved_d.get(k) != current_d.get(k)]
  if diffs:
    raise TrainingError(f'{path} was trained with a different model config (fields: '
                        f'{", ".join(sorted(diffs))}); use another --workdir')


# Settings a resumed run must share with the one it continues: the data position and
# the RNG streams mean the same thing only under them.
_RESUME_FIELDS = ('seed', 'data.sources', 'data.docs_per_example', 'data.separator',
                  'data.block_size', 'data.open_concatenations', 'data.hosts',
                  'data.streams', 'masking',
                  'train.batch_size', 'train.grad_accum_steps', 'train.decode_masked_only',
                  'train.max_predictions')


def _field(tree, dotted):
  for part in dotted.split('.'):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def _check_resume_run(meta, config, path, log):
  """Refuses to resume with other data, masking or batch settings (unless
  ``train.allow_changes``, which lists them). Another number of hosts is allowed: see
  ``run_checkpoints.Restored.data_position`` for what becomes of the data position."""
  try:
    saved = json.loads(meta.get('train_config') or '{}')
  except ValueError:
    saved = {}
  current = json.loads(config.to_json())
  changed = [f for f in _RESUME_FIELDS if saved and _field(saved, f) != _field(current, f)]
  if changed and not config.train.allow_changes:
    raise TrainingError(f'{path} was written with other settings: {", ".join(changed)} '
                        '(its data position belongs to them); pass '
                        '--config.train.allow_changes=true to resume anyway, or use '
                        'another --workdir')
  if changed:
    log.note(f'warning: resuming with changed settings (train.allow_changes): '
             f'{", ".join(changed)}')


def _evaluator(eval_step, held_out, baseline, log, mesh):
  """``evaluate(step, state)``: the held-out masked-byte loss and accuracy beside the
  context-free baseline."""

  def evaluate(step, state):
    sums = None
    for batch in held_out:
      out = jax.device_get(eval_step(state.params, mesh_lib.shard_batch(batch, mesh)))
      sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
    count = max(sums['count'], 1)
    record = {'loss': sums['loss'] / count, 'accuracy': sums['correct'] / count,
              'masked_bytes': sums['count'], **baseline}
    if baseline:
      # Above 0 once the model uses context: what a context-free guess cannot score.
      record['accuracy_gap'] = record['accuracy'] - baseline['baseline_accuracy']
      record['loss_gap'] = baseline['baseline_loss'] - record['loss']
    log.write(step, record, kind='eval')

  return evaluate


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Runs (or resumes) pretraining; returns the last logged train metrics.

  The config is checked before anything is read or compiled; ``workdir`` is locked for
  the run (a second run on it is refused).
  """
  check_config(config)
  distributed.initialize(config.distributed)
  with workdir_lock.WorkdirLock(workdir):
    return _train(config, workdir)


def _train(config, workdir) -> Dict[str, float]:
  layout = batch_layout(config)
  try:
    run = driver.Run.create(config.mesh, config.optimizer, config.model)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  # Computes as the mesh's devices do best (see perceiver.model.layers).
  built = build(run, config.seed, config.train.decode_masked_only,
                config.train.unmasked_loss_weight)
  manager = run_checkpoints.CheckpointManager(workdir, keep=config.train.keep_checkpoints)
  # Room for the checkpoints this run will add (each: parameters and optimizer state).
  keep = config.train.keep_checkpoints
  driver.check_checkpoint_room(workdir, built.shapes, f'--workdir={workdir}',
                               max(1, keep + 1 - len(manager.steps())),
                               f'train.keep_checkpoints={keep}, and one being written')
  restored = run.restore(manager, built.shapes, note=print,
                         check=lambda saved, path: _check_resume_config(saved, config.model,
                                                                        path))
  log = writer_lib.MetricWriter(workdir, config.train.steps,
                                resume_step=restored.step if restored else None)
  start_step, data_state = _start(config, workdir, run, built, restored, layout, log)
  if start_step >= config.train.steps:
    log.note(f'already at step {start_step} >= train.steps={config.train.steps}; nothing to do')
    return {}

  state = run.place(restored, built.shardings) if restored else run.init(built.make_state)
  held_out = inputs.eval_batches(config, workdir, layout['per_device'] * layout['local_devices'])
  evaluate = _evaluator(step_lib.make_eval_step(built.loss_fn, count_fn, run.mesh,
                                                built.shardings.params),
                        held_out, inputs.unigram_baseline(held_out), log, run.mesh)
  result = run.train(
      built.loss_fn, count_fn, state, built.shardings,
      inputs.train_batches(config, workdir, layout['host_batch'], data_state),
      accum_steps=layout['accum'], prefetch=config.data.prefetch, start_step=start_step,
      stop_timeout_s=config.train.stop_timeout_s, note=log.note,
      on_non_finite=lambda e: TrainingError(
          f'{e}: stopping without saving; the last good checkpoint is '
          f'{manager.latest() or "none (none was written)"}'),
      total_steps=config.train.steps, writer=log, log_every=config.train.log_every,
      extra_report=_reporter(config), eval_every=config.train.eval_every if held_out else 0,
      evaluate=evaluate, eval_on_stop=True, checkpoint_every=config.train.checkpoint_every,
      save=_saver(manager, config, log), max_seconds=config.train.max_seconds,
      batch_timeout_s=config.data.batch_timeout_s,
      checkpoints=[manager])
  return result.last_report


def _start(config, workdir, run, built, restored, layout, log):
  """``(start step, data position)`` of a new or resumed run (a resumed one checked
  against the settings it was written with), its start logged."""
  start_step, data_state = 0, None
  if restored:
    _check_resume_run(restored.metadata, config, restored.path, log)
    start_step = restored.step
    data_state = restored.data_position(log.note)
    log.note(f'resuming from {restored.path} at step {start_step} on '
             f'{mesh_lib.describe(run.mesh)}')
  else:
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(built.shapes.params))
    log.note(f'new run in {workdir}: {count:,} parameters, {jax.device_count()} device(s) '
             f'on {jax.process_count()} host(s), per-device batch {layout["per_device"]} x '
             f'{layout["accum"]} accumulation step(s)')
  for line in mesh_lib.rules_report(run.mesh, built.shapes.params):
    log.note(line)
  return start_step, data_state


def _reporter(config):
  """``extra_report(step, report, window)``: bytes per second, and the model FLOPs
  utilisation where ``train.peak_flops_per_device`` is set."""
  seq_len = config.model.max_seq_len
  num_queries = None
  if config.train.decode_masked_only:
    num_queries = inputs.make_masker(config).max_predictions
  step_flops = flops.masked_lm_train_step(config.model, seq_len, config.train.batch_size,
                                          num_queries)
  peak = config.train.peak_flops_per_device * jax.device_count()

  def extra_report(step, report, window):
    del step, window
    extra = {'bytes_per_s': config.train.batch_size * seq_len / report['step_time_s']}
    if peak > 0:
      extra['mfu'] = step_flops / report['step_time_s'] / peak
    return extra

  return extra_report


def _saver(manager, config, log):
  """``save(step, state, data_position)``: a checkpoint of the run, written by every
  host (its own shards) in the background while the next steps run."""

  def save(step, state, data_position):
    try:
      path = manager.save(step, state.params, config.model, opt_state=state.opt_state,
                          rng=state.rng, data_state=data_position,
                          train_config=config.to_json())
    except run_checkpoints.NonFiniteParams as e:
      raise TrainingError(f'{e}; the last checkpoint ({manager.latest()}) is kept') from None
    log.note(f'saving {path}')

  return save


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when run as a command (``eval.glue`` and
  ``perceiver.convert`` have a ``--config`` too, and modules share one flag registry)."""
  config_flags.DEFINE_config_file('config', _CONFIG_FILE, 'Training config file[:preset].',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics.jsonl). '
                      'Default: checkpoints/<preset>.')


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2
  config = FLAGS.config
  workdir = FLAGS.workdir
  if not workdir:
    _, _, preset = FLAGS['config'].config_filename.partition(':')
    workdir = os.path.join('checkpoints', preset or 'smoke')

  def command():
    train(config, workdir)

  return cli.run(command, saved=f'the last complete checkpoint in {workdir} is kept',
                 stop_status=0)


# Config fields renamed since a release: an old name given on the command line is an
# error naming the new one.
RENAMED_FIELDS = {'data.shuffle_block': 'data.block_size'}


if __name__ == '__main__':
  cli.start(main, define_flags, stop_status=0, renamed=RENAMED_FIELDS)
