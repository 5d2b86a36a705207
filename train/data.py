"""The pretraining input pipeline: documents -> mixed, concatenated, cropped byte examples.

numpy (and pyarrow for Parquet) only. Per host:

1. ``DocumentSource``: one corpus (globs of shards). Its units -- whole files, or the row
   groups of Parquet files -- are visited in a seeded order that changes every epoch; a
   reader takes its share of them (whole units when there are at least as many units as
   readers, else every P-th record of each unit, skipped before it is parsed).
2. ``ExampleStream``: each example draws a source by the mixing weights and takes that
   source's next crop. A source concatenates ``docs_per_example`` consecutive documents
   joined by ``separator`` and splits the concatenation into consecutive ``seq_len``
   crops (the last one padded), every crop an example -- the model card's "concatenate
   10 documents before splitting into crops to reduce wasteful computation on padding
   tokens" -- so each document byte is trained on once per epoch.
3. Mixing documents: a source keeps ``open_concatenations`` concatenations open and takes
   its crops from them in turn, every round in a seeded order (``_Interleaved``).
   Consecutive crops of one long document would otherwise fill whole batches (64-byte
   crops of a 10 KB document: 160 in a row); instead, while that many are open, any
   ``open_concatenations`` consecutive crops of a source hold at most two of one
   concatenation, whatever the document lengths and ``seq_len`` (a share with fewer
   documents ends each epoch on its longest ones). Examples are built in blocks of
   ``block_size`` and emitted in order; everything random is seeded by (seed, reader,
   block or round), so the stream's position is a small JSON state -- each source's open
   concatenations (where each starts, how many crops were taken) at the block's start,
   plus the index in the block -- and a resumed run sees exactly the examples it would
   have seen.
4. ``StreamRows``: rows of one stream, each take with a masking RNG seeded by the
   stream's count of takes; ``mask`` masks a batch joined from several takes.
5. ``StreamSpec`` and ``interleave``: a host's data is ``streams`` such streams (each a
   disjoint share of the host's share, like a host of its own). Host batch ``n`` takes
   its rows from every stream in turn (``schedule``: about ``batch / streams`` each), so
   even a stream whose share ends its epoch on a few long documents fills only its own
   rows of a batch. The order is a function of the seed and ``streams``, not of how many
   worker processes compute the streams (``train/workers.py``).

Formats, by file name: ``*.json.gz``/``*.jsonl.gz`` (C4 as released: gzipped JSON lines,
the ``text`` field), ``*.json``/``*.jsonl`` (JSON lines, e.g. a Wikipedia export),
``*.parquet`` (a ``text`` column, as Hugging Face's ``wikimedia/wikipedia`` is
distributed; read one row group at a time) and ``*.txt`` (plain text; documents separated
by blank lines, as in BERT's pretraining text format). Bytes are kept as they are: invalid
UTF-8 in a .txt file is trained on unchanged.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import gzip
import json
import os
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from perceiver.command import errors
from perceiver.model import tokenizer as tokenizer_lib

SEPARATORS = {'sep': [tokenizer_lib.SEP_ID], 'eos': [tokenizer_lib.EOS_ID],
              'newline': [ord('\n') + tokenizer_lib.NUM_SPECIAL], 'none': []}


class DataError(errors.UserError, ValueError):
  """Unreadable or malformed input, with the file (and line) it came from."""


# --------------------------------------------------------------------------------------
# Reading documents from one file.

def _open_lines(path):
  if path.endswith('.gz'):
    return gzip.open(path, 'rb')
  return open(path, 'rb')


def _file_format(path):
  if path.endswith('.parquet'):
    return 'parquet'
  name = path[:-3] if path.endswith('.gz') else path
  if name.endswith(('.json', '.jsonl')):
    return 'json'
  if name.endswith('.txt') or name.endswith('.raw'):
    return 'text'
  raise DataError(f'{path}: unknown format; expected .json[l][.gz], .parquet or '
                  '.txt[.gz]/.raw')


def _json_text(line: bytes, path: str, line_no: int, field: str, flag: str = '') -> bytes:
  # surrogateescape keeps raw invalid UTF-8 bytes through json.loads and back.
  try:
    record = json.loads(line.decode('utf-8', errors='surrogateescape'))
  except ValueError as e:
    raise DataError(f'{path}:{line_no}: not a JSON object: {e}') from None
  if not isinstance(record, dict) or field not in record:
    named = f'{field!r} ({flag})' if flag else repr(field)
    raise DataError(f'{path}:{line_no}: JSON line has no {named} field')
  text = record[field]
  if not isinstance(text, str):
    raise DataError(f'{path}:{line_no}: field {field!r} is {type(text).__name__}, not text')
  try:
    return text.encode('utf-8', errors='surrogateescape')
  except UnicodeEncodeError:  # lone surrogates written as \\ud83d escapes
    return text.encode('utf-8', errors='replace')


def _check_parquet_column(path: str, schema, field: str, flag: str) -> None:
  """DataError unless ``schema`` has a text column ``field``; ``flag`` (the flag or config
  field that chose the column), when given, is named with it."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  named = f'{field!r} ({flag})' if flag else repr(field)
  if field not in schema.names:
    raise DataError(f'{path}: Parquet file has no {named} column (columns: '
                    f'{", ".join(schema.names) or "none"})')
  kind = schema.field(field).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
          or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
    raise DataError(f'{path}: Parquet column {named} is {kind}, not text')


def parquet_row_groups(path: str, field: str = 'text', flag: str = '') -> int:
  """The number of row groups of a Parquet file whose ``field`` column holds text.

  Raises:
    DataError: naming the file (and ``flag``, the flag or config field that chose the
      column), when it is not Parquet or has no such text column.
  """
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    with pq.ParquetFile(path) as f:
      schema, groups = f.schema_arrow, f.num_row_groups
  except (OSError, pa.ArrowException) as e:
    raise DataError(f'{path}: not a readable Parquet file: {e}') from None
  _check_parquet_column(path, schema, field, flag)
  return groups


def _parquet_documents(path: str, field: str, groups, stride: int, offset: int,
                       flag: str = '') -> Iterator[bytes]:
  """The documents of ``groups`` (None: all) of a Parquet file, its column checked first
  as ``parquet_row_groups`` checks it."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    with pq.ParquetFile(path) as f:
      _check_parquet_column(path, f.schema_arrow, field, flag)
      for group in (range(f.num_row_groups) if groups is None else groups):
        column = f.read_row_group(group, columns=[field]).column(0)
        if stride > 1:
          column = column.take(np.arange(offset, len(column), stride))
        # As binary: the UTF-8 bytes themselves, without decoding and re-encoding them.
        kind = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        for text in column.cast(kind).to_pylist():
          if text and text.strip():
            yield text
  except (OSError, pa.ArrowException) as e:
    raise DataError(f'{path}: unreadable Parquet data: {e}') from None


def read_documents(path: str, text_field: str = 'text', *, stride: int = 1, offset: int = 0,
                   row_group: Optional[int] = None, field_flag: str = '') -> Iterator[bytes]:
  """Yields the non-empty documents of one file (or one Parquet row group), as bytes.

  With ``stride`` > 1 only records (JSON lines, Parquet rows, text paragraphs) whose index
  is ``offset`` modulo ``stride`` are kept; the others are skipped before being parsed.
  ``field_flag``: the flag or config field that set ``text_field``, named with it when a
  JSON line or a Parquet file has no such field or column.

  Raises:
    DataError: naming the file and line, for malformed JSON, a missing field or column,
      or a corrupt gzip stream or Parquet file.
  """
  fmt = _file_format(path)
  if fmt == 'parquet':
    yield from _parquet_documents(path, text_field,
                                  None if row_group is None else [row_group], stride, offset,
                                  field_flag)
    return
  line_no = 0
  try:
    with _open_lines(path) as f:
      if fmt == 'json':
        for line_no, line in enumerate(f, 1):
          if (line_no - 1) % stride == offset and line.strip():
            text = _json_text(line, path, line_no, text_field, field_flag)
            if text.strip():
              yield text
      else:
        paragraph: List[bytes] = []
        index = 0
        for line_no, line in enumerate(f, 1):
          if line.strip():
            paragraph.append(line)
          elif paragraph:
            if index % stride == offset:
              yield b''.join(paragraph).rstrip(b'\r\n')
            paragraph, index = [], index + 1
        if paragraph and index % stride == offset:
          yield b''.join(paragraph).rstrip(b'\r\n')
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: unreadable after line {line_no}: {e}') from None


# --------------------------------------------------------------------------------------
# A corpus: globs of shards, this reader's share, endless epochs.

def expand_paths(patterns, what: str) -> List[str]:
  """Comma-separated globs -> sorted existing files; the error names ``what``."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(',') if p.strip()]
  files: List[str] = []
  for pattern in patterns:
    pattern = os.path.expanduser(pattern.strip())
    matches = sorted(glob.glob(pattern))
    if not matches:
      raise DataError(f'{what}: no file matches {pattern!r}')
    found = [m for m in matches if os.path.isfile(m)]
    if not found:
      raise DataError(f'{what}: {pattern!r} matches only directories; give files or a '
                      f'glob of them (e.g. {os.path.join(pattern, "*.jsonl")})')
    files.extend(found)
  if not files:
    raise DataError(f'{what}: no files given')
  return files


Unit = Tuple[str, Optional[int]]   # a file, or (Parquet) one row group of it


def read_units(files: Sequence[str], text_field: str = 'text') -> List[Unit]:
  """The units of ``files``: each file, or each row group of a Parquet file."""
  units: List[Unit] = []
  for path in files:
    if _file_format(path) == 'parquet':
      units.extend((path, g) for g in range(parquet_row_groups(path, text_field)))
    else:
      units.append((path, None))
  return units


def unit_records(unit: Unit, limit: int) -> int:
  """How many records (JSON lines, text paragraphs, Parquet rows; empty ones included, as
  ``read_documents``' ``stride`` counts them) ``unit`` holds, counted up to ``limit``."""
  path, group = unit
  if group is not None:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    with pq.ParquetFile(path) as f:
      return min(limit, f.metadata.row_group(group).num_rows)
  count, in_paragraph, lines = 0, False, _file_format(path) == 'json'
  try:
    with _open_lines(path) as f:
      for line in f:
        if lines:
          count += 1
        elif line.strip():
          count, in_paragraph = count + (not in_paragraph), True
        else:
          in_paragraph = False
        if count >= limit:
          break
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: unreadable: {e}') from None
  return count


@dataclasses.dataclass
class SourceState:
  """Position of a source: the next document is #doc of unit #shard of epoch #epoch."""
  epoch: int = 0
  shard: int = 0
  doc: int = 0


class DocumentSource:
  """Endless documents of one corpus, for one reader, in a seeded per-epoch unit order.

  A unit is a file, or one row group of a Parquet file. ``process_index`` of
  ``process_count`` is the reader: a host, or one of a host's streams (``StreamSpec``).
  """

  CACHE_BYTES = 128 << 20   # parsed documents kept per source (see ``_read``)
  # A document longer than LONG_DOCUMENT_BYTES is read as consecutive pieces of
  # PIECE_BYTES, each one a document of the source. An example uses at most a crop of
  # seq_len bytes; without pieces, every example that touches a document larger than the
  # cache parsed all of it again (a 300 MB one-line JSON document: minutes per step).
  # With them, one parse of the document serves every piece, so an example costs at
  # most docs_per_example pieces of parsing. Documents up to 1 MiB (all of Wikipedia's
  # and nearly all of C4's) are read whole, as before; in a longer one the only change
  # is a separator every 64 KiB.
  LONG_DOCUMENT_BYTES = 1 << 20
  PIECE_BYTES = 1 << 16

  def __init__(self, name: str, files: Sequence[str], *, seed: int, process_index: int = 0,
               process_count: int = 1, text_field: str = 'text',
               cache_bytes: Optional[int] = None):
    self.name = name
    self.seed = seed
    self.text_field = text_field
    self.process_index, self.process_count = process_index, process_count
    self.cache_bytes = self.CACHE_BYTES if cache_bytes is None else cache_bytes
    self._cache: Dict[Tuple[str, Optional[int]], List[bytes]] = {}
    self._cached_bytes = 0
    units = read_units(files, text_field)
    self.num_files = len(files)
    if len(units) >= process_count:   # whole units per reader
      self.units = units[process_index::process_count]
      self.doc_stride, self.doc_offset = 1, 0
    else:                             # every P-th record of every unit
      self.units = units
      self.doc_stride, self.doc_offset = process_count, process_index

  def _read(self, unit: Tuple[str, Optional[int]]) -> Iterator[bytes]:
    """This reader's documents of one unit; a unit read to its end is kept in memory while
    the source's cache holds less than ``cache_bytes``, so that a small corpus (or one huge
    document) is not parsed again for every pass over it."""
    cached = self._cache.get(unit)
    if cached is not None:
      yield from cached
      return
    docs, size = [], 0
    for doc in self._pieces(read_documents(unit[0], self.text_field, stride=self.doc_stride,
                                           offset=self.doc_offset, row_group=unit[1])):
      yield doc
      if docs is not None:
        docs.append(doc)
        size += len(doc)
        if self._cached_bytes + size > self.cache_bytes:
          docs = None
    if docs is not None:
      self._cache[unit] = docs
      self._cached_bytes += size

  def _pieces(self, documents: Iterator[bytes]) -> Iterator[bytes]:
    """``documents``, each longer than ``LONG_DOCUMENT_BYTES`` cut into pieces."""
    for doc in documents:
      if len(doc) <= self.LONG_DOCUMENT_BYTES:
        yield doc
      else:
        for start in range(0, len(doc), self.PIECE_BYTES):
          yield doc[start:start + self.PIECE_BYTES]

  def _order(self, epoch: int) -> List[Tuple[str, Optional[int]]]:
    rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), epoch])
    return [self.units[i] for i in rng.permutation(len(self.units))]

  def documents(self, state: SourceState) -> Iterator[Tuple[bytes, SourceState]]:
    """Yields (document, state after it) from ``state`` on, forever."""
    epoch, shard, skip = state.epoch, state.shard, state.doc
    while True:
      from_start, found = shard == 0 and skip == 0, False
      order = self._order(epoch)
      for shard in range(shard, len(order)):
        for kept, doc in enumerate(self._read(order[shard]), 1):
          found = True
          if kept > skip:
            yield doc, SourceState(epoch, shard, kept)
        skip = 0
      if from_start and not found:
        raise DataError(f'source {self.name!r}: no documents for reader '
                        f'{self.process_index} of {self.process_count} in '
                        f'{self.num_files} file(s) (each of the hosts x data.streams '
                        'readers needs documents of its own: its files or records are '
                        'empty; remove the empty files or lower data.streams)')
      epoch, shard = epoch + 1, 0


# --------------------------------------------------------------------------------------
# Examples: concatenation, consecutive crops interleaved across open concatenations, mixing.

def join_documents(parts: Sequence[bytes], separator: np.ndarray, dtype=np.int32
                   ) -> np.ndarray:
  """Token ids of ``parts`` (document bytes) joined by ``separator`` (ids), as ``dtype``."""
  total = sum(len(p) for p in parts) + len(separator) * max(len(parts) - 1, 0)
  out = np.empty(total, dtype)
  at = 0
  for i, part in enumerate(parts):
    if i and len(separator):
      out[at:at + len(separator)] = separator
      at += len(separator)
    view = out[at:at + len(part)]
    view[:] = np.frombuffer(part, np.uint8)
    view += tokenizer_lib.NUM_SPECIAL
    at += len(part)
  return out


def _position(state: SourceState) -> Tuple[int, int, int]:
  return state.epoch, state.shard, state.doc


class _Interleaved:
  """One source's crops, taken in turn from ``count`` open concatenations ("slots").

  A slot holds ``docs`` consecutive documents joined, cut every ``seq_len``; an exhausted
  (or never used) slot is refilled with the source's next ``docs`` documents. Each round
  visits every slot once, in a seeded order, so ``count`` consecutive crops of a source
  come from ``count`` different concatenations, at most two from one across a round's
  end: a batch mixes documents whatever their length or ``seq_len``.

  Each document byte is still used once per epoch: a concatenation of the next epoch is
  opened only once none of the current epoch's is open (else a share with fewer
  documents than slots would hold one document in several slots at once). While the
  last concatenations of an epoch drain, fewer than ``count`` are open.

  The state (``snapshot``) is JSON: the source position of the next concatenation, per
  slot the position its concatenation starts at and the crops taken from it, and the
  round and turn. Ids are kept as uint16 (the vocabulary is 262): half the memory.
  """

  def __init__(self, source: DocumentSource, state: dict, *, docs: int,
               separator: np.ndarray, seq_len: int, count: int, seed: int, reader: int):
    self.source, self.docs, self.separator, self.seq_len = source, docs, separator, seq_len
    self.count, self.seed, self.reader = count, seed, reader
    self.next_start = SourceState(**state['next'])
    self.starts: List[Optional[Tuple[int, int, int]]] = [None] * count
    self.taken = [0] * count
    flat = state['slots']
    for i in range(min(count, len(flat) // 4)):
      if flat[4 * i] >= 0:
        self.starts[i], self.taken[i] = tuple(flat[4 * i:4 * i + 3]), flat[4 * i + 3]
    self.round, self.turn = state['turn']
    self._order = self._round_order(self.round)
    self._ids: List[Optional[np.ndarray]] = [None] * count
    self._epochs: List[Optional[int]] = [None] * count   # of a slot's first document
    self._is_open = np.zeros(count, bool)                # crops left
    self._open_turns: Optional[List[int]] = None
    self._open: Dict[int, int] = {}                     # epoch -> open slots
    self._pending = None   # the next concatenation, read but held back by the epoch rule
    self._documents = None
    self._reopen()

  @staticmethod
  def initial_state(count: int) -> dict:
    return {'next': dataclasses.asdict(SourceState()), 'slots': [-1] * (4 * count),
            'turn': [0, 0]}

  def snapshot(self) -> dict:
    """The state (``slots``: one flat list, 4 ints a slot, -1 for one never opened)."""
    flat = []
    for start, taken in zip(self.starts, self.taken):
      flat.extend((-1, -1, -1, -1) if start is None else (*start, taken))
    return {'next': dataclasses.asdict(self.next_start), 'turn': [self.round, self.turn],
            'slots': flat}

  def _round_order(self, round_: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, self.reader, zlib.crc32(self.source.name.encode()),
                                 2, round_])
    return rng.permutation(self.count)

  def _set(self, slot: int, parts: List[bytes], epoch: int) -> None:
    """Slot ``slot`` holds ``parts`` joined (its start and taken already set)."""
    self._ids[slot] = join_documents(parts, self.separator, np.uint16)
    if self.taken[slot] * self.seq_len < len(self._ids[slot]):
      self._epochs[slot], self._is_open[slot], self._open_turns = epoch, True, None
      self._open[epoch] = self._open.get(epoch, 0) + 1

  def _reopen(self) -> None:
    """Rebuilds the slots of a resumed state: one pass over the source from the oldest
    slot's start to ``next_start``, keeping only the slots' documents."""
    wanted = {s: i for i, s in enumerate(self.starts) if s is not None}
    if not wanted:
      return
    at = min(wanted)
    documents = self.source.documents(SourceState(*at))
    filling: List[Tuple[int, List[bytes], int]] = []
    while wanted or filling:
      doc, after = next(documents)
      slot = wanted.pop(at, None)
      if slot is not None:
        filling.append((slot, [], after.epoch))
      for slot_, parts, epoch in filling:
        parts.append(doc)
        if len(parts) == self.docs:
          self._set(slot_, parts, epoch)
      filling = [f for f in filling if len(f[1]) < self.docs]
      at = _position(after)
    if at == _position(self.next_start):   # the newest slot ends where the next begins
      self._documents = documents

  def _read_next(self) -> Tuple[List[bytes], int, SourceState]:
    """The next concatenation: (documents, epoch of the first, source position after)."""
    if self._documents is None:
      self._documents = self.source.documents(self.next_start)
    parts, epoch, after = [], None, self.next_start
    for _ in range(self.docs):
      doc, after = next(self._documents)
      parts.append(doc)
      epoch = after.epoch if epoch is None else epoch
    return parts, epoch, after

  def _refill(self, slot: int) -> bool:
    """Opens the next concatenation in ``slot``; False while the epoch rule holds it."""
    if self._pending is None:
      self._pending = self._read_next()
    parts, epoch, after = self._pending
    if any(count for e, count in self._open.items() if e < epoch):
      return False
    self._pending = None
    self.starts[slot], self.taken[slot] = _position(self.next_start), 0
    self.next_start = after
    self._set(slot, parts, epoch)
    return True

  def _held(self) -> bool:
    """Whether the epoch rule holds the next concatenation back (it is read already)."""
    if self._pending is None:
      return False
    epoch = self._pending[1]
    for e, count in self._open.items():
      if count and e < epoch:
        return True
    return False

  def _next_slot(self) -> int:
    """The round's next slot; while the next concatenation is held back, the next open
    one (a bisection of the round's open turns: a share smaller than ``count`` drains
    often)."""
    while True:
      if self._held():
        if self._open_turns is None:   # the turns of this round's open slots
          self._open_turns = np.flatnonzero(self._is_open[self._order]).tolist()
        i = bisect.bisect_left(self._open_turns, self.turn)
        self.turn = self.count if i == len(self._open_turns) else self._open_turns[i]
      if self.turn < self.count:
        self.turn += 1
        return int(self._order[self.turn - 1])
      self.round, self.turn = self.round + 1, 0
      self._order, self._open_turns = self._round_order(self.round), None

  def next(self) -> np.ndarray:
    """The next crop (at most ``seq_len`` ids), from the round's next open slot."""
    slot = self._next_slot()
    while not (self._is_open[slot] or self._refill(slot)):
      slot = self._next_slot()
    ids, begin = self._ids[slot], self.taken[slot] * self.seq_len
    self.taken[slot] += 1
    if begin + self.seq_len >= len(ids):   # its last crop: the slot closes
      self._open[self._epochs[slot]] -= 1
      self._is_open[slot], self._open_turns = False, None
    return ids[begin:begin + self.seq_len]


@dataclasses.dataclass
class StreamState:
  """Where an ``ExampleStream`` is: block #block, example #index in it, and each source's
  ``_Interleaved`` state at that block's start."""
  block: int = 0
  index: int = 0
  sources: Dict[str, dict] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return {'block': self.block, 'index': self.index, 'interleaved': self.sources}

  @classmethod
  def from_json(cls, data: dict) -> 'StreamState':
    if 'interleaved' not in data:
      raise DataError('the data position was written by an earlier input pipeline '
                      '(before crops were interleaved across open documents); start '
                      'a new run (another --workdir)')
    return cls(data['block'], data['index'], data['interleaved'])


class ExampleStream:
  """Endless [seq_len] int32 examples (consecutive crops, interleaved across
  ``open_concatenations`` open concatenations per source) mixed from weighted sources."""

  def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float], *,
               seq_len: int, docs_per_example: int = 10, separator: str = 'sep',
               block_size: int = 1024, open_concatenations: int = 1024,
               seed: int = 0, process_index: int = 0):
    if len(sources) != len(weights) or not sources:
      raise ValueError('need one weight per source and at least one source')
    weights = np.asarray(weights, np.float64)
    if np.any(weights < 0) or weights.sum() <= 0:
      raise ValueError(f'source weights must be >= 0 and not all zero, got {weights.tolist()}')
    if separator not in SEPARATORS:
      raise ValueError(f'separator must be one of {sorted(SEPARATORS)}, got {separator!r}')
    self.sources = list(sources)
    self.probs = weights / weights.sum()
    self.seq_len = seq_len
    self.docs_per_example = docs_per_example
    self.separator = np.asarray(SEPARATORS[separator], np.int32)
    self.block_size = block_size
    self.open_concatenations = open_concatenations
    self.seed = seed
    self.process_index = process_index

  def initial_state(self) -> StreamState:
    return StreamState(0, 0, {s.name: _Interleaved.initial_state(self.open_concatenations)
                              for s in self.sources})

  def build_block(self, block: int, crops: Sequence[_Interleaved]) -> np.ndarray:
    """Block #``block``: ``block_size`` crops, each from a source drawn by the weights."""
    rng = np.random.default_rng([self.seed, self.process_index, block])
    examples = np.full((self.block_size, self.seq_len), tokenizer_lib.PAD_ID, np.int32)
    choices = rng.choice(len(self.sources), size=self.block_size, p=self.probs)
    for row, choice in enumerate(choices):
      crop = crops[choice].next()
      examples[row, :len(crop)] = crop
    return examples

  def reader(self, state: Optional[StreamState] = None) -> 'Examples':
    """The examples from ``state`` (None: the start) on, taken any number at a time."""
    return Examples(self, state or self.initial_state())

  def chunks(self, count: int, state: Optional[StreamState] = None
             ) -> Iterator[Tuple[np.ndarray, StreamState]]:
    """Yields (ids [count, seq_len]: the next ``count`` examples, state after them)
    forever; PAD marks padding."""
    reader = self.reader(state)
    while True:
      yield reader.take(count)

  def examples(self, state: Optional[StreamState] = None
               ) -> Iterator[Tuple[np.ndarray, StreamState]]:
    """Yields (ids [seq_len], state after this example) forever, one at a time."""
    for ids, after in self.chunks(1, state):
      yield ids[0], after


class Examples:
  """One ``ExampleStream``'s examples from a state, ``take(count)`` at a time (the count
  may change from one call to the next: a host batch takes a few rows of each stream)."""

  def __init__(self, stream: ExampleStream, state: StreamState):
    self.stream = stream
    self.crops = [_Interleaved(s, state.sources[s.name], docs=stream.docs_per_example,
                               separator=stream.separator, seq_len=stream.seq_len,
                               count=stream.open_concatenations, seed=stream.seed,
                               reader=stream.process_index)
                  for s in stream.sources]
    self.block, self.index, self.at_block_start = state.block, state.index, dict(state.sources)
    self._examples: Optional[np.ndarray] = None
    self._at_end: Optional[Dict[str, dict]] = None

  def take(self, count: int) -> Tuple[np.ndarray, StreamState]:
    """(ids [count, seq_len], the state after them). Examples come in their block's
    order, so a count within a block is a slice of it, not a copy."""
    size = self.stream.block_size
    parts, need = [], count
    while need:
      if self._examples is None or self.index == size:
        if self._examples is not None:
          self.block, self.index, self.at_block_start = self.block + 1, 0, self._at_end
        self._examples = self.stream.build_block(self.block, self.crops)
        self._at_end = {c.source.name: c.snapshot() for c in self.crops}
      take = min(need, size - self.index)
      parts.append(self._examples[self.index:self.index + take])
      self.index, need = self.index + take, need - take
    if self.index == size:
      after = StreamState(self.block + 1, 0, self._at_end)
    else:
      after = StreamState(self.block, self.index, self.at_block_start)
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)), after


# --------------------------------------------------------------------------------------
# Batches.

class StreamRows:
  """One stream's rows (and JSON state after each take) from ``state`` on, any number at
  a time, each take with its masking generator; ``state`` resumes exactly.

  The generator is seeded by the stream's count of takes, so a resumed run masks
  identically; a host batch joined from several streams' takes is masked in one call
  (``mask``), each take's rows as they would be alone.
  """

  def __init__(self, stream: ExampleStream, state: Optional[dict] = None):
    self.stream = stream
    if state is None:
      self._examples, self.count = stream.reader(), 0
    else:
      self._examples = stream.reader(StreamState.from_json(state['stream']))
      self.count = state['batches']

  def take(self, rows: int) -> Tuple[np.ndarray, np.random.Generator, dict]:
    """(ids [rows, seq_len], their masking generator, the state after them)."""
    ids, after = self._examples.take(rows)
    rng = np.random.default_rng([self.stream.seed, self.stream.process_index, 1 << 20,
                                 self.count])
    self.count += 1
    return ids, rng, {'stream': after.to_json(), 'batches': self.count}


def mask(masker, takes: Sequence[Tuple[np.ndarray, np.random.Generator]]
         ) -> Dict[str, np.ndarray]:
  """One masked batch of ``takes`` (ids, generator), joined in order."""
  ids = takes[0][0] if len(takes) == 1 else np.concatenate([t[0] for t in takes])
  return masker(ids, (ids != tokenizer_lib.PAD_ID).astype(np.int32),
                [(len(t[0]), t[1]) for t in takes])


def batches(stream: ExampleStream, batch_size: int, masker, state: Optional[dict] = None
            ) -> Iterator[Tuple[Dict[str, np.ndarray], dict]]:
  """Yields (masked batch of ``batch_size``, JSON state after it) forever."""
  rows = StreamRows(stream, state)
  while True:
    ids, rng, after = rows.take(batch_size)
    yield mask(masker, [(ids, rng)]), after


# --------------------------------------------------------------------------------------
# A host's streams.

@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One corpus: its name, files, mixing weight and JSON field / Parquet column."""
  name: str
  files: Tuple[str, ...]
  weight: float
  text_field: str = 'text'


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """One host share's ``streams`` streams, as plain data (sent to worker processes).

  Stream ``j`` of host ``host`` of ``hosts`` reads the share of reader
  ``host * streams + j`` of ``hosts * streams``: the streams of all hosts split the corpus
  as that many hosts would.
  """
  sources: Tuple[SourceSpec, ...]
  seq_len: int
  docs_per_example: int
  separator: str
  block_size: int
  seed: int
  batch_size: int
  masker: object
  host: int = 0
  hosts: int = 1
  streams: int = 1
  open_concatenations: int = 1024

  def stream(self, j: int) -> ExampleStream:
    reader, readers = self.host * self.streams + j, self.hosts * self.streams
    sources = [DocumentSource(s.name, s.files, seed=self.seed, process_index=reader,
                              process_count=readers, text_field=s.text_field,
                              cache_bytes=DocumentSource.CACHE_BYTES // self.streams)
               for s in self.sources]
    return ExampleStream(sources, [s.weight for s in self.sources], seq_len=self.seq_len,
                         docs_per_example=self.docs_per_example, separator=self.separator,
                         block_size=self.block_size,
                         open_concatenations=self.open_concatenations,
                         seed=self.seed,
                         process_index=reader)

  def rows(self, j: int, state: Optional[dict] = None) -> StreamRows:
    """Stream ``j``'s rows from ``state`` on (``batch_size`` is the share's host batch:
    ``schedule`` says how many rows of it each stream gives)."""
    return StreamRows(self.stream(j), state)


def fitting_streams(sources: Sequence[SourceSpec], hosts: int, streams: int
                    ) -> Tuple[int, Optional[str]]:
  """(stream count, why it is below ``streams`` or None): the largest count up to
  ``streams`` at which each of the ``hosts * count`` readers has records of every source.

  A source with fewer units (files, Parquet row groups) than readers is split record by
  record, reader ``r`` taking record ``r`` of each unit modulo the readers (see
  ``DocumentSource``); with fewer records than readers in its largest unit (one 2 kB
  document, one 300 MB one-line document), some readers would have nothing. Fewer
  streams keep each record in exactly one stream, so each byte is still trained on once
  per epoch, and the count is a function of the files: a resumed run gets the same one.
  Only units of a source with fewer units than readers are counted (up to ``hosts *
  streams`` records each: a cheap look, not a pass over the corpus).

  Raises:
    DataError: naming the source, when even one stream a host leaves a host nothing.
  """
  for source in sources:
    units = read_units(source.files, source.text_field)
    if len(units) >= hosts * streams:
      continue
    records = max(unit_records(unit, hosts * streams) for unit in units)
    fits = max(len(units), records) // hosts
    if fits < 1:
      raise DataError(f'source {source.name!r}: {records} record(s) in '
                      f'{len(source.files)} file(s) cannot give each of the {hosts} hosts '
                      f'(data.hosts or the run\'s hosts) a document of its own; give it at '
                      f'least {hosts} documents or files')
    if fits < streams:
      why = (f'source {source.name!r} has {records} record(s) in {len(source.files)} '
             f'file(s), fewer than the {hosts * streams} readers of {hosts} host(s) x '
             f'data.streams={streams}')
      count, lower = fitting_streams(sources, hosts, fits)
      return count, lower or why
  return streams, None


# How a host batch takes its rows from a share's streams. 'rows': stream by stream, as
# many rows of stream j as rows n*B .. n*B+B-1 of the share's data have index k with
# k % streams == j; so a batch of B holds B // streams or one more rows of each stream,
# each stream gives the same number of rows over time whatever B, and a batch's
# documents come from every stream's share of the corpus. 'batches': each whole batch
# from one stream, batch n from stream n % streams -- the layout of positions written
# before 'rows' existed (they hold no 'layout'), in which such runs resume.
LAYOUTS = ('rows', 'batches')


def stream_rows(batch: int, streams: int, n: int, layout: str = 'rows') -> List[int]:
  """How many rows of host batch ``n`` (of ``batch`` rows a share) each stream gives."""
  if layout == 'batches':
    return [batch if j == n % streams else 0 for j in range(streams)]
  first = n * batch   # rows [first, first + batch) of the share's data
  return [(first + batch - 1 - j) // streams - (first - 1 - j) // streams
          for j in range(streams)]


def schedule(specs: Sequence[StreamSpec], n: int, layout: str = 'rows'
             ) -> List[Tuple[int, int, int]]:
  """The (share, stream, rows) whose next rows, concatenated, make host batch ``n``."""
  return [(s, j, rows) for s, spec in enumerate(specs)
          for j, rows in enumerate(stream_rows(spec.batch_size, spec.streams, n, layout))
          if rows]


def start_positions(specs: Sequence[StreamSpec], position
                    ) -> Tuple[int, List[List], str]:
  """(next host batch, per share the per-stream states, layout) of a position (None: the
  start, in the 'rows' layout).

  A position is ``{'batches': n, 'streams': [state of each stream], 'layout': ...}`` for
  one share, a list of them for several (``data.hosts``).

  Raises:
    DataError: when the position was written with another number of streams or shares.
  """
  if position is None:
    return 0, [[None] * spec.streams for spec in specs], 'rows'
  positions = position if isinstance(position, list) else [position]
  if (len(positions) != len(specs) or any(
      not isinstance(p, dict) or 'streams' not in p or len(p['streams']) != spec.streams
      for p, spec in zip(positions, specs))):
    raise DataError(f'the checkpoint\'s data position does not fit {len(specs)} share(s) '
                    f'of {specs[0].streams} stream(s) (data.hosts, data.streams)')
  layout = positions[0].get('layout', 'batches')
  if layout not in LAYOUTS:
    raise DataError(f'the checkpoint\'s data position has layout {layout!r}; this '
                    f'version reads {", ".join(LAYOUTS)}')
  return positions[0]['batches'], [list(p['streams']) for p in positions], layout


def make_position(specs: Sequence[StreamSpec], n: int, states: List[List], layout: str):
  """The position after host batch ``n - 1`` (see ``start_positions``)."""
  positions = [{'batches': n, 'streams': list(s), 'layout': layout} for s in states]
  return positions[0] if len(specs) == 1 else positions


def interleave(specs: Sequence[StreamSpec], position=None
               ) -> Iterator[Tuple[Dict[str, np.ndarray], object]]:
  """Host batches of these shares' streams in this process: batch ``n`` concatenates, for
  each share, the next rows of its streams (``schedule``). Yields (batch, position)."""
  n, states, layout = start_positions(specs, position)
  readers = {}
  while True:
    takes = []
    for s, j, rows in schedule(specs, n, layout):
      if (s, j) not in readers:
        readers[s, j] = specs[s].rows(j, states[s][j])
      ids, rng, states[s][j] = readers[s, j].take(rows)
      takes.append((ids, rng))
    n += 1
    yield mask(specs[0].masker, takes), make_position(specs, n, states, layout)
