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

The model is the paper's single-task setup (``perceiver.params.transfer``): the checkpoint's byte
embeddings, input positions and encoder, then a new decoder with one trainable query and
a 2-layer tanh MLP head to the class logits (STS-B: one regression value). The data is
``eval.glue.inputs``, the loss and dev scores ``eval.glue.task``, one task's runs
``eval.glue.runs``, on the fine-tuning skeleton ``eval.finetune`` shared with tagging; the
training loop, steps, checkpoints and logs are ``perceiver.training``'s, as in pretraining.

Every requested task's files are read and checked before any task trains. A rerun skips
the tasks that finished (their results join the table) and resumes an interrupted one
from its last epoch's checkpoint (``--noresume`` starts it over; ``--overwrite`` retrains
finished ones too). SIGTERM or Ctrl-C saves and stops; rerun to continue.

Outputs, per task in ``DIR/<task>/`` (with ``--sweep``, each grid point in
``DIR/<task>/bs<B>_lr<LR>/`` and the best point's files copied up, ``sweep.json`` listing
all points):

- ``dev_metrics.json``: the best epoch's dev metrics (``eval.glue.metrics.task_metrics``), its
  epoch and step, every epoch's scores, truncation counts, timings and settings; it marks
  the task finished;
- ``dev_predictions.tsv`` (MNLI: ``dev_matched_predictions.tsv`` and
  ``dev_mismatched_predictions.tsv``): ``index<TAB>prediction<TAB>label``; the metrics
  are computed from the predictions exactly as written, so the file reproduces them;
- ``checkpoint/ckpt_<step>/``: the best dev epoch's parameters (a run checkpoint,
  ``perceiver.training.run_checkpoints``), readable by ``perceiver.params.loading.load_any``
  (``perceiver.deploy.export`` exports it); its metadata holds the task, labels and ``num_outputs``;
- ``resume/``: the last epoch's training state while the task runs (removed at its end);
- ``metrics.jsonl`` (train and eval records) and ``log.txt`` (this task's log lines).

With ``--task=all``: ``DIR/glue_table.txt`` (the table of the finished tasks, beside the
paper's row) and ``DIR/glue_results.json``, written even when a task fails;
``DIR/log.txt`` collects every line.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from absl import flags

from eval import finetune
from eval.glue import data as glue_data
from eval.glue import inputs as glue_inputs
from eval.glue import metrics as metrics_lib
from eval.glue import runs
from eval.glue import task as glue_task
from perceiver.command import atomic
from perceiver.training import epochs
from perceiver.training import workdir_lock
from perceiver.training import writer as writer_lib

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'glue.py')
GlueError = glue_task.GlueError


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


def check_config(config) -> None:
  """Refuses settings that cannot run, naming the field, before anything is read."""
  epochs.check_config(config, (('train.epochs', 1), ('train.log_every', 1),
                               ('train.grad_accum_steps', 1), ('train.checkpoint_every', 0),
                               ('eval.batch_size', 1), ('data.length_multiple', 1),
                               ('data.max_train_examples', 0), ('data.encode_chunk', 1)),
                      GlueError)
  for batch_size, lr, field in runs.grid(config, sweep=True) + runs.grid(config, sweep=False):
    if batch_size < 1:
      raise GlueError(f'{field} must hold batch sizes >= 1, got {batch_size}')
    if not lr > 0:
      raise GlueError(f'sweep.learning_rates must be > 0, got {lr!r}')


def _task_names(task: str, data_dir: str):
  if task == 'all':
    names, missing = available_tasks(data_dir)
    if not names:
      raise GlueError(f'--data_dir {data_dir} holds none of the GLUE task folders '
                      f'({", ".join(t.directory for t in glue_data.TASKS.values())})')
    return names, missing
  folder = os.path.join(data_dir, glue_data.TASKS[task].directory)
  if not os.path.isdir(folder):
    raise GlueError(f'{task}: folder {folder} not found (the GLUE download script puts '
                    f'{task} in {glue_data.TASKS[task].directory}/ under --data_dir)')
  return [task], []


def _finished(names, workdir: str, *, resume: bool, overwrite: bool):
  """(summaries of the tasks that finished earlier, the names of those to train)."""
  summaries: Dict[str, Dict[str, Any]] = {}
  for name in names:
    finished = epochs.finished_summary(os.path.join(workdir, name), resume=resume,
                                       overwrite=overwrite, error=GlueError)
    if finished is not None:
      summaries[name] = finished
  return summaries, [name for name in names if name not in summaries]


def run(task: str, config, data_dir: str, workdir: str, init_checkpoint: Optional[str] = None,
        *, do_predict: bool = False, sweep: bool = False, overwrite: bool = False,
        resume: bool = True, log: Optional[writer_lib.RunLog] = None) -> Dict[str, Any]:
  """The command: one task or ``all``; returns what ``glue_results.json`` holds.

  Finished tasks are skipped (``resume``, the default) and their results reported, or
  retrained (``overwrite``); with neither, a finished task is refused.
  """
  log = log or writer_lib.RunLog()
  finetune.one_host('eval.glue', GlueError)
  _check_task_arg(task)
  check_config(config)
  if not os.path.isdir(data_dir):
    raise GlueError(f'--data_dir {data_dir}: no such directory (expected the GLUE download '
                    'script\'s layout: CoLA/, SST-2/, MRPC/, ...)')
  names, missing = _task_names(task, data_dir)
  summaries, to_train = _finished(names, workdir, resume=resume, overwrite=overwrite)
  start = time.time()
  with workdir_lock.WorkdirLock(workdir), log.to_file(os.path.join(workdir, 'log.txt')):
    log.note(finetune.opening_line(f'eval.glue: --task={task}',
                                   f'data {data_dir}; outputs {workdir}'))
    if missing:
      log.warn(f'no folder in {data_dir} for: ' + ', '.join(
          f'{name} ({glue_data.TASKS[name].directory}/)' for name in missing) +
               '; shown as "-" in the table')
    for name in summaries:
      log.note(f'{name}: finished earlier ({os.path.join(workdir, name, epochs.FINISHED)}); '
               'skipped (--overwrite retrains it)')
    # Every file of every task to train is read and checked before any of them trains.
    for name in to_train:
      for split in glue_inputs.split_names(glue_data.TASKS[name], data_dir, do_predict, log):
        glue_data.load_split(data_dir, glue_data.TASKS[name], split)
    trunk = finetune.load_trunk(init_checkpoint, config, log)
    try:
      for i, name in enumerate(to_train):
        log.note(f'[{i + 1}/{len(to_train)}] {name}')
        if overwrite:
          runs.clean_task_dir(os.path.join(workdir, name))
        summaries[name] = runs.run_task(name, config, data_dir, workdir, trunk,
                                        do_predict=do_predict, sweep=sweep, resume=resume,
                                        log=log)
    finally:
      out = _report(task, names, missing, summaries, trunk.source, sweep, config,
                    time.time() - start, workdir, log)
  return out


def _report(task, names, missing, summaries, source, sweep, config, seconds, workdir, log):
  """The table and ``glue_results.json`` of the tasks that finished (``--task=all``)."""
  results = {key: values for name in names if name in summaries
             for key, values in summaries[name]['results'].items()}
  wall = {name: summaries[name].get('wall_time_s', 0.0) for name in names if name in summaries}
  wall['total'] = seconds
  scores = {key: metrics_lib.main_score(key, values) for key, values in results.items()}
  out = {
      'task': task, 'tasks_run': [n for n in names if n in summaries],
      'unfinished_tasks': [n for n in names if n not in summaries], 'missing_tasks': missing,
      'results': results, 'average': metrics_lib.glue_average(scores),
      'paper': metrics_lib.PAPER_RESULTS, 'paper_average': metrics_lib.PAPER_AVERAGE,
      'wall_time_s': wall, 'init': source, 'sweep': sweep,
      'config': json.loads(config.to_json()),
  }
  if task == 'all':
    table = metrics_lib.format_table(results)
    atomic.write_json(os.path.join(workdir, 'glue_results.json'), out)
    atomic.write_text(os.path.join(workdir, 'glue_table.txt'), table + '\n')
    log.note('\n' + table)
    log.note('wall time: ' + ', '.join(f'{k} {v:.0f}s' for k, v in wall.items()))
  return out


# --------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when run as a command (``train.mlm`` also has a
  ``--config`` flag, and both modules may be imported into one process)."""
  finetune.define_flags(CONFIG_FILE, 'GLUE')
  flags.DEFINE_string('task', None, 'cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, '
                      'or all (every task whose folder is in --data_dir).')
  flags.DEFINE_string('data_dir', None, 'The GLUE directory, as the download script lays '
                      'it out (CoLA/, SST-2/, ...).')
  flags.DEFINE_string('workdir', None, 'Output directory: DIR/<task>/ per task.')
  flags.DEFINE_bool('do_predict', False, 'Also write the test predictions in the GLUE '
                    "server's format to DIR/submission/.")
  flags.DEFINE_bool('sweep', False, 'Run the grid sweep.batch_sizes x sweep.learning_rates '
                    'and keep the best dev score per task.')
  flags.DEFINE_bool('resume', True, 'Skip tasks that finished and resume interrupted ones '
                    'from their last epoch; --noresume starts unfinished tasks over and '
                    'refuses finished ones.')
  flags.mark_flags_as_required(['task', 'data_dir', 'workdir'])


main = finetune.make_main(
    lambda: run(FLAGS.task, FLAGS.config, FLAGS.data_dir, FLAGS.workdir,
                FLAGS.init_checkpoint, do_predict=FLAGS.do_predict, sweep=FLAGS.sweep,
                overwrite=FLAGS.overwrite, resume=FLAGS.resume),
    saved="each task's last epoch is kept; rerun to resume")
