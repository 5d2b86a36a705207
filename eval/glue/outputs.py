"""GLUE outputs: the server's submission files and dev predictions, written atomically.

A submission file is what the GLUE server takes for one test split: a header line
``index<TAB>prediction``, then one row per test example with the test file's own index
and the prediction as the task's files spell labels: ``0``/``1`` for CoLA, SST-2, MRPC,
QQP and WNLI; ``entailment``/``not_entailment`` for QNLI and RTE;
``contradiction``/``entailment``/``neutral`` for MNLI-m, MNLI-mm and AX; and the score
with three decimals for STS-B (unclipped; the files' own scores have three). The files
are named ``CoLA.tsv``, ``SST-2.tsv``, ``MRPC.tsv``, ``STS-B.tsv``, ``QQP.tsv``,
``MNLI-m.tsv``, ``MNLI-mm.tsv``, ``QNLI.tsv``, ``RTE.tsv``, ``WNLI.tsv`` and ``AX.tsv``.

Every file is written to a temporary file beside it, then renamed over it
(``perceiver.command.atomic``), so a reader never sees half a file and an interrupted run
leaves the previous one whole.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from eval.glue import data as glue_data
from perceiver.command import atomic


def format_predictions(task: str | glue_data.Task, predictions) -> list[str]:
  """Label ids to the task's label strings, or STS-B scores to '%.3f' text.

  Raises:
    ValueError: an id outside ``range(task.num_outputs)``, or a non-finite score.
  """
  task = glue_data.get_task(task)
  values = np.asarray(predictions)
  if values.ndim != 1:
    raise ValueError(f'{task.name}: predictions must be 1-D, got shape {values.shape}')
  if task.is_regression:
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
      raise ValueError(f'{task.name}: {int((~np.isfinite(values)).sum())} predictions are '
                       'not finite')
    return [f'{value:.3f}' for value in values]
  if values.size and (not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or
                      values.max() >= len(task.labels)):
    raise ValueError(f'{task.name}: predictions must be label ids in '
                     f'[0, {len(task.labels)}) for labels {list(task.labels)}')
  return [task.labels[i] for i in values]


def _check_indices(task, indices: Sequence[str], num_predictions: int) -> list[str]:
  indices = [str(index) for index in indices]
  if len(indices) != num_predictions:
    raise ValueError(f'{task.name}: {len(indices)} indices but {num_predictions} predictions')
  if len(set(indices)) != len(indices):
    raise ValueError(f'{task.name}: indices repeat; the GLUE server matches rows by index')
  return indices


def write_submission(out_dir, task: str | glue_data.Task, split: str,
                     indices: Sequence[str], predictions) -> str:
  """Writes one test split's predictions as the GLUE server takes them.

  Args:
    out_dir: the folder for the submission files (made if missing).
    task: the task or its name.
    split: a split with a submission file: 'test', or for MNLI 'test_matched',
      'test_mismatched' or 'diagnostic' (AX).
    indices: the examples' ``index`` in ``load_split`` order.
    predictions: label ids [n] in ``task.labels`` order, or STS-B scores [n].

  Returns:
    The path written, e.g. ``out_dir/MNLI-m.tsv``.
  """
  task = glue_data.get_task(task)
  layout = task.layout(split)
  if layout.submission is None:
    files = [(s.name, s.submission) for s in task.splits if s.submission]
    raise glue_data.GlueDataError(f'{task.name}: split {split!r} has no submission file; '
                                  f'those that do: {files}')
  texts = format_predictions(task, predictions)
  indices = _check_indices(task, indices, len(texts))
  rows = ''.join(f'{index}\t{text}\n' for index, text in zip(indices, texts))
  return atomic.write_text(os.path.join(os.fspath(out_dir), layout.submission),
                            'index\tprediction\n' + rows)


def write_dev_predictions(path, task: str | glue_data.Task, indices: Sequence[str],
                          predictions, labels) -> str:
  """Writes ``index<TAB>prediction<TAB>label`` rows (with that header) for a dev split.

  Predictions and labels are label ids (or STS-B scores), written as the submission
  writes them: label strings, or scores with three decimals.
  """
  task = glue_data.get_task(task)
  texts = format_predictions(task, predictions)
  golds = format_predictions(task, labels)
  if len(golds) != len(texts):
    raise ValueError(f'{task.name}: {len(texts)} predictions but {len(golds)} labels')
  indices = _check_indices(task, indices, len(texts))
  rows = ''.join(f'{i}\t{p}\t{g}\n' for i, p, g in zip(indices, texts, golds))
  return atomic.write_text(path, 'index\tprediction\tlabel\n' + rows)
