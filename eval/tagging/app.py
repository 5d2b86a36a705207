r"""Token classification (NER, POS) with Perceiver IO: ``python -m eval.tagging``.

    python -m eval.tagging --data_dir=CONLL2003_DIR --workdir=runs/ner \
        --init_checkpoint=checkpoints/language_perceiver_io_bytes.pickle
    python -m eval.tagging --format=conllu --data_dir=UD_English-EWT --workdir=runs/upos \
        --config=eval/configs/tagging.py:smoke

``--data_dir`` holds ``train.txt``, ``valid.txt`` (or ``testa``) and optionally
``test.txt`` (or ``testb``) in the CoNLL-2003 layout, or, with ``--format=conllu``,
``*train.conllu``, ``*dev.conllu`` and optionally ``*test.conllu`` (tags: UPOS); see
``eval.tagging.data``. ``--init_checkpoint`` takes DeepMind's pickle, this project's
checkpoint (e.g. from ``train.mlm``) or a Hugging Face checkpoint; without it the model
starts from scratch.

The model is ``perceiver.transform.token_classifier``: the checkpoint's byte embeddings,
input positions and encoder (and by default its MLM decoder, ``init.mlm_decoder``), one
decoder query per word's first byte, and an MLP head to the tags. Words are joined with
single spaces; each word's tag is read at its first byte. The loss, scores and outputs
are ``eval.tagging.task``'s, run on the fine-tuning skeleton ``eval.finetune`` shared with
GLUE; the loop, steps, checkpoints, resume and signals are ``perceiver.training``'s.

Every file is read and checked before training. A rerun resumes an interrupted run from
its last epoch's checkpoint and reports a finished one (``--noresume`` starts over and
refuses a finished run; ``--overwrite`` retrains it). SIGTERM or Ctrl-C saves and stops.

Outputs in ``--workdir``:

- ``dev_metrics.json``: the best epoch's dev scores (entity precision, recall, F1 and the
  per-type table from seqeval for IOB tags; word accuracy always), its epoch and step,
  every epoch's scores, the test scores when a test file is present, window and cut
  counts, timings and settings; it marks the run finished;
- ``dev_predictions.txt`` (and ``test_predictions.txt``): ``word gold predicted`` lines,
  blank lines between sentences, as ``conlleval`` reads them; the scores are computed
  from exactly these tags;
- ``dev_entity_table.txt`` (and ``test_entity_table.txt``): precision, recall, F1 and
  support per entity type;
- ``checkpoint/ckpt_<step>/``: the best dev epoch's parameters (a run checkpoint,
  read by ``perceiver.params.loading.load_any``), its metadata holding
  the tags (``token_labels``); ``resume/`` while the run goes on;
- ``metrics.jsonl`` and ``log.txt``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from absl import flags
import numpy as np

from eval import finetune
from eval.tagging import data as tagging_data
from eval.tagging import task as tagging_task
from perceiver.params import params_file
from perceiver.params import transfer
from perceiver.training import epochs
from perceiver.training import workdir_lock
from perceiver.training import writer as writer_lib

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs',
                           'tagging.py')
TaggingError = tagging_task.TaggingError


def check_config(config) -> None:
  """Refuses settings that cannot run, naming the field, before anything is read."""
  epochs.check_config(config, (('train.epochs', 1), ('train.batch_size', 1),
                               ('train.log_every', 1), ('train.grad_accum_steps', 1),
                               ('train.checkpoint_every', 0), ('eval.batch_size', 1),
                               ('data.max_seq_len', 0), ('data.window_overlap', 0),
                               ('data.length_multiple', 1), ('data.max_train_sentences', 0)),
                      TaggingError)
  if config.data.format not in tagging_data.FORMATS:
    raise TaggingError(f'data.format={config.data.format!r}: expected one of '
                       f'{", ".join(tagging_data.FORMATS)}')
  if config.eval.metric not in tagging_task.METRICS:
    raise TaggingError(f'eval.metric={config.eval.metric!r}: expected one of '
                       f'{", ".join(tagging_task.METRICS)}')


def resolve_window(config, model_config) -> int:
  """The window's bytes: ``data.max_seq_len``, or the model's; checked with the overlap."""
  window = config.data.max_seq_len or model_config.max_seq_len
  if not 1 < window <= model_config.max_seq_len:
    raise TaggingError(f'data.max_seq_len={config.data.max_seq_len} must be in '
                       f'[2, {model_config.max_seq_len}] (the model\'s max_seq_len), or 0')
  if config.data.window_overlap >= window:
    raise TaggingError(f'data.window_overlap={config.data.window_overlap} must be smaller '
                       f'than the window ({window} bytes)')
  return window


_OUTPUTS = (epochs.FINISHED, 'metrics.jsonl', 'log.txt', 'dev_predictions.txt',
            'test_predictions.txt', 'dev_entity_table.txt', 'test_entity_table.txt')


def clean(workdir: str) -> None:
  """Removes what an earlier run of this command left in ``workdir``; nothing else."""
  epochs.remove_outputs(workdir, lambda name: name in _OUTPUTS)


def _subset(split: tagging_data.Split, cap: int, seed: int, log) -> tagging_data.Split:
  if not 0 < cap < len(split.sentences):
    return split
  keep = np.sort(np.random.default_rng(seed).choice(len(split.sentences), cap, replace=False))
  log.note(f'  train: a random {cap} of its {len(split.sentences)} sentences '
           '(data.max_train_sentences)')
  return tagging_data.Split(split.name, split.path, [split.sentences[i] for i in keep])


def _load_trunk(init_checkpoint, config, log) -> transfer.Trunk:
  try:
    return finetune.load_trunk(init_checkpoint, config, log,
                               mlm_decoder=bool(init_checkpoint and config.init.mlm_decoder))
  except params_file.CheckpointError as e:
    if transfer.MLM_DECODER in str(e) and config.init.mlm_decoder:
      raise params_file.CheckpointError(f'{e}; pass --config.init.mlm_decoder=false to start '
                                       'the token decoder from scratch') from None
    raise


def _read(config, data_dir: str):
  """(the splits, the tags of train, the metric), every file read and checked."""
  splits = tagging_data.all_splits(data_dir, config.data.format,
                                   config.data.label_column or None, with_test=True)
  labels = tagging_data.label_list(splits['train'])
  for split in splits.values():
    tagging_data.check_tags(split, labels)
  try:
    metric = tagging_task.resolve_metric(config.eval.metric, labels)
  except ValueError as e:
    raise TaggingError(str(e)) from None
  return splits, labels, metric


def _encode(splits, labels, window: int, config, log) -> Dict[str, tagging_data.EncodedSplit]:
  """Every split as windows of ``window`` bytes (train: its subset, if the config asks)."""
  splits = dict(splits, train=_subset(splits['train'], config.data.max_train_sentences,
                                      config.seed, log))
  data = {}
  for name, split in splits.items():
    data[name] = tagging_data.encode_split(split, labels, window, config.data.window_overlap,
                                           config.data.length_multiple)
    log.note('  ' + tagging_data.encoded_summary(data[name], window,
                                                 config.data.window_overlap))
  return data


def _log_scores(summary, log) -> None:
  res = summary['results']
  scores = (f'F1 {100 * res["f1"]:.2f} (precision {100 * res["precision"]:.2f}, recall '
            f'{100 * res["recall"]:.2f}), ' if 'f1' in res else '')
  log.note(f'== dev, best epoch {summary["best_epoch"]}: {scores}word accuracy '
           f'{100 * res["accuracy"]:.2f} ({summary["wall_time_s"]:.0f}s)')
  if 'per_type' in res:
    log.note(tagging_task.type_table(res))
  if summary['test_results']:
    test = summary['test_results']
    log.note('== test: ' + (f'F1 {100 * test["f1"]:.2f}, ' if 'f1' in test else '') +
             f'word accuracy {100 * test["accuracy"]:.2f}')


def run(config, data_dir: str, workdir: str, init_checkpoint: Optional[str] = None, *,
        resume: bool = True, overwrite: bool = False,
        log: Optional[writer_lib.RunLog] = None) -> Dict[str, Any]:
  """The command; returns what ``dev_metrics.json`` holds."""
  log = log or writer_lib.RunLog()
  finetune.one_host('eval.tagging', TaggingError)
  check_config(config)
  finished = epochs.finished_summary(workdir, resume=resume, overwrite=overwrite,
                                     error=TaggingError)
  if finished is not None:
    log.note(f'{os.path.join(workdir, epochs.FINISHED)}: finished earlier (main score '
             f'{finished["main_score"]:.4f}); --overwrite retrains it')
    return finished
  splits, labels, metric = _read(config, data_dir)
  start = time.time()
  with workdir_lock.WorkdirLock(workdir):
    if overwrite or not resume:
      clean(workdir)
    with log.to_file(os.path.join(workdir, 'log.txt')):
      log.note(finetune.opening_line('eval.tagging', f'{config.data.format} data '
                                     f'{data_dir}; outputs {workdir}'))
      for split in splits.values():
        log.note(f'  {tagging_data.summary(split)}')
      log.note(f'  {len(labels)} tags ({", ".join(labels)}); metric: '
               + ('entity-level F1 (seqeval, conlleval entities: IOB1 and IOB2)'
                  if metric == 'entity' else 'word accuracy'))
      trunk = _load_trunk(init_checkpoint, config, log)
      window = resolve_window(config, trunk.model_config)
      task = tagging_task.TaggingTask(_encode(splits, labels, window, config, log), labels,
                                      metric, workdir, trunk.source, config.to_json())
      summary = finetune.finetune(
          task, trunk, config, workdir, log, batch_size=config.train.batch_size,
          learning_rate=config.optimizer.learning_rate, resume=resume,
          # What a resumed run must share with the run it continues.
          settings={'config': json.loads(config.to_json()), 'labels': list(labels)}).summary
      summary.update(format=config.data.format, data_dir=data_dir, max_seq_len=window,
                     window_overlap=config.data.window_overlap,
                     config=json.loads(config.to_json()), wall_time_s=time.time() - start)
      finetune.write_finished(workdir, summary)
      _log_scores(summary, log)
  return summary


# --------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined only when run as a command)."""
  finetune.define_flags(CONFIG_FILE, 'Tagging')
  flags.DEFINE_string('data_dir', None, 'The directory of the train, dev (and test) files.')
  flags.DEFINE_enum('format', None, tagging_data.FORMATS, 'conll2003 (word POS chunk NER '
                    'lines) or conllu (UPOS); default: the config\'s data.format.')
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_bool('resume', True, 'Resume an interrupted run and report a finished one; '
                    '--noresume starts over and refuses a finished run.')
  flags.mark_flags_as_required(['data_dir', 'workdir'])


def _command():
  config = FLAGS.config
  if FLAGS.format:
    config.data.format = FLAGS.format
  run(config, FLAGS.data_dir, FLAGS.workdir, FLAGS.init_checkpoint, resume=FLAGS.resume,
      overwrite=FLAGS.overwrite)


main = finetune.make_main(_command, saved='the last epoch is kept; rerun to resume')
