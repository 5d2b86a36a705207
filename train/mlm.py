r"""Masked-language-model pretraining of Perceiver IO on bytes.

    python -m train.mlm --config=train/configs/mlm.py:smoke --workdir=checkpoints/smoke

The same command runs on one CPU, one GPU, or every device of many hosts
(``--config.distributed.enabled=true``); the step is jit-compiled once and pmapped over
all devices. A run resumes from the newest checkpoint in ``--workdir`` by itself.
SIGTERM or Ctrl-C writes a checkpoint and exits 0; a non-finite loss stops the run with
an error and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Dict, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from perceiver import configs as model_configs
from perceiver import flops
from perceiver import transform
from train import checkpoints
from train import corpus
from train import data as data_lib
from train import host_memory
from train import masking
from train import optim
from train import step as step_lib
from train import writer as writer_lib

_CONFIG_FILE = os.path.join(os.path.dirname(__file__), 'configs', 'mlm.py')


class TrainingError(RuntimeError):
  """The run cannot continue (bad input, non-finite loss); the message says why."""


class _NonFinite(Exception):
  pass


# --------------------------------------------------------------------------------------
# Set-up.

def maybe_initialize_distributed(config) -> None:
  """Calls ``jax.distributed.initialize`` when ``distributed.enabled``."""
  if not config.distributed.enabled:
    return
  kwargs = {}
  if config.distributed.coordinator_address:
    kwargs['coordinator_address'] = config.distributed.coordinator_address
  if config.distributed.num_processes > 0:
    kwargs['num_processes'] = config.distributed.num_processes
  if config.distributed.process_id >= 0:
    kwargs['process_id'] = config.distributed.process_id
  jax.distributed.initialize(**kwargs)


def batch_layout(config) -> Dict[str, int]:
  """Splits ``train.batch_size`` over hosts, devices and accumulation steps."""
  devices, local = jax.device_count(), jax.local_device_count()
  accum = config.train.grad_accum_steps
  if accum < 1:
    raise TrainingError(f'train.grad_accum_steps must be >= 1, got {accum}')
  if config.train.batch_size % (devices * accum):
    raise TrainingError(
        f'train.batch_size={config.train.batch_size} must be divisible by devices '
        f'({devices}) x train.grad_accum_steps ({accum})')
  per_device = config.train.batch_size // (devices * accum)
  return {'per_device': per_device, 'accum': accum, 'local_devices': local,
          'host_batch': per_device * local * accum, 'devices': devices}


def _sources(config, cache_dir):
  sources, weights = [], []
  for name, spec in sorted(config.data.sources.items()):
    paths, _ = corpus.resolve(spec['paths'], cache_dir)
    files = data_lib.expand_paths(paths, f'data.sources.{name}.paths')
    sources.append(data_lib.DocumentSource(
        name, files, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), text_field=spec.get('text_field', 'text')))
    weights.append(spec['weight'])
  return sources, weights


def make_masker(config, for_training=True) -> masking.WordMasker:
  seq_len = config.model.max_seq_len
  max_predictions = None
  if for_training and config.train.decode_masked_only:
    max_predictions = config.train.max_predictions or masking.default_max_predictions(
        seq_len, config.masking.mask_prob)
  return masking.WordMasker(config.masking.mask_prob, config.masking.include_leading_space,
                            config.masking.bert_replacement, max_predictions,
                            unit=config.masking.get('unit', 'word'))


def train_batches(config, workdir, host_batch, state=None):
  sources, weights = _sources(config, os.path.join(workdir, 'data'))
  stream = data_lib.ExampleStream(
      sources, weights, seq_len=config.model.max_seq_len,
      docs_per_example=config.data.docs_per_example, separator=config.data.separator,
      shuffle_block=config.data.shuffle_block, seed=config.seed,
      process_index=jax.process_index())
  return data_lib.batches(stream, host_batch, make_masker(config), state)


def eval_batches(config, workdir, host_batch):
  """A fixed list of held-out masked batches (same every evaluation and every run)."""
  if (not config.data.eval_paths or config.train.eval_batches <= 0
      or config.train.eval_every <= 0):
    return []
  paths, _ = corpus.resolve(config.data.eval_paths, os.path.join(workdir, 'data'))
  files = data_lib.expand_paths(paths, 'data.eval_paths')
  source = data_lib.DocumentSource('eval', files, seed=config.seed + 1,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(),
                                   text_field=config.data.eval_text_field)
  stream = data_lib.ExampleStream(
      [source], [1.0], seq_len=config.model.max_seq_len,
      docs_per_example=config.data.docs_per_example, separator=config.data.separator,
      shuffle_block=max(host_batch, 16), seed=config.seed + 1,
      process_index=jax.process_index())
  it = data_lib.batches(stream, host_batch, make_masker(config, for_training=False))
  return [next(it)[0] for _ in range(config.train.eval_batches)]


def unigram_baseline(batches) -> Dict[str, float]:
  """What a model that ignores context scores on these batches' masked bytes.

  ``baseline_accuracy``: always predicting the most frequent masked byte;
  ``baseline_loss``: the entropy (nats) of the masked bytes' own distribution.
  """
  counts = np.zeros(256 + 6)
  for batch in batches:
    np.add.at(counts, batch['labels'][batch['weights'] > 0], 1)
  if not counts.sum():
    return {}
  p = counts[counts > 0] / counts.sum()
  return {'baseline_accuracy': float(p.max()), 'baseline_loss': float(-(p * np.log(p)).sum())}


# --------------------------------------------------------------------------------------
# The loss.

def make_loss_fn(model, decode_masked_only: bool, unmasked_weight: float = 0.0):
  """(params, rng, batch, is_training) -> (summed masked-byte cross-entropy, sums).

  ``unmasked_weight`` > 0 (this project's option, ``train.unmasked_loss_weight``): while
  training, each unmasked byte's cross-entropy (reconstructing the byte the model sees)
  is added to the objective with this weight relative to a masked byte. The logged
  ``loss`` stays the masked bytes' alone (returned as the ``loss`` metric sum, which
  ``train.step`` reports in place of the objective).
  """
  if unmasked_weight and decode_masked_only:
    raise TrainingError('train.unmasked_loss_weight needs every position decoded: set '
                        'train.decode_masked_only=false')

  def loss_fn(params, rng, batch, is_training):
    if decode_masked_only and is_training:
      logits = model.apply(params, rng, batch['input_ids'], batch['input_mask'],
                           is_training, query_positions=batch['masked_positions'],
                           query_mask=(batch['masked_weights'] > 0).astype(jnp.int32))
      labels, weights = batch['masked_labels'], batch['masked_weights']
    else:
      logits = model.apply(params, rng, batch['input_ids'], batch['input_mask'], is_training)
      labels, weights = batch['labels'], batch['weights']
    logits = logits.astype(jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    xent = jax.nn.logsumexp(logits, axis=-1) - label_logits
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    loss = jnp.sum(xent * weights)
    sums = {'correct': jnp.sum(correct * weights)}
    if unmasked_weight and is_training:
      unmasked = batch['input_mask'].astype(jnp.float32) * (1.0 - weights)
      sums['loss'] = loss
      loss = loss + unmasked_weight * jnp.sum(xent * unmasked)
    return loss, sums

  return loss_fn


def count_fn(batch):
  weights = batch['masked_weights'] if 'masked_weights' in batch else batch['weights']
  return jnp.sum(weights)


# --------------------------------------------------------------------------------------
# The loop.

class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_resume_config(saved, current, path):
  if saved.to_dict() != current.to_dict():
    saved_d = saved.to_dict()
    diffs = [k for k in set(saved_d) | set(current.to_dict())
             if saved_d.get(k) != current.to_dict().get(k)]
    raise TrainingError(f'{path} was trained with a different model config (fields: '
                        f'{", ".join(sorted(diffs))}); use another --workdir')


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Runs (or resumes) pretraining; returns the last logged train metrics."""
  maybe_initialize_distributed(config)
  model_configs.validate(config.model)
  layout = batch_layout(config)
  model = transform.masked_lm(config.model)
  optimizer = optim.make(config.optimizer)
  lr_fn = optim.schedule(config.optimizer)
  manager = checkpoints.CheckpointManager(workdir, keep=config.train.keep_checkpoints)
  log = writer_lib.MetricWriter(workdir, config.train.steps)

  seq_len = config.model.max_seq_len
  init_ids = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(jax.random.PRNGKey(config.seed), init_ids, jnp.ones_like(init_ids))
  opt_state = optimizer.init(params)
  rng = jax.random.PRNGKey(config.seed + 1)
  start_step, data_state = 0, None
  latest = manager.latest()
  if latest:
    _check_resume_config(manager.saved_config(latest), config.model, latest)
    params, _, meta, opt_state, rng = manager.restore(latest, opt_state, rng)
    start_step = meta['step']
    data_state = manager.load_data_state(start_step, meta)
    log.note(f'resuming from {latest} at step {start_step}')
  else:
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    log.note(f'new run in {workdir}: {count:,} parameters, {jax.device_count()} device(s) '
             f'on {jax.process_count()} host(s), per-device batch {layout["per_device"]} x '
             f'{layout["accum"]} accumulation step(s)')
  if start_step >= config.train.steps:
    log.note(f'already at step {start_step} >= train.steps={config.train.steps}; nothing to do')
    return {}

  state = step_lib.replicate(step_lib.TrainState(
      jnp.asarray(start_step, jnp.int32), params, opt_state, rng))
  loss_fn = make_loss_fn(model, config.train.decode_masked_only,
                         config.train.get('unmasked_loss_weight', 0.0))
  train_step = step_lib.make_train_step(loss_fn, count_fn, optimizer, lr_fn)
  eval_step = step_lib.make_eval_step(loss_fn, count_fn)
  held_out = eval_batches(config, workdir, layout['per_device'] * layout['local_devices'])

  num_queries = None
  if config.train.decode_masked_only:
    num_queries = make_masker(config).max_predictions
  step_flops = flops.masked_lm_train_step(config.model, seq_len, config.train.batch_size,
                                          num_queries)
  peak = config.train.peak_flops_per_device * jax.device_count()

  host_iter = data_lib.Prefetcher(
      train_batches(config, workdir, layout['host_batch'], data_state), config.data.prefetch)
  device_iter = step_lib.prefetch_to_device(host_iter, 2, layout['accum'])

  def save(step, data_position):
    host_state = step_lib.unreplicate(state)
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(host_state.params)):
      raise TrainingError(f'non-finite parameters at step {step}: not saved; the last '
                          f'checkpoint ({manager.latest()}) is kept')
    path = manager.save(step, host_state.params, config.model, opt_state=host_state.opt_state,
                        rng=host_state.rng, data_state=data_position,
                        train_config=config.to_json())
    log.note(f'saved {path}')

  baseline = unigram_baseline(held_out)

  def evaluate(step):
    if not held_out:
      return
    sums = None
    for batch in held_out:
      out = step_lib.unreplicate(eval_step(state.params, step_lib.shard(batch)))
      sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
    record = {'loss': sums['loss'] / max(sums['count'], 1),
              'accuracy': sums['correct'] / max(sums['count'], 1),
              'masked_bytes': sums['count'], **baseline}
    if baseline:
      # Above 0 once the model uses context: what a context-free guess cannot score.
      record['accuracy_gap'] = record['accuracy'] - baseline['baseline_accuracy']
      record['loss_gap'] = baseline['baseline_loss'] - record['loss']
    log.write(step, record, kind='eval')

  step = start_step
  last = {}
  max_seconds = config.train.get('max_seconds', 0.0)
  run_start = time.time()
  window = {'loss': 0.0, 'correct': 0.0, 'count': 0.0, 'steps': 0}
  window_start = time.time()
  log.start(step)
  pending = None   # (step, metrics) of the step in flight: checked one step late
  last_data = data_state
  with _StopRequest() as stop:
    try:
      while step < config.train.steps:
        batch, data_position = next(device_iter)
        state, metrics = train_step(state, batch)
        step += 1
        # Read the previous step's metrics while this one runs: no host round-trip
        # stalls the device.
        if pending is not None:
          _accumulate(window, pending[1], pending[0])
        pending = (step, metrics)
        last_data = data_position
        out_of_time = bool(max_seconds) and time.time() - run_start >= max_seconds
        at_log = (step % config.train.log_every == 0 or step == config.train.steps
                  or out_of_time)
        at_ckpt = (step % config.train.checkpoint_every == 0 or step == config.train.steps
                   or out_of_time)
        if at_log or at_ckpt or stop.signal is not None:
          _accumulate(window, pending[1], pending[0])
          pending = None
        if at_log and window['steps']:
          elapsed = time.time() - window_start
          last = _report(window, elapsed, config, step_flops, peak, seq_len)
          log.write(step, last)
          window = {'loss': 0.0, 'correct': 0.0, 'count': 0.0, 'steps': 0}
          window_start = time.time()
        if config.train.eval_every and (step % config.train.eval_every == 0 or out_of_time):
          evaluate(step)
        if at_ckpt or stop.signal is not None:
          save(step, last_data)
        if stop.signal is not None:
          log.note(f'stopped by signal {stop.signal} at step {step}; checkpoint written')
          break
        if out_of_time:
          log.note(f'stopped at step {step}: train.max_seconds={max_seconds:g} reached; '
                   'checkpoint written')
          break
    except _NonFinite as e:
      raise TrainingError(f'{e}: stopping without saving; the last good checkpoint is '
                          f'{manager.latest() or "none (none was written)"}') from None
    finally:
      host_iter.close()
  return last


def _accumulate(window, metrics, step):
  values = jax.device_get(jax.tree.map(lambda x: x[0], metrics))
  if not values['finite']:
    raise _NonFinite(f'non-finite loss or gradient at step {step}')
  window['loss'] += float(values['loss'])
  window['correct'] += float(values['correct'])
  window['count'] += float(values['count'])
  window['steps'] += 1
  window['learning_rate'] = float(values['learning_rate'])
  window['grad_norm'] = float(values['grad_norm'])


def _report(window, elapsed, config, step_flops, peak, seq_len) -> Dict[str, float]:
  step_time = elapsed / window['steps']
  report = {
      'loss': window['loss'] / max(window['count'], 1),
      'accuracy': window['correct'] / max(window['count'], 1),
      'learning_rate': window['learning_rate'],
      'grad_norm': window['grad_norm'],
      'step_time_s': step_time,
      'bytes_per_s': config.train.batch_size * seq_len / step_time,
  }
  if peak > 0:
    report['mfu'] = step_flops / step_time / peak
  return report


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', _CONFIG_FILE, 'Training config file[:preset].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics.jsonl). '
                    'Default: checkpoints/<preset>.')


def main(argv):
  del argv
  config = FLAGS.config
  workdir = FLAGS.workdir
  if not workdir:
    _, _, preset = FLAGS['config'].config_filename.partition(':')
    workdir = os.path.join('checkpoints', preset or 'smoke')
  try:
    train(config, workdir)
  except (TrainingError, data_lib.DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  host_memory.retain_freed_memory()   # before JAX starts its threads: see train.host_memory
  sys.exit(app.run(main))
