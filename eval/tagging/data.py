"""Tagging data: CoNLL-2003 and CoNLL-U files read strictly, and words aligned to bytes.

Two layouts, chosen by ``data.format``:

- ``conll2003``: one ``word POS chunk NER`` line per token (fields split on whitespace),
  blank lines between sentences, ``-DOCSTART-`` lines between documents (skipped; they
  also end a sentence). The tag is the column ``data.label_column`` (default -1: NER).
  Files ``train.txt``, ``valid.txt`` (or ``testa``) and ``test.txt`` (or ``testb``),
  also accepted under the original names ``eng.train``, ``eng.testa``, ``eng.testb``.
- ``conllu``: Universal Dependencies' ten tab-separated columns, ``#`` comment lines,
  blank lines between sentences; multiword-token lines (``1-2``) and empty nodes
  (``1.1``) are skipped, so the words are the syntactic words. The tag is UPOS (column
  index 3) by default. Files ``*train.conllu``, ``*dev.conllu``, ``*test.conllu``.

A line that does not parse (too few fields, bad UTF-8, a CoNLL-U ID that is not a
number) is a ``TaggingDataError`` naming ``file:line``; so is a dev or test tag that the
training file never uses. So is a line of the other format, which would otherwise parse
into nonsense: a CoNLL-U line (ten tab-separated columns, a word number first) or comment
(``# sent_id =``, ``# text =``) in a file read as CoNLL-2003 (its line numbers and ``_``
fields would become words and tags), and a line of 2 to 5 fields not led by a word number,
or a ``-DOCSTART-`` line, in a file read as CoNLL-U; the error names ``data.format``
(``--format``). A tag that no tag set uses is refused the same way, naming
``data.label_column``: an integer (a line number or a head index, not a label) in either
format, and ``_`` (an empty CoNLL-U field) in CoNLL-2003; a CoNLL-U training file whose
every tag is ``_`` (a column the treebank leaves empty) is refused too.

Alignment: a sentence's words are joined with single spaces and encoded as UTF-8 bytes
(ids ``byte + 6``, no special tokens, as in pretraining); each word's tag sits on its
first byte, which is where the model's decoder is queried and the loss is taken. A
sentence longer than ``max_seq_len`` bytes is split into windows of whole words, each
sharing about ``overlap`` bytes of words with the next; each word is scored in exactly
one window: the shared words are split between the two windows at their middle, so a
scored word has context on both sides where the sentence allows. Only a single word
longer than a whole window is cut (its first byte, and so its tag, is kept); those are
counted (``num_cut_words``) and logged, never silent.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from perceiver.command import errors
from perceiver.model import tokenizer as tokenizer_lib
from perceiver.training.mesh import round_up

FORMATS = ('conll2003', 'conllu')
DOCSTART = '-DOCSTART-'
OUTSIDE = 'O'

# The file names each split is looked for under, in order, per format.
_FILES = {
    'conll2003': {'train': ('train.txt', 'eng.train', 'train'),
                  'dev': ('valid.txt', 'dev.txt', 'testa', 'eng.testa', 'testa.txt'),
                  'test': ('test.txt', 'testb', 'eng.testb', 'testb.txt')},
    'conllu': {'train': ('*train.conllu',), 'dev': ('*dev.conllu',),
               'test': ('*test.conllu',)},
}


class TaggingDataError(errors.UserError, ValueError):
  """A tagging file or directory that is not in the layout its format states."""


@dataclasses.dataclass(frozen=True)
class Sentence:
  """One sentence: its words, their tags, and each word's line in its file (1-based)."""
  words: Tuple[str, ...]
  tags: Tuple[str, ...]
  lines: Tuple[int, ...]


@dataclasses.dataclass
class Split:
  """One file's sentences."""
  name: str
  path: str
  sentences: List[Sentence]

  @property
  def num_words(self) -> int:
    return sum(len(s.words) for s in self.sentences)


def _lines(path: str):
  """(1-based line number, text without its line end) of a UTF-8 file."""
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise TaggingDataError(f'{path}:{number}: not UTF-8 ({e.reason} at byte '
                               f'{e.start})') from None
      if number == 1:
        text = text.lstrip('\ufeff')
      yield number, text.rstrip('\r\n')


_CONLLU_ID = re.compile(r'^\d+([-.]\d+)?$')
_CONLLU_COMMENT = re.compile(r'^#\s*(sent_id|text|newdoc|newpar|global\.columns)\b')


def _conllu_in_conll2003(path: str, number: int, text: str) -> None:
  """TaggingDataError when a line of a file read as CoNLL-2003 is CoNLL-U's."""
  columns = text.split('\t')
  if (len(columns) == 10 and _CONLLU_ID.match(columns[0])) or _CONLLU_COMMENT.match(text):
    raise TaggingDataError(
        f'{path}:{number}: a CoNLL-U line (10 tab-separated columns, a word number first, '
        'or a # sent_id/# text comment) in a file read as CoNLL-2003 (data.format='
        'conll2003): for CoNLL-U data pass --format=conllu (files *train.conllu, '
        '*dev.conllu, *test.conllu)')


def _conll2003_in_conllu(path: str, number: int, text: str) -> None:
  """TaggingDataError when a line of a file read as CoNLL-U is CoNLL-2003's."""
  fields = text.split()
  if fields[:1] == [DOCSTART] or (2 <= len(fields) <= 5 and not _CONLLU_ID.match(fields[0])):
    raise TaggingDataError(
        f'{path}:{number}: {text!r} is a CoNLL-2003 line (2 to 5 fields, word first: word '
        'POS chunk NER) in a file read as CoNLL-U (data.format=conllu: 10 tab-separated '
        'columns): for CoNLL-2003 data pass --format=conll2003 (files train.txt, '
        'valid.txt, test.txt)')


def _check_tag(path: str, number: int, tag: str, column: int, fmt: str) -> None:
  """TaggingDataError for a tag that no tag set uses (see the module docstring)."""
  empty = fmt == 'conll2003' and tag == '_'
  if tag.lstrip('-').isdigit() or empty:
    raise TaggingDataError(
        f'{path}:{number}: tag {tag!r} (column {column}, data.label_column) is '
        f'{"an empty field" if empty else "a number"}, not a label such as B-PER or NOUN: '
        f'is data.label_column the wrong column, or the file not {fmt} (data.format)?')


def _sentence(words, tags, lines):
  return Sentence(tuple(words), tuple(tags), tuple(lines))


def read_conll2003(path: str, label_column: int = -1) -> List[Sentence]:
  """Sentences of a CoNLL-2003 file (see the module docstring)."""
  sentences, words, tags, lines = [], [], [], []
  for number, text in _lines(path):
    _conllu_in_conll2003(path, number, text)
    fields = text.split()
    if not fields or fields[0] == DOCSTART:
      if words:
        sentences.append(_sentence(words, tags, lines))
      words, tags, lines = [], [], []
      continue
    if len(fields) < 2:
      raise TaggingDataError(f'{path}:{number}: expected "word ... tag" (at least 2 '
                             f'whitespace-separated fields), got {text!r}')
    try:
      tag = fields[label_column]
    except IndexError:
      raise TaggingDataError(f'{path}:{number}: no column {label_column} '
                             f'(data.label_column) in {len(fields)} fields: {text!r}'
                             ) from None
    if label_column % len(fields) == 0:
      raise TaggingDataError(f'{path}:{number}: data.label_column={label_column} is the '
                             'word column')
    _check_tag(path, number, tag, label_column, 'conll2003')
    lines.append(number)
    words.append(fields[0])
    tags.append(tag)
  if words:
    sentences.append(_sentence(words, tags, lines))
  return sentences


def read_conllu(path: str, label_column: int = 3) -> List[Sentence]:
  """Sentences of a CoNLL-U file (see the module docstring); tags from ``label_column``
  (3: UPOS, 4: XPOS)."""
  sentences, words, tags, lines = [], [], [], []
  for number, text in _lines(path):
    if not text.strip():
      if words:
        sentences.append(_sentence(words, tags, lines))
      words, tags, lines = [], [], []
      continue
    if text.startswith('#'):
      continue
    fields = text.split('\t')
    if len(fields) != 10:
      _conll2003_in_conllu(path, number, text)
      raise TaggingDataError(f'{path}:{number}: expected 10 tab-separated CoNLL-U '
                             f'columns, got {len(fields)}: {text!r}')
    token_id = fields[0]
    if '-' in token_id or '.' in token_id:
      continue   # a multiword token's surface form, or an empty node
    if not token_id.isdigit():
      raise TaggingDataError(f'{path}:{number}: ID {token_id!r} is not a word number')
    if not 0 <= label_column < 10 or label_column == 1:
      raise TaggingDataError(f'data.label_column={label_column}: a CoNLL-U tag column is '
                             'one of 2..9 (3: UPOS)')
    _check_tag(path, number, fields[label_column], label_column, 'conllu')
    lines.append(number)
    words.append(fields[1])
    tags.append(fields[label_column])
  if words:
    sentences.append(_sentence(words, tags, lines))
  return sentences


def default_label_column(fmt: str) -> int:
  return -1 if fmt == 'conll2003' else 3


def find_file(data_dir: str, fmt: str, split: str) -> Optional[str]:
  """The file of ``split`` ('train', 'dev' or 'test') in ``data_dir``, or None."""
  for pattern in _FILES[fmt][split]:
    matches = sorted(glob.glob(os.path.join(glob.escape(data_dir), pattern)))
    if len(matches) > 1:
      raise TaggingDataError(f'{data_dir}: several {split} files match {pattern!r}: '
                             f'{", ".join(matches)}')
    if matches and os.path.isfile(matches[0]):
      return matches[0]
  return None


def load_split(data_dir: str, fmt: str, split: str, label_column: Optional[int] = None,
               required: bool = True) -> Optional[Split]:
  """Reads one split; a missing required file is an error listing the names tried."""
  if fmt not in FORMATS:
    raise TaggingDataError(f'data.format={fmt!r}: expected one of {", ".join(FORMATS)}')
  path = find_file(data_dir, fmt, split)
  if path is None:
    if required:
      raise TaggingDataError(f'{data_dir}: no {split} file (looked for '
                             f'{", ".join(_FILES[fmt][split])})')
    return None
  column = default_label_column(fmt) if label_column is None else label_column
  reader = read_conll2003 if fmt == 'conll2003' else read_conllu
  sentences = reader(path, column)
  if not sentences:
    raise TaggingDataError(f'{path}: no sentences')
  if split == 'train' and {t for s in sentences for t in s.tags} == {'_'}:
    raise TaggingDataError(f'{path}: every tag in column {column} (data.label_column) is '
                           "'_', a column this file leaves empty: choose another column")
  return Split(split, path, sentences)


def label_list(train: Split) -> List[str]:
  """The training file's tags: 'O' first where present, then sorted."""
  tags = {t for s in train.sentences for t in s.tags}
  return ([OUTSIDE] if OUTSIDE in tags else []) + sorted(tags - {OUTSIDE})


def check_tags(split: Split, labels: Sequence[str]) -> None:
  """Every tag of ``split`` is one of ``labels``; else an error naming file and line."""
  known = set(labels)
  for sentence in split.sentences:
    for tag, line in zip(sentence.tags, sentence.lines):
      if tag not in known:
        raise TaggingDataError(f'{split.path}:{line}: tag {tag!r} does not occur in the '
                               f'training file (its tags: {", ".join(labels)})')


# --------------------------------------------------------------------------------------
# Words to bytes.

@dataclasses.dataclass(frozen=True)
class Window:
  """Words ``[start, end)`` of one sentence as one model input; it scores
  ``[score_start, score_end)`` (the others are context)."""
  start: int
  end: int
  score_start: int
  score_end: int


def _span_bytes(lengths: Sequence[int], start: int, end: int) -> int:
  return sum(lengths[start:end]) + max(end - start - 1, 0)


def plan_windows(lengths: Sequence[int], window: int, overlap: int) -> List[Window]:
  """Windows over words of byte ``lengths`` joined by single spaces (see the module
  docstring): each holds whole words within ``window`` bytes (a longer single word
  alone), consecutive ones share the words that fit in ``overlap`` bytes, and every
  word is scored in exactly one of them, in order."""
  n = len(lengths)
  if n == 0:
    return []

  def fill(start):
    end, used = start + 1, lengths[start]
    while end < n and used + 1 + lengths[end] <= window:
      used += 1 + lengths[end]
      end += 1
    return end

  out, start, score_from = [], 0, 0
  while score_from < n:
    end = fill(start)
    if end <= score_from:        # no new word fits after the shared ones: no context
      start = score_from
      end = fill(start)
    if end == n:
      out.append(Window(start, end, score_from, n))
      break
    shared = end
    while shared - 1 > start and _span_bytes(lengths, shared - 1, end) <= overlap:
      shared -= 1
    middle = max(score_from + 1, min(end, shared + (end - shared + 1) // 2))
    out.append(Window(start, end, score_from, middle))
    start, score_from = min(shared, middle), middle
  return out


def word_offsets(words: Sequence[str]) -> List[int]:
  """The byte offset of each word's first byte in ``' '.join(words)`` as UTF-8."""
  offsets, at = [], 0
  for word in words:
    offsets.append(at)
    at += len(word.encode('utf-8')) + 1
  return offsets


@dataclasses.dataclass
class EncodedSplit:
  """One split's windows as model inputs, padded to the split's own sizes.

  Attributes:
    name, path: the split and its file.
    input_ids: int16 [n, length] byte ids (0: padding).
    input_mask: int8 [n, length].
    positions: int16 [n, slots], each window word's first byte (0 in padding slots).
    slot_mask: int8 [n, slots], 1 on the window's words (scored or context).
    labels: int32 [n, slots] tag ids (0 where not scored).
    weights: float32 [n, slots], 1 on the words this window scores.
    word_ids: int32 [n, slots], the scored word's index in the split's words in order
      (sentence by sentence), -1 elsewhere.
    sentences: the split's sentences (for reading predictions back).
    num_split_sentences: sentences that needed more than one window.
    num_cut_words: words longer than a window (their bytes cut, their tag kept).
  """
  name: str
  path: str
  input_ids: np.ndarray
  input_mask: np.ndarray
  positions: np.ndarray
  slot_mask: np.ndarray
  labels: np.ndarray
  weights: np.ndarray
  word_ids: np.ndarray
  sentences: List[Sentence]
  num_split_sentences: int
  num_cut_words: int

  def __len__(self):
    return self.input_ids.shape[0]

  @property
  def length(self) -> int:
    return self.input_ids.shape[1]

  @property
  def num_words(self) -> int:
    return sum(len(s.words) for s in self.sentences)


def encode_split(split: Split, labels: Sequence[str], max_seq_len: int, overlap: int,
                 length_multiple: int = 16, slot_multiple: int = 8) -> EncodedSplit:
  """Windows of every sentence of ``split`` (tags checked against ``labels``), padded to
  the longest window rounded up to ``length_multiple`` bytes (at most ``max_seq_len``)
  and the most words in a window rounded up to ``slot_multiple``."""
  check_tags(split, labels)
  label_id = {tag: i for i, tag in enumerate(labels)}
  rows, split_sentences, cut, word_base = [], 0, 0, 0
  for sentence in split.sentences:
    encoded = [w.encode('utf-8') for w in sentence.words]
    lengths = [len(b) for b in encoded]
    plan = plan_windows(lengths, max_seq_len, overlap)
    split_sentences += len(plan) > 1
    cut += sum(length > max_seq_len for length in lengths)
    for win in plan:
      text = b' '.join(encoded[win.start:win.end])[:max_seq_len]
      offsets = word_offsets(sentence.words[win.start:win.end])
      rows.append((text, offsets, win, sentence, word_base))
    word_base += len(sentence.words)
  if not rows:
    raise TaggingDataError(f'{split.path}: no words')
  length = min(round_up(max(len(r[0]) for r in rows), length_multiple), max_seq_len)
  slots = round_up(max(len(r[1]) for r in rows), slot_multiple)
  n = len(rows)
  out = EncodedSplit(
      split.name, split.path, np.zeros((n, length), np.int16), np.zeros((n, length), np.int8),
      np.zeros((n, slots), np.int16), np.zeros((n, slots), np.int8),
      np.zeros((n, slots), np.int32), np.zeros((n, slots), np.float32),
      np.full((n, slots), -1, np.int32), split.sentences, split_sentences, cut)
  for i, (text, offsets, win, sentence, base) in enumerate(rows):
    ids = np.frombuffer(text, np.uint8).astype(np.int16) + tokenizer_lib.NUM_SPECIAL
    out.input_ids[i, :len(ids)] = ids
    out.input_mask[i, :len(ids)] = 1
    count = win.end - win.start
    out.positions[i, :count] = offsets
    out.slot_mask[i, :count] = 1
    for slot in range(win.score_start - win.start, win.score_end - win.start):
      word = win.start + slot
      out.labels[i, slot] = label_id[sentence.tags[word]]
      out.weights[i, slot] = 1.0
      out.word_ids[i, slot] = base + word
  return out


def words_from_windows(split: EncodedSplit, slot_values: np.ndarray) -> List[list]:
  """Per-slot values [n, slots] (e.g. predicted tag ids) -> one list per sentence, one
  value per word, each read from the window that scores the word."""
  flat = np.full(split.num_words, -1, np.int64)
  scored = split.word_ids >= 0
  flat[split.word_ids[scored]] = np.asarray(slot_values)[scored]
  if (flat < 0).any():
    raise AssertionError(f'{int((flat < 0).sum())} words of {split.path} were not scored')
  out, at = [], 0
  for sentence in split.sentences:
    out.append(flat[at:at + len(sentence.words)].tolist())
    at += len(sentence.words)
  return out


def summary(split: Split) -> str:
  tags = {t for s in split.sentences for t in s.tags}
  return (f'{split.name}: {split.path}: {len(split.sentences)} sentences, '
          f'{split.num_words} words, {len(tags)} tags')


def encoded_summary(enc: EncodedSplit, max_seq_len: int, overlap: int) -> str:
  return (f'{enc.name}: {len(enc)} windows of at most {enc.length} bytes and '
          f'{enc.positions.shape[1]} words; {enc.num_split_sentences} sentences longer '
          f'than {max_seq_len} bytes split into windows sharing <= {overlap} bytes; '
          f'{enc.num_cut_words} words longer than a window cut (their tag kept)')


def all_splits(data_dir: str, fmt: str, label_column: Optional[int], with_test: bool
               ) -> Dict[str, Split]:
  """train and dev (required), and test when asked and present."""
  if not os.path.isdir(data_dir):
    raise TaggingDataError(f'--data_dir {data_dir}: no such directory')
  out = {name: load_split(data_dir, fmt, name, label_column) for name in ('train', 'dev')}
  if with_test:
    test = load_split(data_dir, fmt, 'test', label_column, required=False)
    if test is not None:
      out['test'] = test
  return out
