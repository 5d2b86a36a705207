"""One GLUE task fine-tuned: one run, or a sweep of grid points, then its test predictions.

``run_task`` reads and encodes the task's splits (``eval.glue.inputs``), runs each grid
point as a ``eval.glue.task.GlueTask`` on the shared skeleton (``eval.finetune``), keeps
the point with the best dev score and, with ``do_predict``, writes the test predictions
of its parameters in the GLUE server's format (``eval.glue.outputs``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

from eval import finetune
from eval.glue import data as glue_data
from eval.glue import inputs as glue_inputs
from eval.glue import outputs as glue_outputs
from eval.glue import task as glue_task
from perceiver.command import atomic
from perceiver.params import loading
from perceiver.params import transfer
from perceiver.training import epochs
from perceiver.training import writer as writer_lib

SUBMISSION_DIR = 'submission'
GlueError = glue_task.GlueError

_OUTPUT_FILES = (epochs.FINISHED, 'metrics.jsonl', 'sweep.json', 'log.txt')


def resolve_max_seq_len(config, model_config) -> int:
  """The bytes per example: ``data.max_seq_len``, or the model's."""
  cap = config.data.max_seq_len or model_config.max_seq_len
  if not 1 < cap <= model_config.max_seq_len:
    raise GlueError(f'data.max_seq_len={config.data.max_seq_len} must be in '
                    f'[2, {model_config.max_seq_len}] (the model\'s max_seq_len), or 0')
  return cap


def grid(config, sweep: bool):
  """The runs of a task: (batch size, learning rate, the batch size's field) each."""
  if not sweep:
    return [(config.train.batch_size, config.optimizer.learning_rate, 'train.batch_size')]
  points = [(int(b), float(lr), 'sweep.batch_sizes') for b in config.sweep.batch_sizes
            for lr in config.sweep.learning_rates]
  if not points:
    raise GlueError('--sweep: sweep.batch_sizes and sweep.learning_rates must not be empty')
  return points


def clean_task_dir(task_dir: str) -> None:
  """Removes what an earlier (finished or interrupted) run of this command left in
  ``task_dir`` and in its grid points' folders: outputs, checkpoints and resume state;
  nothing else."""
  if not os.path.isdir(task_dir):
    return
  is_output = lambda name: name in _OUTPUT_FILES or name.endswith('_predictions.tsv')
  for name in os.listdir(task_dir):
    if name not in ('checkpoint', 'resume') and os.path.isdir(os.path.join(task_dir, name)):
      epochs.remove_outputs(os.path.join(task_dir, name), is_output)
  epochs.remove_outputs(task_dir, is_output)


# --------------------------------------------------------------------------------------
# The runs of one task.

def _point(glue: glue_task.GlueTask, trunk, config, log, point, resume: bool, *,
           sweep: bool) -> finetune.RunResult:
  """One run (``point``: batch size, learning rate, field) in ``glue.run_dir``; with
  ``sweep``, a finished point's summary is read back, not rerun, and written when done."""
  batch_size, lr, field = point
  finished = os.path.join(glue.run_dir, epochs.FINISHED)
  if sweep and resume and os.path.exists(finished):
    with open(finished, encoding='utf-8') as f:
      summary = json.load(f)
    params, _, _ = loading.load_any(os.path.join(glue.run_dir, summary['checkpoint']))
    log.note(f'  {glue.run_dir}: finished earlier (main score {summary["main_score"]:.4f})')
    return finetune.RunResult(glue.run_dir, summary, summary['main_score'], params)
  if sweep and not resume:
    clean_task_dir(glue.run_dir)
  # What a resumed run must share with the run it continues.
  settings = {'config': json.loads(glue.config_json), 'batch_size': int(batch_size),
              'learning_rate': float(lr)}
  result = finetune.finetune(glue, trunk, config, glue.run_dir, log, batch_size=batch_size,
                             learning_rate=lr, settings=settings, resume=resume,
                             batch_field=field)
  if sweep:
    finetune.write_finished(glue.run_dir, result.summary)
  return result


def _sweep(task, data, trunk, config, task_dir, log, points, *, sweep: bool, resume: bool
           ) -> Tuple[Dict[str, Any], Any]:
  """Runs every grid point; the best one's summary (with ``sweep``: its files copied up
  and ``sweep.json`` listing every point), and its parameters."""
  best, done = None, []
  max_seq_len = resolve_max_seq_len(config, trunk.model_config)
  for i, point in enumerate(points):
    run_dir = task_dir
    if sweep:
      run_dir = os.path.join(task_dir, f'bs{point[0]}_lr{point[1]:g}')
      log.note(f'-- {task.name}: grid point {i + 1}/{len(points)}: batch {point[0]}, '
               f'learning rate {point[1]:g} -> {run_dir}')
    glue = glue_task.GlueTask(task, data, run_dir, trunk.source, config.to_json(),
                              max_seq_len)
    result = _point(glue, trunk, config, log, point, resume, sweep=sweep)
    done.append({'batch_size': point[0], 'learning_rate': point[1],
                 'dir': os.path.basename(run_dir), 'main_score': result.score,
                 'results': result.summary['results']})
    if best is None or result.score > best.score:
      best = result
  if not sweep:
    return dict(best.summary), best.params
  return _adopt_best_point(task, task_dir, best, done, log), best.params


def _adopt_best_point(task, task_dir: str, best: finetune.RunResult, points: List[dict],
                      log: writer_lib.RunLog) -> Dict[str, Any]:
  """Writes ``sweep.json`` and copies the best point's predictions and metrics.jsonl up."""
  point = os.path.basename(best.run_dir)
  summary = dict(best.summary, checkpoint=os.path.join(point, best.summary['checkpoint']),
                 sweep={'best': point, 'points': points})
  atomic.write_json(os.path.join(task_dir, 'sweep.json'), summary['sweep'])
  names = [f'{split}_predictions.tsv' for split in task.dev_splits] + ['metrics.jsonl']
  for name in names:
    shutil.copyfile(os.path.join(best.run_dir, name), os.path.join(task_dir, name))
  log.note(f'  best grid point: {point} (dev score {best.score:.4f})')
  return summary


def _predict_test(task, data, trunk, params, config, out_dir, log) -> List[str]:
  """Writes the test predictions of ``params`` in the GLUE server's format."""
  # Only the task's model and batches are used: nothing is trained or written by it.
  glue = glue_task.GlueTask(task, data, out_dir, trunk.source, config.to_json(), 0)
  predict = finetune.predictor(glue, trunk.model_config, params, config)
  written = []
  for split in list(task.test_splits) + (['diagnostic'] if 'diagnostic' in data else []):
    enc = data[split]
    predictions = glue_task.predictions_from_outputs(task, predict(enc))
    written.append(glue_outputs.write_submission(out_dir, task, split, enc.indices,
                                                 predictions))
    log.note(f'  wrote {written[-1]} ({len(enc)} test predictions)')
  return written


def run_task(task_name: str, config, data_dir: str, workdir: str, trunk: transfer.Trunk, *,
             do_predict: bool = False, sweep: bool = False, resume: bool = True,
             log: Optional[writer_lib.RunLog] = None) -> Dict[str, Any]:
  """Fine-tunes and evaluates one task; returns its ``dev_metrics.json`` content."""
  log = log or writer_lib.RunLog()
  task = glue_data.get_task(task_name)
  task_dir = os.path.join(workdir, task.name)
  points = grid(config, sweep)
  if not resume:
    clean_task_dir(task_dir)
  start = time.time()
  with log.to_file(os.path.join(task_dir, 'log.txt'), mode='a'):
    kind = ('regression (mean squared error)' if task.is_regression else
            f'{task.num_outputs}-way classification ({", ".join(task.labels)})')
    log.note(f'== {task.name} ({task.directory}): {kind}; main metric {task.main_metric}')
    data = glue_inputs.load_task_data(task, data_dir, config,
                                      resolve_max_seq_len(config, trunk.model_config),
                                      with_test=do_predict, log=log)
    summary, params = _sweep(task, data, trunk, config, task_dir, log, points, sweep=sweep,
                             resume=resume)
    if do_predict:
      written = _predict_test(task, data, trunk, params, config,
                              os.path.join(workdir, SUBMISSION_DIR), log)
      summary['submission'] = [os.path.relpath(path, task_dir) for path in written]
    summary['wall_time_s'] = time.time() - start
    finetune.write_finished(task_dir, summary)
    scores = '; '.join(f'{key} ' + ', '.join(f'{name} {100 * value:.2f}'
                                             for name, value in values.items())
                       for key, values in summary['results'].items())
    log.note(f'== {task.name}: best epoch {summary["best_epoch"]}: {scores} '
             f'({summary["wall_time_s"]:.0f}s)')
  return summary
