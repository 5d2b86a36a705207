r"""GLUE fine-tuning and evaluation of Perceiver IO: ``python -m eval.glue``.

    python -m eval.glue --task=rte --data_dir=GLUE_DIR --workdir=runs/glue \
        --init_checkpoint=checkpoints/language_perceiver_io_bytes.pickle
    python -m eval.glue --task=all --data_dir=GLUE_DIR --workdir=runs/smoke \
        --config=eval/configs/glue.py:smoke

``--task`` is one of cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, or ``all`` (every
task whose folder is in ``--data_dir``; the others are named in a warning and shown as
'-'). ``--init_checkpoint`` takes DeepMind's pickle, this project's checkpoint (e.g. from
``train.mlm``) or a Hugging Face checkpoint; without it the model starts from scratch.
``--sweep`` runs the config's grid of batch sizes x learning rates and keeps the best dev
score per task; ``--do_predict`` also writes the test predictions in the GLUE server's
format to ``DIR/submission/`` (``SST-2.tsv``, ``MNLI-m.tsv``, ``AX.tsv``, ...).

The model is the paper's single-task setup, ``perceiver.transform.classifier``: the
checkpoint's byte embeddings, position encoding and encoder (their names are the masked
LM's), then a new decoder with one trainable query and a 2-layer tanh MLP head to the
class logits (STS-B: one regression value). Examples are UTF-8 bytes without CLS; a pair
is ``a SEP b`` with the tokenizer's SEP id (5), the longer segment cut first when it does
not fit ``data.max_seq_len`` (``eval.glue_data.encode``). Each split is padded to its own
longest example rounded up to ``data.length_multiple``, so the train step and each
split's predict step compile once. Loss: softmax cross-entropy, or squared error for
STS-B, as sums over real examples divided by their global count (``train.step``), so the
update does not depend on the number of devices.

Outputs, per task in ``DIR/<task>/`` (with ``--sweep``, each grid point in
``DIR/<task>/bs<B>_lr<LR>/`` and the best point's files copied up, ``sweep.json`` listing
all points):

- ``dev_metrics.json``: the best epoch's dev metrics (``eval.metrics.task_metrics``), its
  epoch and step, every epoch's scores, truncation counts, timings and settings;
- ``dev_predictions.tsv`` (MNLI: ``dev_matched_predictions.tsv`` and
  ``dev_mismatched_predictions.tsv``): ``index<TAB>prediction<TAB>label``. The metrics
  are computed from the predictions exactly as written (STS-B scores with three
  decimals, as the submission files carry them), so the file reproduces them;
- ``checkpoint/ckpt_<step>.npz``: the best dev epoch's parameters (``train.checkpoints``,
  written atomically), loadable by ``perceiver.checkpoint.load``; its metadata holds the
  task, labels and ``num_outputs`` for ``transform.classifier``;
- ``metrics.jsonl`` (train and eval records) and ``log.txt`` (this task's log lines).

With ``--task=all``: ``DIR/glue_table.txt`` (the table printed at the end, beside the
paper's row) and ``DIR/glue_results.json``; ``DIR/log.txt`` collects every line.
A finished task's folder is not overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from eval import glue_data
from eval import glue_io
from eval import metrics as metrics_lib
from perceiver import checkpoint
from perceiver import transform
from train import checkpoints
from train import host_memory
from train import optim
from train import step as step_lib
from train import writer as writer_lib

_CONFIG_FILE = os.path.join(os.path.dirname(__file__), 'configs', 'glue.py')
_HEAD_MODULES = ('classification_decoder', 'classification_head')
SUBMISSION_DIR = 'submission'


class GlueError(RuntimeError):
  """The run cannot start or go on (bad settings, existing outputs, non-finite loss)."""


# Errors shown as one line and exit status 1, without a traceback.
USER_ERRORS = (GlueError, glue_data.GlueDataError, checkpoint.CheckpointError)


# --------------------------------------------------------------------------------------
# The log: stdout, and the log files of the run and of the task in progress.

class _FileHandler(logging.Handler):
  """Copies Python logging warnings (e.g. ``eval.glue_data``'s) into a log file."""

  def __init__(self, file):
    super().__init__(level=logging.WARNING)
    self.file = file

  def emit(self, record):
    self.file.write(f'warning: {record.getMessage()}\n')
    self.file.flush()


class RunLog:
  """A text stream writing to ``stream`` and to every log file currently open."""

  def __init__(self, stream=None):
    self.stream = stream or sys.stdout
    self._files = []

  def write(self, text: str):
    self.stream.write(text)
    for f in self._files:
      f.write(text)

  def flush(self):
    self.stream.flush()
    for f in self._files:
      f.flush()

  def note(self, message: str):
    self.write(message + '\n')
    self.flush()

  def warn(self, message: str):
    self.note(f'warning: {message}')

  @contextlib.contextmanager
  def to_file(self, path: str, mode: str = 'a'):
    """While inside, every line (and Python logging warnings) also goes to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path, mode, encoding='utf-8')  # pylint: disable=consider-using-with
    handler = _FileHandler(f)
    logging.getLogger().addHandler(handler)
    self._files.append(f)
    try:
      yield
    finally:
      self._files.remove(f)
      logging.getLogger().removeHandler(handler)
      f.close()


# --------------------------------------------------------------------------------------
# Data: each split read and encoded once, as compact arrays.

@dataclasses.dataclass
class EncodedSplit:
  """One split's model inputs, padded to the split's own length.

  Attributes:
    name: 'train', 'dev', 'dev_matched', 'test', 'diagnostic', ...
    path: the file it was read from.
    indices: each example's index as the file gives it (``Example.index``).
    input_ids: int16 [n, length] byte ids, 0 (PAD) after the end.
    input_mask: int8 [n, length], 1 on real bytes.
    labels: int32 label ids, float32 STS-B scores, or None (test).
    num_truncated: examples cut to ``max_seq_len``.
  """
  name: str
  path: str
  indices: List[str]
  input_ids: np.ndarray
  input_mask: np.ndarray
  labels: Optional[np.ndarray]
  num_truncated: int

  def __len__(self):
    return len(self.indices)

  @property
  def length(self) -> int:
    return self.input_ids.shape[1]


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def encode_split(task: glue_data.Task, split: glue_data.Split, name: str, max_seq_len: int,
                 length_multiple: int = 32, chunk: int = 8192) -> EncodedSplit:
  """Encodes a split ``chunk`` examples at a time (never all at ``max_seq_len``).

  The result is padded to the longest encoded example rounded up to ``length_multiple``
  and capped at ``max_seq_len``.
  """
  examples = split.examples
  if not examples:
    raise GlueError(f'{split.path}: no examples')
  pieces, truncated, longest = [], 0, 1
  for start in range(0, len(examples), chunk):
    enc = glue_data.encode(examples[start:start + chunk], task, max_seq_len)
    used = int(enc.input_mask.sum(axis=1).max())
    keep = min(_round_up(max(used, 1), length_multiple), max_seq_len)
    pieces.append((enc.input_ids[:, :keep].astype(np.int16),
                   enc.input_mask[:, :keep].astype(np.int8), enc.labels))
    truncated += enc.num_truncated
    longest = max(longest, used)
  length = min(_round_up(longest, length_multiple), max_seq_len)
  ids = np.zeros((len(examples), length), np.int16)
  mask = np.zeros((len(examples), length), np.int8)
  row = 0
  for piece_ids, piece_mask, _ in pieces:
    ids[row:row + len(piece_ids), :piece_ids.shape[1]] = piece_ids
    mask[row:row + len(piece_ids), :piece_ids.shape[1]] = piece_mask
    row += len(piece_ids)
  labels = None if pieces[0][2] is None else np.concatenate([p[2] for p in pieces])
  return EncodedSplit(name, split.path, [e.index for e in examples], ids, mask, labels,
                      truncated)


def _split_names(task: glue_data.Task, data_dir: str, with_test: bool, log: RunLog):
  names = ['train', *task.dev_splits]
  if with_test:
    names += list(task.test_splits)
    if 'diagnostic' in [s.name for s in task.splits]:
      layout = task.layout('diagnostic')
      if os.path.isfile(os.path.join(data_dir, layout.path)):
        names.append('diagnostic')
      else:
        log.warn(f'{os.path.join(data_dir, layout.path)} not found: {layout.submission} '
                 '(the diagnostic set, predicted with the MNLI model) is not written')
  return names


def load_task_data(task: glue_data.Task, data_dir: str, config, max_seq_len: int, *,
                   with_test: bool, log: RunLog) -> Dict[str, EncodedSplit]:
  """Reads and encodes train, the dev split(s), and with ``with_test`` the test split(s)."""
  data = {}
  for name in _split_names(task, data_dir, with_test, log):
    split = glue_data.load_split(data_dir, task, name)
    log.note(f'  {split.summary()}')
    cap = config.data.max_train_examples
    if name == 'train' and 0 < cap < len(split.examples):
      keep = np.sort(np.random.default_rng(config.seed).choice(len(split.examples), cap,
                                                               replace=False))
      log.note(f'  train: a random {cap} of its {len(split.examples)} examples '
               '(data.max_train_examples)')
      split = dataclasses.replace(split, examples=[split.examples[i] for i in keep])
    enc = encode_split(task, split, name, max_seq_len, config.data.length_multiple,
                       config.data.encode_chunk)
    log.note(f'  {name}: {len(enc)} examples, padded to {enc.length} bytes; '
             f'{enc.num_truncated} cut to max_seq_len={max_seq_len} bytes')
    data[name] = enc
  return data


def _host_batch(split: EncodedSplit, rows: np.ndarray, size: int) -> Dict[str, np.ndarray]:
  """Rows of a split as a batch of ``size``, filled up with zero-weight padding rows."""
  n = len(rows)
  batch = {'input_ids': np.zeros((size, split.length), np.int32),
           'input_mask': np.zeros((size, split.length), np.int32),
           'weights': np.zeros((size,), np.float32)}
  batch['input_ids'][:n] = split.input_ids[rows]
  batch['input_mask'][:n] = split.input_mask[rows]
  batch['weights'][:n] = 1.0
  if split.labels is not None:
    batch['labels'] = np.zeros((size,), split.labels.dtype)
    batch['labels'][:n] = split.labels[rows]
  return batch


def epoch_batches(split: EncodedSplit, batch_size: int, seed: int, epoch: int):
  """One epoch in a seeded random order: (batch, None) pairs, every example once."""
  order = np.random.default_rng([seed, epoch]).permutation(len(split))
  for start in range(0, len(order), batch_size):
    yield _host_batch(split, order[start:start + batch_size], batch_size), None


# --------------------------------------------------------------------------------------
# The model and where its parameters come from.

@dataclasses.dataclass
class Init:
  """The model config and the trunk parameters every task starts from.

  Attributes:
    model_config: the classifier's config (with this run's dropout).
    trunk: {module: {name: array}} of the embeddings and encoder, or None (scratch).
    source: a short description for logs and metadata.
    unused: the checkpoint's modules the classifier does not use (the MLM decoder).
  """
  model_config: ml_collections.ConfigDict
  trunk: Optional[Dict[str, Dict[str, np.ndarray]]]
  source: str
  unused: List[str]


def is_head_module(module: str) -> bool:
  """Whether a parameter module is the classifier's new decoder or head (not the trunk)."""
  return module.startswith(_HEAD_MODULES)


def _with_dropout(model_config, config) -> ml_collections.ConfigDict:
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  if 'classifier' not in model_config:
    raise GlueError('the model config has no "classifier" block (the decoder and head '
                    'settings perceiver.configs.language() adds)')
  model_config.encoder.dropout_prob = float(config.dropout.encoder)
  model_config.classifier.head_dropout_prob = float(config.dropout.head)
  return model_config


def trunk_shapes(model_config) -> Dict[str, Dict[str, tuple]]:
  """The {module: {name: shape}} of the classifier's trunk (embeddings and encoder)."""
  expected = checkpoint.expected_shapes(transform.classifier(model_config, 1), model_config)
  return {m: s for m, s in expected.items() if not is_head_module(m)}


def load_init(config, init_checkpoint: Optional[str], log: RunLog) -> Init:
  """The model config and trunk parameters: from ``init_checkpoint``, or from scratch.

  Raises:
    CheckpointError: naming the file, when it is unreadable or its trunk parameters
      are missing or mis-shaped.
  """
  if not init_checkpoint:
    log.note('no --init_checkpoint: the model starts from scratch (every parameter '
             'randomly initialised; model config from the config file)')
    return Init(_with_dropout(config.model, config), None, 'scratch', [])
  params, model_config, meta = checkpoint.load_any(init_checkpoint)
  try:
    model_config = _with_dropout(model_config, config)
  except GlueError as e:
    raise checkpoint.CheckpointError(f'{init_checkpoint}: {e}') from None
  want = trunk_shapes(model_config)
  trunk = {m: dict(params[m]) for m in params if m in want}
  checkpoint.check_params(trunk, want, source=f'{init_checkpoint} (the classifier trunk)')
  unused = sorted(m for m in params if m not in want)
  kind = meta.get('source', 'project') if isinstance(meta, dict) else 'project'
  log.note(f'init checkpoint {init_checkpoint} ({kind} format): model config from it '
           '(the config file\'s "model" is not used)')
  return Init(model_config, trunk, init_checkpoint, unused)


def _count(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def init_params(model, init: Init, seed: int, length: int, log: Optional[RunLog] = None):
  """Fresh parameters with the trunk replaced by ``init.trunk`` (exact copies)."""
  ids = jnp.zeros((1, length), jnp.int32)
  # Jitted: one compilation instead of one per initialiser op.
  params = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(seed), ids,
                                              jnp.ones_like(ids)))
  params = {m: dict(leaves) for m, leaves in params.items()}
  head = {m: v for m, v in params.items() if is_head_module(m)}
  trunk_modules = sorted({m.split('/')[0] for m in params if not is_head_module(m)})
  if init.trunk is not None:
    for module, leaves in init.trunk.items():
      params[module] = {name: np.asarray(value, dtype=params[module][name].dtype)
                        for name, value in leaves.items()}
  if log is not None:
    trunk = {m: v for m, v in params.items() if not is_head_module(m)}
    where = 'randomly initialised' if init.trunk is None else f'copied from {init.source}'
    log.note(f'  parameters: trunk ({", ".join(trunk_modules)}; {_count(trunk):,} values) '
             f'{where}; {" and ".join(_HEAD_MODULES)} ({_count(head):,} values) newly '
             f'initialised (seed {seed})')
    if init.unused:
      log.note(f'  not used from the checkpoint: {", ".join(init.unused)}')
  return params


def make_loss_fn(model, regression: bool):
  """(params, rng, batch, is_training) -> (loss sum over real examples, metric sums)."""

  def loss_fn(params, rng, batch, is_training):
    out = model.apply(params, rng, batch['input_ids'], batch['input_mask'],
                      is_training).astype(jnp.float32)
    weights = batch['weights']
    if regression:
      error = out[:, 0] - batch['labels']
      return jnp.sum(weights * error * error), {}
    labels = batch['labels']
    xent = (jax.nn.logsumexp(out, axis=-1) -
            jnp.take_along_axis(out, labels[:, None], axis=-1)[:, 0])
    correct = (jnp.argmax(out, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(weights * xent), {'correct': jnp.sum(weights * correct)}

  return loss_fn


def count_fn(batch):
  return jnp.sum(batch['weights'])


def make_predict_fn(model):
  """(params, batch) -> float32 outputs [B, num_outputs] (logits, or the STS-B score)."""

  def predict_fn(params, batch):
    return model.apply(params, None, batch['input_ids'], batch['input_mask'],
                       False).astype(jnp.float32)

  return predict_fn


# --------------------------------------------------------------------------------------
# Prediction and scoring.

def predict(predict_step, params, split: EncodedSplit, batch_size: int) -> np.ndarray:
  """Outputs [n, num_outputs] for every example of ``split`` (params replicated)."""
  pending = []
  for start in range(0, len(split), batch_size):
    rows = np.arange(start, min(start + batch_size, len(split)))
    batch = _host_batch(split, rows, batch_size)
    inputs = {k: batch[k] for k in ('input_ids', 'input_mask')}
    pending.append((len(rows), predict_step(params, step_lib.shard(inputs))))
  return np.concatenate([step_lib.gather_examples(out)[:n] for n, out in pending])


def as_written(task: glue_data.Task, values) -> np.ndarray:
  """Predictions or labels as the prediction files hold them: ids, or 3-decimal scores."""
  if task.is_regression:
    return np.asarray([float(t) for t in glue_io.format_predictions(task, values)])
  return np.asarray(values)


def predictions_from_outputs(task: glue_data.Task, outputs: np.ndarray) -> np.ndarray:
  """Label ids (argmax), or the STS-B score (unclipped)."""
  if task.is_regression:
    return outputs[:, 0].astype(np.float64)
  return np.argmax(outputs, axis=-1).astype(np.int64)


def dev_loss(task: glue_data.Task, outputs: np.ndarray, labels: np.ndarray) -> float:
  outputs = outputs.astype(np.float64)
  if task.is_regression:
    return float(np.mean((outputs[:, 0] - labels) ** 2))
  top = outputs.max(axis=-1, keepdims=True)
  logz = np.log(np.exp(outputs - top).sum(axis=-1)) + top[:, 0]
  return float(np.mean(logz - outputs[np.arange(len(labels)), labels]))


def selection_score(task: glue_data.Task, results: Dict[str, Dict[str, float]]) -> float:
  """The main score (MNLI: the mean of -m and -mm) that picks the best epoch and point."""
  keys = [task.result_key(split) for split in task.dev_splits]
  return float(np.mean([metrics_lib.main_score(key, results[key]) for key in keys]))


# --------------------------------------------------------------------------------------
# One fine-tuning run (one grid point).

@dataclasses.dataclass
class RunResult:
  """The best dev epoch of one run.

  Attributes:
    run_dir: where its files are.
    summary: what its ``dev_metrics.json`` holds.
    score: ``selection_score`` of the best epoch.
    params: the best epoch's parameters (host arrays).
  """
  run_dir: str
  summary: Dict[str, Any]
  score: float
  params: Any


def _layout(batch_size: int, accum: int, field: str) -> int:
  devices = jax.local_device_count()
  if accum < 1:
    raise GlueError(f'train.grad_accum_steps must be >= 1, got {accum}')
  if batch_size < 1 or batch_size % (devices * accum):
    raise GlueError(f'{field}={batch_size} must be a positive multiple of devices '
                    f'({devices}) x train.grad_accum_steps ({accum})')
  return batch_size // (devices * accum)


def _optimizer_config(config, learning_rate: float, total_steps: int):
  opt = ml_collections.ConfigDict(config.optimizer.to_dict())
  opt.learning_rate = float(learning_rate)
  opt.decay_steps = opt.decay_steps or total_steps
  return opt


def _train_report(window, epoch, regression) -> Dict[str, Any]:
  """The window's mean loss (and accuracy), last learning rate and grad norm, speed."""
  values = jax.device_get([jax.tree.map(lambda x: x[0], m) for m in window['metrics']])
  elapsed = time.time() - window['time']   # after the fetch: the steps have run
  bad = [window['first'] + i for i, v in enumerate(values) if not v['finite']]
  if bad:
    raise GlueError(f'non-finite loss or gradient at step {bad[0]}')
  count = max(sum(float(v['count']) for v in values), 1.0)
  report = {'epoch': epoch, 'loss': sum(float(v['loss']) for v in values) / count}
  if not regression:
    report['accuracy'] = sum(float(v['correct']) for v in values) / count
  report.update(learning_rate=float(values[-1]['learning_rate']),
                grad_norm=float(values[-1]['grad_norm']),
                examples_per_s=count / max(elapsed, 1e-9))
  return report


def _evaluate(task, data, predict_step, params, eval_batch):
  """(results by result key, dev loss, predictions by split, labels by split)."""
  results, losses, preds, golds = {}, [], {}, {}
  for split in task.dev_splits:
    enc = data[split]
    outputs = predict(predict_step, params, enc, eval_batch)
    preds[split] = predictions_from_outputs(task, outputs)
    golds[split] = enc.labels
    results[task.result_key(split)] = metrics_lib.task_metrics(
        task.result_key(split), as_written(task, preds[split]), as_written(task, enc.labels))
    losses.append(dev_loss(task, outputs, enc.labels))
  return results, float(np.mean(losses)), preds, golds


def _eval_record(epoch, results, loss, score) -> Dict[str, Any]:
  record = {'epoch': epoch, 'loss': loss, 'score': score}
  for key, values in results.items():
    record.update({f'{key}/{name}': value for name, value in values.items()})
  return record


def finetune(task: glue_data.Task, data: Dict[str, EncodedSplit], init: Init, config,
             run_dir: str, log: RunLog, *, batch_size: int, learning_rate: float,
             batch_field: str = 'train.batch_size') -> RunResult:
  """Fine-tunes on ``data['train']``, evaluating the dev split(s) after every epoch.

  Writes the best epoch's checkpoint, its dev predictions and ``metrics.jsonl`` under
  ``run_dir``; returns its summary (``dev_metrics.json`` is written by the caller).
  """
  start_time = time.time()
  train = data['train']
  accum = config.train.grad_accum_steps
  _layout(batch_size, accum, batch_field)
  devices = jax.local_device_count()
  eval_batch = _round_up(max(config.eval.batch_size, 1), devices)
  epochs = config.train.epochs
  for field in ('epochs', 'log_every'):
    if config.train[field] < 1:
      raise GlueError(f'train.{field} must be >= 1, got {config.train[field]}')
  steps_per_epoch = math.ceil(len(train) / batch_size)
  total = epochs * steps_per_epoch
  opt_config = _optimizer_config(config, learning_rate, total)
  optimizer = optim.make(opt_config, platform=step_lib.platform())
  model = transform.classifier(init.model_config, task.num_outputs,
                               platform=step_lib.platform())
  params = init_params(model, init, config.seed, train.length, log)
  log.note(f'  {len(train)} train examples, batch {batch_size} ({devices} device(s) x '
           f'{accum} accumulation step(s)), {steps_per_epoch} steps/epoch x {epochs} '
           f'epochs = {total} steps; learning rate {learning_rate:g} ({opt_config.name}, '
           f'warm-up {opt_config.warmup_steps}, {opt_config.decay} decay to step '
           f'{opt_config.decay_steps})')
  state = step_lib.replicate(step_lib.TrainState(
      jnp.asarray(0, jnp.int32), params, optimizer.init(params),
      jax.random.PRNGKey(config.seed + 1)))
  loss_fn = make_loss_fn(model, task.is_regression)
  train_step = step_lib.make_train_step(loss_fn, count_fn, optimizer,
                                        optim.schedule(opt_config))
  predict_step = step_lib.make_predict_step(make_predict_fn(model))
  manager = checkpoints.CheckpointManager(os.path.join(run_dir, 'checkpoint'), keep=1)
  writer = writer_lib.MetricWriter(run_dir, total, stream=log)
  writer.start(0)

  step, best, history = 0, None, []
  for epoch in range(1, epochs + 1):
    window = {'metrics': [], 'first': step + 1, 'time': time.time()}
    batches = step_lib.prefetch_to_device(
        epoch_batches(train, batch_size, config.seed, epoch), 2, accum)
    for batch, _ in batches:
      state, step_metrics = train_step(state, batch)
      step += 1
      window['metrics'].append(step_metrics)
      if step % config.train.log_every == 0 or step == epoch * steps_per_epoch:
        writer.write(step, _train_report(window, epoch, task.is_regression))
        window = {'metrics': [], 'first': step + 1, 'time': time.time()}
    results, loss, preds, golds = _evaluate(task, data, predict_step, state.params,
                                            eval_batch)
    score = selection_score(task, results)
    writer.write(step, _eval_record(epoch, results, loss, score), kind='eval')
    history.append({'epoch': epoch, 'step': step, 'dev_loss': loss, 'score': score,
                    'results': results})
    if best is None or score > best['score']:
      host_params = step_lib.unreplicate(state.params)
      path = manager.save(step, host_params, init.model_config, task=task.name,
                          labels=list(task.labels), num_outputs=task.num_outputs,
                          epoch=epoch, dev_results=results, init=init.source,
                          glue_config=config.to_json())
      best = {'epoch': epoch, 'step': step, 'score': score, 'results': results,
              'preds': preds, 'golds': golds, 'params': host_params, 'path': path}
      writer.note(f'  epoch {epoch}: new best dev score {score:.4f}; saved {path}')

  for split in task.dev_splits:
    glue_io.write_dev_predictions(os.path.join(run_dir, f'{split}_predictions.tsv'), task,
                                  data[split].indices, best['preds'][split],
                                  best['golds'][split])
  summary = {
      'task': task.name,
      'results': best['results'],
      'main_score': best['score'],
      'best_epoch': best['epoch'],
      'best_step': best['step'],
      'checkpoint': os.path.relpath(best['path'], run_dir),
      'epochs': history,
      'batch_size': batch_size,
      'learning_rate': float(learning_rate),
      'total_steps': total,
      'num_examples': {name: len(enc) for name, enc in data.items()},
      'num_truncated': {name: enc.num_truncated for name, enc in data.items()},
      'padded_length': {name: enc.length for name, enc in data.items()},
      'max_seq_len': resolve_max_seq_len(config, init.model_config),
      'init': init.source,
      'devices': devices,
      'run_time_s': time.time() - start_time,
  }
  return RunResult(run_dir, summary, best['score'], best['params'])


# --------------------------------------------------------------------------------------
# One task (one run, or a sweep), and all of them.

_OUTPUT_FILES = ('dev_metrics.json', 'metrics.jsonl', 'sweep.json', 'log.txt')


def prepare_task_dir(task_dir: str, overwrite: bool, clean: bool):
  """Refuses a finished task folder unless ``overwrite``; with ``clean``, removes the
  files an earlier (finished or interrupted) run of this command left there."""
  finished = os.path.join(task_dir, 'dev_metrics.json')
  if os.path.exists(finished) and not overwrite:
    raise GlueError(f'{task_dir} already holds a finished run ({finished}); pass '
                    '--overwrite to replace it, or use another --workdir')
  if not clean or not os.path.isdir(task_dir):
    return
  for root, _, files in os.walk(task_dir):
    for name in files:
      ours = (name in _OUTPUT_FILES or name.endswith('_predictions.tsv') or
              (os.path.basename(root) == 'checkpoint' and name.startswith('ckpt_')))
      if ours:
        os.remove(os.path.join(root, name))


def _point_name(batch_size: int, learning_rate: float) -> str:
  return f'bs{batch_size}_lr{learning_rate:g}'


def resolve_max_seq_len(config, model_config) -> int:
  cap = config.data.max_seq_len or model_config.max_seq_len
  if not 1 < cap <= model_config.max_seq_len:
    raise GlueError(f'data.max_seq_len={config.data.max_seq_len} must be in '
                    f'[2, {model_config.max_seq_len}] (the model\'s max_seq_len), or 0')
  if config.data.length_multiple < 1:
    raise GlueError(f'data.length_multiple must be >= 1, got {config.data.length_multiple}')
  return cap


def _grid(config, sweep: bool):
  if not sweep:
    return [(config.train.batch_size, config.optimizer.learning_rate, 'train.batch_size')]
  points = [(int(b), float(lr), 'sweep.batch_sizes') for b in config.sweep.batch_sizes
            for lr in config.sweep.learning_rates]
  if not points:
    raise GlueError('--sweep: sweep.batch_sizes and sweep.learning_rates must not be empty')
  return points


def _predict_test(task, data, init, params, config, out_dir, log) -> List[str]:
  model = transform.classifier(init.model_config, task.num_outputs,
                               platform=step_lib.platform())
  predict_step = step_lib.make_predict_step(make_predict_fn(model))
  replicated = step_lib.replicate(params)
  eval_batch = _round_up(max(config.eval.batch_size, 1), jax.local_device_count())
  written = []
  for split in list(task.test_splits) + (['diagnostic'] if 'diagnostic' in data else []):
    enc = data[split]
    outputs = predict(predict_step, replicated, enc, eval_batch)
    written.append(glue_io.write_submission(out_dir, task, split, enc.indices,
                                            predictions_from_outputs(task, outputs)))
    log.note(f'  wrote {written[-1]} ({len(enc)} test predictions)')
  return written


def _adopt_best_point(task, task_dir: str, best: RunResult, points: List[dict],
                      log: RunLog) -> Dict[str, Any]:
  """Writes ``sweep.json`` and copies the best point's predictions and metrics.jsonl up."""
  point = os.path.basename(best.run_dir)
  summary = dict(best.summary, checkpoint=os.path.join(point, best.summary['checkpoint']),
                 sweep={'best': point, 'points': points})
  glue_io.write_json_atomic(os.path.join(task_dir, 'sweep.json'), summary['sweep'])
  names = [f'{split}_predictions.tsv' for split in task.dev_splits] + ['metrics.jsonl']
  for name in names:
    shutil.copyfile(os.path.join(best.run_dir, name), os.path.join(task_dir, name))
  log.note(f'  best grid point: {point} (dev score {best.score:.4f})')
  return summary


def run_task(task_name: str, config, data_dir: str, workdir: str, init: Init, *,
             do_predict: bool = False, sweep: bool = False, overwrite: bool = False,
             log: Optional[RunLog] = None) -> Dict[str, Any]:
  """Fine-tunes and evaluates one task; returns its ``dev_metrics.json`` content."""
  log = log or RunLog()
  task = glue_data.get_task(task_name)
  task_dir = os.path.join(workdir, task.name)
  points = _grid(config, sweep)
  prepare_task_dir(task_dir, overwrite, clean=True)
  start = time.time()
  with log.to_file(os.path.join(task_dir, 'log.txt'), mode='w'):
    max_seq_len = resolve_max_seq_len(config, init.model_config)
    kind = ('regression (mean squared error)' if task.is_regression else
             f'{task.num_outputs}-way classification ({", ".join(task.labels)})')
    log.note(f'== {task.name} ({task.directory}): {kind}; main metric {task.main_metric}')
    data = load_task_data(task, data_dir, config, max_seq_len, with_test=do_predict, log=log)
    best, points_done = None, []
    for i, (batch_size, lr, field) in enumerate(points):
      run_dir = task_dir
      if sweep:
        run_dir = os.path.join(task_dir, _point_name(batch_size, lr))
        log.note(f'-- {task.name}: grid point {i + 1}/{len(points)}: batch {batch_size}, '
                 f'learning rate {lr:g} -> {run_dir}')
      result = finetune(task, data, init, config, run_dir, log, batch_size=batch_size,
                        learning_rate=lr, batch_field=field)
      if sweep:
        glue_io.write_json_atomic(os.path.join(run_dir, 'dev_metrics.json'), result.summary)
        points_done.append({'batch_size': batch_size, 'learning_rate': lr,
                            'dir': os.path.basename(run_dir), 'main_score': result.score,
                            'results': result.summary['results']})
      if best is None or result.score > best.score:
        best = result
    summary = dict(best.summary)
    if sweep:
      summary = _adopt_best_point(task, task_dir, best, points_done, log)
    if do_predict:
      written = _predict_test(task, data, init, best.params, config,
                              os.path.join(workdir, SUBMISSION_DIR), log)
      summary['submission'] = [os.path.relpath(path, task_dir) for path in written]
    summary['wall_time_s'] = time.time() - start
    glue_io.write_json_atomic(os.path.join(task_dir, 'dev_metrics.json'), summary)
    scores = '; '.join(f'{key} ' + ', '.join(f'{name} {100 * value:.2f}'
                                             for name, value in values.items())
                       for key, values in summary['results'].items())
    log.note(f'== {task.name}: best epoch {summary["best_epoch"]}: {scores} '
             f'({summary["wall_time_s"]:.0f}s)')
  return summary


def available_tasks(data_dir: str) -> tuple:
  """(tasks whose folder is in ``data_dir``, tasks whose folder is not), in GLUE order."""
  present = [t for t in glue_data.TASKS.values()
             if os.path.isdir(os.path.join(data_dir, t.directory))]
  missing = [t for t in glue_data.TASKS.values() if t not in present]
  return [t.name for t in present], [t.name for t in missing]


def _check_task_arg(task: str):
  if task != 'all' and task not in glue_data.TASKS:
    raise GlueError(f'unknown task {task!r}; known tasks: {", ".join(glue_data.TASKS)}, '
                    'or all')


def run(task: str, config, data_dir: str, workdir: str, init_checkpoint: Optional[str] = None,
        *, do_predict: bool = False, sweep: bool = False, overwrite: bool = False,
        log: Optional[RunLog] = None) -> Dict[str, Any]:
  """The command: one task or ``all``; returns what ``glue_results.json`` holds."""
  log = log or RunLog()
  _check_task_arg(task)
  if not os.path.isdir(data_dir):
    raise GlueError(f'--data_dir {data_dir}: no such directory (expected the GLUE download '
                    'script\'s layout: CoLA/, SST-2/, MRPC/, ...)')
  if task == 'all':
    names, missing = available_tasks(data_dir)
    if not names:
      raise GlueError(f'--data_dir {data_dir} holds none of the GLUE task folders '
                      f'({", ".join(t.directory for t in glue_data.TASKS.values())})')
  else:
    names, missing = [task], []
    folder = os.path.join(data_dir, glue_data.TASKS[task].directory)
    if not os.path.isdir(folder):
      raise GlueError(f'{task}: folder {folder} not found (the GLUE download script '
                      f'puts {task} in {glue_data.TASKS[task].directory}/ under --data_dir)')
  for name in names:   # before any work: refuse finished outputs up front
    prepare_task_dir(os.path.join(workdir, name), overwrite, clean=False)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  with log.to_file(os.path.join(workdir, 'log.txt')):
    log.note(f'eval.glue: --task={task} on {jax.local_device_count()} device(s) '
             f'({jax.devices()[0].platform}); data {data_dir}; outputs {workdir}')
    if missing:
      log.warn(f'no folder in {data_dir} for: ' + ', '.join(
          f'{name} ({glue_data.TASKS[name].directory}/)' for name in missing) +
               '; shown as "-" in the table')
    init = load_init(config, init_checkpoint, log)
    summaries, wall = {}, {}
    for i, name in enumerate(names):
      log.note(f'[{i + 1}/{len(names)}] {name}')
      summaries[name] = run_task(name, config, data_dir, workdir, init,
                                 do_predict=do_predict, sweep=sweep, overwrite=overwrite,
                                 log=log)
      wall[name] = summaries[name]['wall_time_s']
    wall['total'] = time.time() - start
    results = {key: values for s in summaries.values() for key, values in s['results'].items()}
    table = metrics_lib.format_table(results)
    scores = {key: metrics_lib.main_score(key, values) for key, values in results.items()}
    out = {
        'task': task, 'tasks_run': names, 'missing_tasks': missing, 'results': results,
        'average': metrics_lib.glue_average(scores), 'paper': metrics_lib.PAPER_RESULTS,
        'paper_average': metrics_lib.PAPER_AVERAGE, 'wall_time_s': wall,
        'init': init.source, 'sweep': sweep, 'config': json.loads(config.to_json()),
    }
    if task == 'all':
      glue_io.write_json_atomic(os.path.join(workdir, 'glue_results.json'), out)
      glue_io.write_text_atomic(os.path.join(workdir, 'glue_table.txt'), table + '\n')
      log.note('\n' + table)
      log.note('wall time: ' + ', '.join(f'{k} {v:.0f}s' for k, v in wall.items()))
  return out


# --------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when run as a command (``train.mlm`` also has a
  ``--config`` flag, and both modules may be imported into one process)."""
  config_flags.DEFINE_config_file('config', _CONFIG_FILE, 'GLUE config file[:preset] '
                                  '(presets: paper, smoke).', lock_config=True)
  flags.DEFINE_string('task', None, 'cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, '
                      'or all (every task whose folder is in --data_dir).')
  flags.DEFINE_string('data_dir', None, 'The GLUE directory, as the download script lays '
                      'it out (CoLA/, SST-2/, ...).')
  flags.DEFINE_string('workdir', None, 'Output directory: DIR/<task>/ per task.')
  flags.DEFINE_string('init_checkpoint', None, "DeepMind's pickle, this project's "
                      'checkpoint, or a Hugging Face checkpoint; without it the model '
                      'starts from scratch.')
  flags.DEFINE_bool('do_predict', False, 'Also write the test predictions in the GLUE '
                    "server's format to DIR/submission/.")
  flags.DEFINE_bool('sweep', False, 'Run the grid sweep.batch_sizes x sweep.learning_rates '
                    'and keep the best dev score per task.')
  flags.DEFINE_bool('overwrite', False, 'Replace a task folder that holds a finished run.')
  flags.mark_flags_as_required(['task', 'data_dir', 'workdir'])


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2
  try:
    run(FLAGS.task, FLAGS.config, FLAGS.data_dir, FLAGS.workdir, FLAGS.init_checkpoint,
        do_predict=FLAGS.do_predict, sweep=FLAGS.sweep, overwrite=FLAGS.overwrite)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  host_memory.retain_freed_memory()   # before JAX starts its threads: see train.host_memory
  define_flags()
  app.run(main)
