"""GLUE's metrics in numpy, the paper's scores for the released model, and the table.

Metrics as GLUE defines them: Matthews correlation (CoLA); accuracy (SST-2, MNLI-m/mm,
QNLI, RTE, WNLI); F1 and accuracy (MRPC, QQP); Pearson and Spearman (STS-B).

Degenerate inputs get a number, never NaN, so that a run's best-checkpoint comparisons
and its JSON stay well defined:

* ``matthews_corrcoef`` is 0.0 when it is undefined (a single predicted or true class),
  as scikit-learn returns.
* ``f1`` is 0.0 when there are no true positives (e.g. a single predicted class 0),
  as scikit-learn returns (it also warns where precision or recall is 0/0).
* ``pearson`` and ``spearman`` are 0.0 when either input is constant. SciPy returns NaN
  there; a constant prediction carries no information about the labels, and 0.0 is the
  same convention as the Matthews correlation's.

Scores are fractions (accuracy 0.9317); the table shows them x100 beside the paper's.
Results are keyed by task name, except MNLI, which has two: ``mnli-m`` and ``mnli-mm``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

# Metrics each task reports, the first being its main score: the paper's choice
# (Matthews for CoLA, Pearson for STS-B, accuracy for the others).
TASK_METRICS = {
    'cola': ('mcc',),
    'sst2': ('accuracy',),
    'mrpc': ('accuracy', 'f1'),
    'stsb': ('pearson', 'spearman'),
    'qqp': ('accuracy', 'f1'),
    'mnli': ('accuracy',),
    'qnli': ('accuracy',),
    'rte': ('accuracy',),
    'wnli': ('accuracy',),
}

# The table's rows, in the paper's order; WNLI last (it is not in the average).
RESULT_KEYS = ('cola', 'mnli-m', 'mnli-mm', 'mrpc', 'qnli', 'qqp', 'rte', 'sst2', 'stsb',
               'wnli')
DISPLAY_NAMES = {
    'cola': 'CoLA', 'mnli-m': 'MNLI-m', 'mnli-mm': 'MNLI-mm', 'mrpc': 'MRPC',
    'qnli': 'QNLI', 'qqp': 'QQP', 'rte': 'RTE', 'sst2': 'SST-2', 'stsb': 'STS-B',
    'wnli': 'WNLI',
}
METRIC_NAMES = {'mcc': 'MCC', 'accuracy': 'accuracy', 'f1': 'F1', 'pearson': 'Pearson',
                'spearman': 'Spearman'}

# The Perceiver IO paper's GLUE dev row for the released byte-level model (percent).
PAPER_RESULTS = {
    'cola': 50.19, 'mnli-m': 83.22, 'mnli-mm': 83.89, 'mrpc': 87.24, 'qnli': 91.71,
    'qqp': 90.12, 'rte': 64.84, 'sst2': 93.17, 'stsb': 86.81,
}
PAPER_AVERAGE = 80.95

# The average's eight tasks: MNLI counts once (the mean of -m and -mm); WNLI is left out.
_AVERAGED = ('cola', 'mnli', 'mrpc', 'qnli', 'qqp', 'rte', 'sst2', 'stsb')


def _pair(predictions, labels, what: str):
  """Both as 1-D arrays of one non-zero length, or a ValueError naming ``what``."""
  p, t = np.asarray(predictions), np.asarray(labels)
  if p.ndim != 1 or p.shape != t.shape:
    raise ValueError(f'{what}: predictions {p.shape} and labels {t.shape} must be 1-D '
                     'arrays of one length')
  if p.size == 0:
    raise ValueError(f'{what}: no examples')
  return p, t


def _binary(values: np.ndarray, name: str, what: str) -> np.ndarray:
  if not np.isin(values, (0, 1)).all():
    bad = np.unique(values[~np.isin(values, (0, 1))])[:5].tolist()
    raise ValueError(f'{what}: {name} must be 0 or 1 (the positive class is 1), got {bad}')
  return values.astype(np.int64)


def _finite(values: np.ndarray, name: str, what: str) -> np.ndarray:
  values = values.astype(np.float64)
  if not np.isfinite(values).all():
    raise ValueError(f'{what}: {name} has {int((~np.isfinite(values)).sum())} '
                     'non-finite values')
  return values


def accuracy(predictions, labels) -> float:
  """The fraction of predictions equal to their labels."""
  p, t = _pair(predictions, labels, 'accuracy')
  return float(np.mean(p == t))


def f1(predictions, labels) -> float:
  """Binary F1 of the positive class 1: ``2 tp / (2 tp + fp + fn)``; 0.0 without tp."""
  p, t = _pair(predictions, labels, 'f1')
  p, t = _binary(p, 'predictions', 'f1'), _binary(t, 'labels', 'f1')
  tp = int(np.sum((p == 1) & (t == 1)))
  errors = int(np.sum(p != t))
  return 0.0 if tp == 0 else 2 * tp / (2 * tp + errors)


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation coefficient (multiclass form); 0.0 where undefined.

  With ``n`` examples, ``c`` correct, ``t_k``/``p_k`` the true/predicted counts of class
  k: ``(c n - sum t_k p_k) / sqrt((n^2 - sum p_k^2) (n^2 - sum t_k^2))``, which for two
  classes is ``(tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))``. It is undefined
  (0/0) when all predictions, or all labels, are one class: 0.0 then, as scikit-learn.
  """
  p, t = _pair(predictions, labels, 'matthews_corrcoef')
  _, codes = np.unique(np.concatenate([t, p]), return_inverse=True)
  t_codes, p_codes = codes[:t.size], codes[t.size:]
  num_classes = int(codes.max()) + 1
  t_counts = np.bincount(t_codes, minlength=num_classes).astype(np.float64)
  p_counts = np.bincount(p_codes, minlength=num_classes).astype(np.float64)
  n, correct = float(t.size), float(np.sum(t_codes == p_codes))
  cov_tp = correct * n - t_counts @ p_counts
  cov_pp = n * n - p_counts @ p_counts
  cov_tt = n * n - t_counts @ t_counts
  if cov_pp == 0 or cov_tt == 0:
    return 0.0
  return float(cov_tp / np.sqrt(cov_pp * cov_tt))


def pearson(predictions, labels) -> float:
  """Pearson correlation; 0.0 when either input is constant (SciPy gives NaN)."""
  p, t = _pair(predictions, labels, 'pearson')
  p, t = _finite(p, 'predictions', 'pearson'), _finite(t, 'labels', 'pearson')
  # Tested exactly: the mean of n equal floats need not equal them, so centring a
  # constant input can leave rounding noise that would divide to a meaningless value.
  if (p == p[0]).all() or (t == t[0]).all():
    return 0.0
  p, t = p - p.mean(), t - t.mean()
  r = (p @ t) / np.sqrt((p @ p) * (t @ t))
  return float(np.clip(r, -1.0, 1.0))


def rankdata(values) -> np.ndarray:
  """Ranks from 1, ties sharing the average of the ranks they span (SciPy's 'average')."""
  values = np.asarray(values)
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  first = np.cumsum(counts) - counts + 1  # the rank of each distinct value's first copy
  return (first + (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(predictions, labels) -> float:
  """Spearman correlation: Pearson's of the average ranks; 0.0 for a constant input."""
  p, t = _pair(predictions, labels, 'spearman')
  p, t = _finite(p, 'predictions', 'spearman'), _finite(t, 'labels', 'spearman')
  return pearson(rankdata(p), rankdata(t))


_METRIC_FNS = {'mcc': matthews_corrcoef, 'accuracy': accuracy, 'f1': f1,
               'pearson': pearson, 'spearman': spearman}


def _task(name: str) -> str:
  """The task of a task name or result key ('mnli-m' -> 'mnli'), or a ValueError."""
  task = 'mnli' if name in ('mnli-m', 'mnli-mm') else name
  if task not in TASK_METRICS:
    raise ValueError(f'unknown GLUE task {name!r}; known: {", ".join(TASK_METRICS)} '
                     '(and mnli-m, mnli-mm)')
  return task


def task_metrics(task_name: str, predictions, labels) -> dict[str, float]:
  """The task's metrics, e.g. ``{'accuracy': 0.87, 'f1': 0.9}`` for MRPC.

  Args:
    task_name: a task ('cola', ..., 'mnli') or result key ('mnli-m', 'mnli-mm').
    predictions: label ids [n] (class 1 is positive for F1), or floats for STS-B.
    labels: label ids [n], or the gold scores for STS-B.
  """
  return {name: _METRIC_FNS[name](predictions, labels)
          for name in TASK_METRICS[_task(task_name)]}


def main_metric(task_name: str) -> str:
  """The name of the task's main score: 'mcc' (CoLA), 'pearson' (STS-B), else 'accuracy'."""
  return TASK_METRICS[_task(task_name)][0]


def main_score(task_name: str, metrics: Mapping[str, float]) -> float:
  """The task's main score out of its ``task_metrics`` dict."""
  name = main_metric(task_name)
  if name not in metrics:
    raise ValueError(f'{task_name}: metrics {sorted(metrics)} lack its main score {name!r}')
  return float(metrics[name])


def _check_keys(keys) -> None:
  unknown = sorted(set(keys) - set(RESULT_KEYS))
  if unknown:
    raise ValueError(f'unknown result keys {unknown}; known: {", ".join(RESULT_KEYS)}')


def glue_average(scores: Mapping[str, float]) -> float | None:
  """The paper's GLUE average of main scores (any unit: fractions or percent).

  MNLI-m and MNLI-mm are averaged into one MNLI score first; the eight tasks CoLA, MNLI,
  MRPC, QNLI, QQP, RTE, SST-2 and STS-B are then averaged; WNLI is left out.

  Args:
    scores: main score by result key (``RESULT_KEYS``); 'wnli' may be present.

  Returns:
    The average, or None when any of the tasks it needs is missing.
  """
  _check_keys(scores)
  if not all(key in scores for key in ('mnli-m', 'mnli-mm')):
    return None
  per_task = dict(scores, mnli=(scores['mnli-m'] + scores['mnli-mm']) / 2)
  if not all(task in per_task for task in _AVERAGED):
    return None
  return float(sum(per_task[task] for task in _AVERAGED) / len(_AVERAGED))


def _percent(value: float | None) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """The GLUE table: each task's main score x100 beside the paper's, then the average.

  Args:
    results: ``task_metrics`` dicts (fractions) by result key; tasks not run are shown '-'.

  Returns:
    Lines of text: task, main metric, this run, the paper's number, the other metrics
    (F1 for MRPC/QQP, Spearman for STS-B), and the average as the paper computes it.
  """
  _check_keys(results)
  rows = [('task', 'metric', 'this run', 'paper', 'also')]
  for key in RESULT_KEYS:
    main = main_metric(key)
    metrics = results.get(key)
    ours = None if metrics is None else main_score(key, metrics)
    also = ', '.join(f'{METRIC_NAMES[name]} {_percent(value)}'
                     for name, value in (metrics or {}).items() if name != main)
    if key == 'wnli':
      also = (also + '; ' if also else '') + 'not in the average'
    paper = PAPER_RESULTS.get(key)
    rows.append((DISPLAY_NAMES[key], METRIC_NAMES[main], _percent(ours),
                 '-' if paper is None else f'{paper:.2f}', also))
  average = glue_average({key: main_score(key, m) for key, m in results.items()})
  rows.append(('average', '', _percent(average), f'{PAPER_AVERAGE:.2f}',
               'MNLI-m/-mm averaged first; WNLI left out'))
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = []
  for row in rows:
    cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
             row[3].rjust(widths[3]), row[4]]
    lines.append('  '.join(cells).rstrip())
  return '\n'.join(lines)
