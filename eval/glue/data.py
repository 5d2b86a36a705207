"""GLUE's nine tasks read from the directory the official download script lays out.

    GLUE_DIR/CoLA/{train,dev,test}.tsv     MNLI/{train,dev_matched,dev_mismatched,
    GLUE_DIR/SST-2/...  MRPC/...  QQP/...        test_matched,test_mismatched}.tsv
    GLUE_DIR/STS-B/...  QNLI/...  RTE/...  WNLI/...   diagnostic/diagnostic.tsv (AX)

Files are split on tabs only, with no quote processing (RTE, STS-B, MRPC and QQP have
stray ``"`` inside fields), and a UTF-8 byte-order mark is dropped (MRPC's train and dev
start with one). Each split's header must be the official one; CoLA's train and dev
files have none. Reading is strict: a row with the wrong number of columns, an unknown
label or a score that is not a number is a ``GlueDataError`` naming ``file:line``.
The one exception is QQP, whose upstream files have malformed rows (a question with a
line break in it spans two lines): those rows are skipped and listed in
``Split.skipped`` and in a logged warning, never silently.

Example indices are the file's own index column (``index``, or ``id`` for QQP), or the
0-based row number where the file has none (CoLA, SST-2 and MRPC train/dev). The GLUE
server matches test predictions by that index.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import NamedTuple, Sequence

import numpy as np

from eval.glue import metrics
from perceiver.command import errors
from perceiver.model import tokenizer as tokenizer_lib

_BOM = b'\xef\xbb\xbf'


class GlueDataError(errors.UserError, ValueError):
  """A GLUE file or directory that is not as the official layout has it."""


@dataclasses.dataclass(frozen=True)
class SplitLayout:
  """Where one split's file is and what its columns are.

  Attributes:
    name: 'train', 'dev', 'test', 'dev_matched', ..., or 'diagnostic' (MNLI's AX).
    path: the file, relative to the GLUE directory, e.g. 'MNLI/dev_matched.tsv'.
    columns: the official header, or the columns of a file without one (CoLA).
    has_header: whether the file's first line is ``columns``.
    text_a: the column of the first (or only) segment.
    text_b: the column of the second segment of a pair task, else None.
    label: the label column, None for test splits.
    index: the index column, or None to use the 0-based row number.
    official_rows: the number of examples in the official file.
    submission: for test splits, the GLUE server's file name, e.g. 'SST-2.tsv'.
    result_key: the key of this split's scores (``metrics.RESULT_KEYS``).
  """
  name: str
  path: str
  columns: tuple[str, ...]
  has_header: bool
  text_a: str
  text_b: str | None
  label: str | None
  index: str | None
  official_rows: int
  submission: str | None = None
  result_key: str | None = None


@dataclasses.dataclass(frozen=True)
class Task:
  """One GLUE task.

  Attributes:
    name: 'cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'mnli', 'qnli', 'rte' or 'wnli'.
    directory: its folder in the GLUE directory, e.g. 'SST-2'.
    labels: the label strings as the files spell them, in label-id order (the model's
      output i is ``labels[i]``); empty for STS-B, a regression on the float score.
    splits: the layout of each split.
    dev_splits: the splits scored for the table (MNLI: matched and mismatched).
    test_splits: the splits predicted for the GLUE server.
    skips_malformed_rows: skip (and report) rows with the wrong number of columns
      instead of raising; QQP only, whose upstream files have such rows.
  """
  name: str
  directory: str
  labels: tuple[str, ...]
  splits: tuple[SplitLayout, ...]
  dev_splits: tuple[str, ...]
  test_splits: tuple[str, ...]
  skips_malformed_rows: bool = False

  @property
  def is_regression(self) -> bool:
    return not self.labels

  @property
  def num_outputs(self) -> int:
    """The classifier's width: 1 for STS-B's score, else the number of labels."""
    return 1 if self.is_regression else len(self.labels)

  @property
  def is_pair(self) -> bool:
    return self.splits[0].text_b is not None

  @property
  def main_metric(self) -> str:
    """'mcc' (CoLA), 'pearson' (STS-B), else 'accuracy': the paper's main score."""
    return metrics.main_metric(self.name)

  @property
  def submission_files(self) -> tuple[str, ...]:
    """The GLUE server's file names for ``test_splits``, in that order."""
    return tuple(self.layout(split).submission for split in self.test_splits)

  def layout(self, split: str) -> SplitLayout:
    for layout in self.splits:
      if layout.name == split:
        return layout
    raise GlueDataError(f'{self.name} has no split {split!r}; known: '
                        f'{", ".join(s.name for s in self.splits)}')

  def result_key(self, split: str) -> str:
    """The key of a split's scores: 'mnli-m' / 'mnli-mm' for MNLI, else the task name."""
    return self.layout(split).result_key or self.name


class Example(NamedTuple):
  """One row: its index, one or two segments, and its label (None in a test split)."""
  index: str
  text_a: str
  text_b: str | None
  label: str | float | None


@dataclasses.dataclass
class Split:
  """A split's examples, and the rows skipped (QQP only) as ``(line number, reason)``."""
  path: str
  examples: list[Example]
  skipped: list[tuple[int, str]]
  official_rows: int

  def summary(self) -> str:
    """One line for the log, e.g. 'GLUE/QQP/dev.tsv: 40430 examples, 0 rows skipped'.

    The lines skipped are listed (the first ten), and the official number of examples
    is added where the file's differs from it.
    """
    text = f'{self.path}: {len(self.examples)} examples'
    if len(self.examples) != self.official_rows:
      text += f' (the official file has {self.official_rows})'
    text += f', {len(self.skipped)} rows skipped'
    if self.skipped:
      text += ' (lines ' + ', '.join(str(line) for line, _ in self.skipped[:10])
      text += ', ...)' if len(self.skipped) > 10 else ')'
    return text


def _layouts(directory, columns, test_columns, *, text_a, text_b, label, index, counts,
             has_header=True):
  """Train, dev and test layouts of a task with one dev split (all but MNLI)."""
  labelled = dict(columns=columns, has_header=has_header, text_a=text_a, text_b=text_b,
                  label=label, index=index)
  return (
      SplitLayout('train', f'{directory}/train.tsv', official_rows=counts[0], **labelled),
      SplitLayout('dev', f'{directory}/dev.tsv', official_rows=counts[1], **labelled),
      SplitLayout('test', f'{directory}/test.tsv', test_columns, True, text_a, text_b,
                  label=None, index='id' if index == 'id' else 'index',
                  official_rows=counts[2], submission=f'{directory}.tsv'),
  )


_NLI_PAIR = ('index', 'sentence1', 'sentence2')
_STSB = ('index', 'genre', 'filename', 'year', 'old_index', 'source1', 'source2', 'sentence1',
         'sentence2')
_MNLI_PARSES = ('index', 'promptID', 'pairID', 'genre', 'sentence1_binary_parse',
                'sentence2_binary_parse', 'sentence1_parse', 'sentence2_parse', 'sentence1',
                'sentence2')
_MNLI_TRAIN = _MNLI_PARSES + ('label1', 'gold_label')
_MNLI_DEV = _MNLI_PARSES + ('label1', 'label2', 'label3', 'label4', 'label5', 'gold_label')


def _mnli_splits():
  pair = dict(text_a='sentence1', text_b='sentence2', index='index')
  splits = [SplitLayout('train', 'MNLI/train.tsv', _MNLI_TRAIN, True, label='gold_label',
                        official_rows=392702, **pair)]
  for part, key, dev_rows, test_rows in (('matched', 'mnli-m', 9815, 9796),
                                         ('mismatched', 'mnli-mm', 9832, 9847)):
    splits.append(SplitLayout(f'dev_{part}', f'MNLI/dev_{part}.tsv', _MNLI_DEV, True,
                              label='gold_label', official_rows=dev_rows, result_key=key,
                              **pair))
    splits.append(SplitLayout(f'test_{part}', f'MNLI/test_{part}.tsv', _MNLI_PARSES, True,
                              label=None, official_rows=test_rows, result_key=key,
                              submission=f'MNLI-{key[5:]}.tsv', **pair))
  # The diagnostic set (AX) is predicted with the MNLI model; it has no labels.
  splits.append(SplitLayout('diagnostic', 'diagnostic/diagnostic.tsv',
                            _NLI_PAIR, True, label=None,
                            official_rows=1104, submission='AX.tsv', **pair))
  return tuple(splits)


_ONE_DEV = dict(dev_splits=('dev',), test_splits=('test',))
_TASK_LIST = (
    Task('cola', 'CoLA', ('0', '1'), _layouts(
        'CoLA', ('source', 'label', 'original_label', 'sentence'), ('index', 'sentence'),
        text_a='sentence', text_b=None, label='label', index=None, has_header=False,
        counts=(8551, 1043, 1063)), **_ONE_DEV),
    Task('sst2', 'SST-2', ('0', '1'), _layouts(
        'SST-2', ('sentence', 'label'), ('index', 'sentence'), text_a='sentence',
        text_b=None, label='label', index=None, counts=(67349, 872, 1821)), **_ONE_DEV),
    Task('mrpc', 'MRPC', ('0', '1'), _layouts(
        'MRPC', ('Quality', '#1 ID', '#2 ID', '#1 String', '#2 String'),
        ('index', '#1 ID', '#2 ID', '#1 String', '#2 String'), text_a='#1 String',
        text_b='#2 String', label='Quality', index=None, counts=(3668, 408, 1725)),
         **_ONE_DEV),
    Task('stsb', 'STS-B', (), _layouts(
        'STS-B', _STSB + ('score',), _STSB, text_a='sentence1', text_b='sentence2',
        label='score', index='index', counts=(5749, 1500, 1379)), **_ONE_DEV),
    Task('qqp', 'QQP', ('0', '1'), _layouts(
        'QQP', ('id', 'qid1', 'qid2', 'question1', 'question2', 'is_duplicate'),
        ('id', 'question1', 'question2'), text_a='question1', text_b='question2',
        label='is_duplicate', index='id', counts=(363846, 40430, 390965)),
         skips_malformed_rows=True, **_ONE_DEV),
    Task('mnli', 'MNLI', ('contradiction', 'entailment', 'neutral'), _mnli_splits(),
         dev_splits=('dev_matched', 'dev_mismatched'),
         test_splits=('test_matched', 'test_mismatched')),
    Task('qnli', 'QNLI', ('entailment', 'not_entailment'), _layouts(
        'QNLI', ('index', 'question', 'sentence', 'label'), ('index', 'question', 'sentence'),
        text_a='question', text_b='sentence', label='label', index='index',
        counts=(104743, 5463, 5463)), **_ONE_DEV),
    Task('rte', 'RTE', ('entailment', 'not_entailment'), _layouts(
        'RTE', _NLI_PAIR + ('label',), _NLI_PAIR, text_a='sentence1', text_b='sentence2',
        label='label', index='index', counts=(2490, 277, 3000)), **_ONE_DEV),
    Task('wnli', 'WNLI', ('0', '1'), _layouts(
        'WNLI', _NLI_PAIR + ('label',), _NLI_PAIR, text_a='sentence1', text_b='sentence2',
        label='label', index='index', counts=(635, 71, 146)), **_ONE_DEV),
)
TASKS = {task.name: task for task in _TASK_LIST}


def get_task(task: str | Task) -> Task:
  """The ``Task`` of a name (or the task itself), or an error listing the known ones."""
  if isinstance(task, Task):
    return task
  if task not in TASKS:
    raise GlueDataError(f'unknown GLUE task {task!r}; known tasks: {", ".join(TASKS)}')
  return TASKS[task]


def _task_files(task: Task) -> str:
  return ', '.join(layout.path for layout in task.splits)


def _split_path(data_dir, task: Task, layout: SplitLayout) -> str:
  """The split's file, or an error naming what is missing and what the layout expects."""
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    folders = ', '.join(task.directory for task in _TASK_LIST)
    raise GlueDataError(f'GLUE directory {data_dir} not found (expected the folders the '
                        f'GLUE download script writes: {folders})')
  path = os.path.join(data_dir, layout.path)
  folder = os.path.dirname(path)
  if not os.path.isdir(folder):
    raise GlueDataError(f'{task.name}: folder {folder} not found; the official layout has '
                        f'{_task_files(task)} under {data_dir}')
  if not os.path.isfile(path):
    raise GlueDataError(f'{task.name}: file {path} not found; the official layout has '
                        f'{_task_files(task)} under {data_dir}')
  return path


def _lines(path: str):
  """(line number from 1, text) of each line: split on '\\n' only, BOM and '\\r' dropped."""
  with open(path, 'rb') as f:
    for line_no, raw in enumerate(f, start=1):
      if line_no == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
      raw = raw.removesuffix(b'\n').removesuffix(b'\r')
      try:
        yield line_no, raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise GlueDataError(f'{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})'
                            ) from None


def _label(task: Task, value: str, where: str) -> str | float:
  if task.is_regression:
    try:
      score = float(value)
    except ValueError:
      score = math.nan
    if not math.isfinite(score):
      raise GlueDataError(f'{where}: score {value!r} is not a finite number')
    return score
  if value not in task.labels:
    raise GlueDataError(f'{where}: unknown label {value!r}; known labels: '
                        f'{", ".join(task.labels)}')
  return value


def load_split(data_dir, task_name: str | Task, split: str) -> Split:
  """Reads one split of one task.

  Args:
    data_dir: the GLUE directory (holding CoLA/, SST-2/, ..., as the download script).
    task_name: a name in ``TASKS`` (or a ``Task``).
    split: one of the task's splits: 'train', 'dev', 'test' ('dev_matched',
      'dev_mismatched', 'test_matched', 'test_mismatched', 'diagnostic' for MNLI).

  Returns:
    The ``Split``: examples in file order, and the rows skipped (QQP only).

  Raises:
    GlueDataError: unknown task or split, a missing folder or file, a header that is not
      the official one, a row with the wrong number of columns (except QQP's, which are
      skipped), an unknown label or a score that is not a number; each names the file
      and line, or the known choices.
  """
  task = get_task(task_name)
  layout = task.layout(split)
  path = _split_path(data_dir, task, layout)
  width = len(layout.columns)
  col = {name: i for i, name in enumerate(layout.columns)}
  examples, skipped, num_lines = [], [], 0
  for line_no, line in _lines(path):
    num_lines = line_no
    fields = line.split('\t')
    if line_no == 1 and layout.has_header:
      if tuple(fields) != layout.columns:
        raise GlueDataError(f'{path}:1: header {fields} is not the official '
                            f'{list(layout.columns)}')
      continue
    if len(fields) != width:
      reason = f'{len(fields)} columns, expected {width}'
      if task.skips_malformed_rows:
        skipped.append((line_no, reason))
        continue
      raise GlueDataError(f'{path}:{line_no}: {reason} ({", ".join(layout.columns)})')
    where = f'{path}:{line_no}'
    examples.append(Example(
        index=str(len(examples)) if layout.index is None else fields[col[layout.index]],
        text_a=fields[col[layout.text_a]],
        text_b=None if layout.text_b is None else fields[col[layout.text_b]],
        label=None if layout.label is None else _label(task, fields[col[layout.label]],
                                                       where)))
  if layout.has_header and num_lines == 0:
    raise GlueDataError(f'{path}: empty file; expected the header {list(layout.columns)}')
  result = Split(path, examples, skipped, layout.official_rows)
  if skipped:
    logging.warning('%s; first: %s', result.summary(), skipped[0][1])
  elif len(examples) != layout.official_rows:
    logging.warning('%s', result.summary())
  return result


class Encoded(NamedTuple):
  """Model inputs and targets.

  Attributes:
    input_ids: int32 [n, max_seq_len], padded with the tokenizer's PAD.
    input_mask: int32 [n, max_seq_len], 1 on real bytes.
    labels: int32 label ids (``task.labels`` order), float32 scores for STS-B, or None
      for a split without labels (test).
    num_truncated: how many examples were cut to ``max_seq_len``.
  """
  input_ids: np.ndarray
  input_mask: np.ndarray
  labels: np.ndarray | None
  num_truncated: int


def label_ids(task: str | Task, labels: Sequence[str | float]) -> np.ndarray:
  """Label strings to int32 ids in ``task.labels`` order; STS-B scores to float32."""
  task = get_task(task)
  if task.is_regression:
    return np.asarray(labels, np.float32)
  ids = {label: i for i, label in enumerate(task.labels)}
  unknown = sorted({str(label) for label in labels if label not in ids})
  if unknown:
    raise GlueDataError(f'{task.name}: unknown labels {unknown}; known: '
                        f'{", ".join(task.labels)}')
  return np.asarray([ids[label] for label in labels], np.int32)


def encode(examples: Sequence[Example], task: str | Task, max_seq_len: int,
           tokenizer: tokenizer_lib.BytesTokenizer | None = None) -> Encoded:
  """Encodes examples as UTF-8 bytes, truncated to ``max_seq_len``.

  No CLS token: the paper's single-task models have none (the classifier's decoder
  queries the latents with a learned query). A pair is ``text_a SEP text_b`` with the
  tokenizer's SEP id (5) between the segments' bytes, and no other marker; when it is too
  long, the longer segment is cut first (``BytesTokenizer.encode_batch``).

  Encode a large split (MNLI, QQP) a batch at a time: the arrays are ``n * max_seq_len``.

  Args:
    examples: from ``load_split``; all labelled, or all not (a test split).
    task: the task (or its name): it says whether examples are pairs and maps labels.
    max_seq_len: the fixed length of every row.
    tokenizer: a ``BytesTokenizer`` (a new one if None).

  Returns:
    ``Encoded(input_ids, input_mask, labels, num_truncated)``.
  """
  task = get_task(task)
  tokenizer = tokenizer or tokenizer_lib.BytesTokenizer()
  if any((e.text_b is None) == task.is_pair for e in examples):
    raise GlueDataError(f'{task.name}: every example must have '
                        f'{"two segments" if task.is_pair else "one segment"}')
  labelled = [e.label is not None for e in examples]
  if any(labelled) and not all(labelled):
    raise GlueDataError(f'{task.name}: {labelled.count(False)} of {len(examples)} '
                        'examples have no label; encode labelled and test splits apart')
  labels = label_ids(task, [e.label for e in examples]) if all(labelled) and examples \
      else None
  pairs = [e.text_b for e in examples] if task.is_pair else None
  batch = tokenizer.encode_batch([e.text_a for e in examples], max_seq_len, pairs=pairs)
  return Encoded(batch.input_ids, batch.input_mask, labels, int(batch.truncated.sum()))
