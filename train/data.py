"""The pretraining input pipeline: documents -> mixed, concatenated, cropped byte examples.

numpy only. Per host:

1. ``DocumentSource``: one corpus (globs of shards). Shards are visited in a seeded order
   that changes every epoch; this host reads its share (whole shards when there are at
   least as many shards as hosts, else every P-th document of each shard).
2. ``ExampleStream``: each example draws a source by the mixing weights, concatenates
   ``docs_per_example`` consecutive documents of it joined by ``separator``, and takes a
   random crop of ``seq_len`` ids (shorter concatenations are padded).
3. Shuffling: examples are built in blocks of ``shuffle_block`` and emitted in a seeded
   permutation of each block. Everything random is seeded by (seed, host, block), so the
   stream's position is a small JSON state -- the sources' positions at the block's start
   plus the index in the block -- and a resumed run sees exactly the examples it would
   have seen.

Formats, by file name: ``*.json.gz``/``*.jsonl.gz`` (C4 as released: gzipped JSON lines,
the ``text`` field), ``*.json``/``*.jsonl`` (JSON lines, e.g. a Wikipedia export), and
``*.txt`` (plain text; documents separated by blank lines, as in BERT's pretraining text
format). Bytes are kept as they are: invalid UTF-8 in a .txt file is trained on unchanged.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from perceiver import errors
from perceiver import tokenizer as tokenizer_lib

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
  name = path[:-3] if path.endswith('.gz') else path
  if name.endswith(('.json', '.jsonl')):
    return 'json'
  if name.endswith('.txt') or name.endswith('.raw'):
    return 'text'
  raise DataError(f'{path}: unknown format; expected .json[l][.gz] or .txt[.gz]/.raw')


def _json_text(line: bytes, path: str, line_no: int, field: str) -> bytes:
  # surrogateescape keeps raw invalid UTF-8 bytes through json.loads and back.
  try:
    record = json.loads(line.decode('utf-8', errors='surrogateescape'))
  except ValueError as e:
    raise DataError(f'{path}:{line_no}: not a JSON object: {e}') from None
  if not isinstance(record, dict) or field not in record:
    raise DataError(f'{path}:{line_no}: JSON line has no {field!r} field')
  text = record[field]
  if not isinstance(text, str):
    raise DataError(f'{path}:{line_no}: field {field!r} is {type(text).__name__}, not text')
  try:
    return text.encode('utf-8', errors='surrogateescape')
  except UnicodeEncodeError:  # lone surrogates written as \\ud83d escapes
    return text.encode('utf-8', errors='replace')


def read_documents(path: str, text_field: str = 'text') -> Iterator[bytes]:
  """Yields the non-empty documents of one file, as bytes.

  Raises:
    DataError: naming the file and line, for malformed JSON, a missing field, or a
      corrupt gzip stream.
  """
  fmt = _file_format(path)
  line_no = 0
  try:
    with _open_lines(path) as f:
      if fmt == 'json':
        for line_no, line in enumerate(f, 1):
          if line.strip():
            text = _json_text(line, path, line_no, text_field)
            if text.strip():
              yield text
      else:
        paragraph: List[bytes] = []
        for line_no, line in enumerate(f, 1):
          if line.strip():
            paragraph.append(line)
          elif paragraph:
            yield b''.join(paragraph).rstrip(b'\r\n')
            paragraph = []
        if paragraph:
          yield b''.join(paragraph).rstrip(b'\r\n')
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: unreadable after line {line_no}: {e}') from None


# --------------------------------------------------------------------------------------
# A corpus: globs of shards, this host's share, endless epochs.

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


@dataclasses.dataclass
class SourceState:
  """Position of a source: the next document is #doc of shard #shard of epoch #epoch."""
  epoch: int = 0
  shard: int = 0
  doc: int = 0


class DocumentSource:
  """Endless documents of one corpus, for one host, in a seeded per-epoch shard order."""

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
               process_count: int = 1, text_field: str = 'text'):
    self.name = name
    self.files = list(files)
    self.seed = seed
    self.text_field = text_field
    self.process_index, self.process_count = process_index, process_count
    self._cache: Dict[str, List[bytes]] = {}
    self._cached_bytes = 0
    if len(self.files) >= process_count:   # whole shards per host
      self.files = self.files[process_index::process_count]
      self.doc_stride, self.doc_offset = 1, 0
    else:                                  # every P-th document of every shard
      self.doc_stride, self.doc_offset = process_count, process_index

  def _read(self, path: str) -> Iterator[bytes]:
    """The documents of one shard; a shard read to its end is kept in memory while the
    source's cache holds less than ``CACHE_BYTES``, so that a small corpus (or one huge
    document) is not parsed again for every example that wraps around it."""
    cached = self._cache.get(path)
    if cached is not None:
      yield from cached
      return
    docs, size = [], 0
    for doc in self._pieces(read_documents(path, self.text_field)):
      yield doc
      if docs is not None:
        docs.append(doc)
        size += len(doc)
        if self._cached_bytes + size > self.CACHE_BYTES:
          docs = None
    if docs is not None:
      self._cache[path] = docs
      self._cached_bytes += size

  def _pieces(self, documents: Iterator[bytes]) -> Iterator[bytes]:
    """``documents``, each longer than ``LONG_DOCUMENT_BYTES`` cut into pieces."""
    for doc in documents:
      if len(doc) <= self.LONG_DOCUMENT_BYTES:
        yield doc
      else:
        for start in range(0, len(doc), self.PIECE_BYTES):
          yield doc[start:start + self.PIECE_BYTES]

  def _order(self, epoch: int) -> List[str]:
    rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), epoch])
    return [self.files[i] for i in rng.permutation(len(self.files))]

  def documents(self, state: SourceState) -> Iterator[Tuple[bytes, SourceState]]:
    """Yields (document, state after it) from ``state`` on, forever."""
    epoch, shard, skip = state.epoch, state.shard, state.doc
    while True:
      from_start, found = shard == 0 and skip == 0, False
      order = self._order(epoch)
      for shard in range(shard, len(order)):
        kept = 0
        for i, doc in enumerate(self._read(order[shard])):
          if i % self.doc_stride != self.doc_offset:
            continue
          kept += 1
          found = True
          if kept > skip:
            yield doc, SourceState(epoch, shard, kept)
        skip = 0
      if from_start and not found:
        raise DataError(f'source {self.name!r}: no documents for host {self.process_index} '
                        f'in {len(self.files)} file(s)')
      epoch, shard = epoch + 1, 0


# --------------------------------------------------------------------------------------
# Examples: mixing, concatenation, cropping, block shuffling.

@dataclasses.dataclass
class StreamState:
  """Where an ``ExampleStream`` is: block #block, example #index in it, and the sources'
  positions at the start of that block."""
  block: int = 0
  index: int = 0
  sources: Dict[str, SourceState] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return {'block': self.block, 'index': self.index,
            'sources': {k: dataclasses.asdict(v) for k, v in self.sources.items()}}

  @classmethod
  def from_json(cls, data: dict) -> 'StreamState':
    return cls(data['block'], data['index'],
               {k: SourceState(**v) for k, v in data['sources'].items()})


class ExampleStream:
  """Endless [seq_len] int32 examples (ids, mask) mixed from weighted sources."""

  def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float], *,
               seq_len: int, docs_per_example: int = 10, separator: str = 'sep',
               shuffle_block: int = 1024, seed: int = 0, process_index: int = 0):
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
    self.shuffle_block = shuffle_block
    self.seed = seed
    self.process_index = process_index

  def initial_state(self) -> StreamState:
    return StreamState(0, 0, {s.name: SourceState() for s in self.sources})

  def _build_block(self, block: int, iters, positions):
    """Builds block #``block``, advancing the sources' iterators and ``positions``."""
    rng = np.random.default_rng([self.seed, self.process_index, block])
    examples = np.zeros((self.shuffle_block, self.seq_len), np.int32)
    choices = rng.choice(len(self.sources), size=self.shuffle_block, p=self.probs)
    for row, choice in enumerate(choices):
      name = self.sources[choice].name
      parts = []
      for d in range(self.docs_per_example):
        doc, positions[name] = next(iters[name])
        if d:
          parts.append(self.separator)
        parts.append(doc)
      total = sum(len(part) for part in parts)
      start = 0
      if total > self.seq_len:
        start = rng.integers(0, total - self.seq_len + 1)
      examples[row, :min(total, self.seq_len)] = self._window(parts, start)
    return examples[rng.permutation(self.shuffle_block)]

  def _window(self, parts, start: int) -> np.ndarray:
    """Ids of the concatenation of ``parts`` (document bytes, separator ids) from
    ``start`` on, at most ``seq_len``: only the bytes inside the window are converted,
    so a long document costs its crop, not its length."""
    out, offset, end = [], 0, start + self.seq_len
    for part in parts:
      lo, hi = max(start - offset, 0), min(end - offset, len(part))
      if lo < hi:
        if isinstance(part, bytes):
          out.append(np.frombuffer(part[lo:hi], np.uint8).astype(np.int32) +
                     tokenizer_lib.NUM_SPECIAL)
        else:
          out.append(part[lo:hi])
      offset += len(part)
      if offset >= end:
        break
    return np.concatenate(out) if out else np.zeros(0, np.int32)

  def examples(self, state: Optional[StreamState] = None
               ) -> Iterator[Tuple[np.ndarray, StreamState]]:
    """Yields (ids [seq_len], state after this example) forever; PAD marks padding."""
    state = state or self.initial_state()
    iters = {s.name: s.documents(state.sources[s.name]) for s in self.sources}
    block, start, at_block_start = state.block, state.index, dict(state.sources)
    while True:
      positions = dict(at_block_start)
      examples = self._build_block(block, iters, positions)
      for index in range(start, self.shuffle_block):
        if index + 1 == self.shuffle_block:
          after = StreamState(block + 1, 0, dict(positions))
        else:
          after = StreamState(block, index + 1, at_block_start)
        yield examples[index], after
      block, start, at_block_start = block + 1, 0, positions


# --------------------------------------------------------------------------------------
# Batches.

def batches(stream: ExampleStream, batch_size: int, masker, state: Optional[dict] = None
            ) -> Iterator[Tuple[Dict[str, np.ndarray], dict]]:
  """Yields (masked batch, JSON state after it); ``state`` resumes exactly.

  The masking RNG is seeded by the batch's number, so a resumed run masks identically.
  """
  if state is None:
    stream_state, count = None, 0
  else:
    stream_state, count = StreamState.from_json(state['stream']), state['batches']
  examples = stream.examples(stream_state)
  while True:
    rows = []
    for _ in range(batch_size):
      ids, stream_state = next(examples)
      rows.append(ids)
    ids = np.stack(rows)
    rng = np.random.default_rng([stream.seed, stream.process_index, 1 << 20, count])
    batch = masker(ids, (ids != tokenizer_lib.PAD_ID).astype(np.int32), rng)
    count += 1
    yield batch, {'stream': stream_state.to_json(), 'batches': count}
