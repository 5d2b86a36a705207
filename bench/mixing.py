"""How well a preset's training batches mix documents: documents per batch, and the
largest share of one batch that comes from one document.

A batch's rows do not say which document they came from, so the preset's corpora are
copied with each document's text replaced by a tag of its number ("#" and three base-64
digits, repeated) of the same length: the same documents, files, lengths and reading
order, so the pipeline cuts and orders the copy exactly as it would the original, and
every crop names its document. The preset's own batches (``train.inputs.train_batches``)
of the copy are then counted: the first 1,000 by default, past the end of the first epoch
of a small stream share (where documents' last crops come), not only its start. The
data suite (``python -m bench.run --suite=data``, ``bench.data_rate``) reports it.

Only ``train.inputs.train_batches``, ``train.data.read_documents`` and the presets are
used, so an older checkout measures itself the same way:

    PYTHONPATH=/path/to/checkout python /path/to/bench/mixing.py smoke cpu
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from typing import Dict, List, Sequence

import numpy as np

from train import corpus
from train import data as data_lib
from train import inputs
from train.configs import mlm as mlm_configs

_DIGITS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
_TAG = re.compile(rb'#([A-Za-z0-9+/]{3})')
NUM_SPECIAL = 6   # perceiver.tokenizer: byte b is id b + 6


def tag(number: int, length: int) -> str:
  """Document ``number``'s stand-in text of ``length`` bytes: '#xyz' repeated."""
  cell = '#' + ''.join(_DIGITS[(number >> s) & 63] for s in (12, 6, 0))
  return (cell * (length // 4 + 1))[:length]


def untag(digits: bytes) -> int:
  a, b, c = (_DIGITS.index(chr(d)) for d in digits)
  return (a << 12) | (b << 6) | c


def tagged_sources(config, workdir: str) -> Dict[str, dict]:
  """The config's sources, each file copied (as JSON lines) with tagged documents."""
  out, number = {}, 0
  for name, spec in sorted(config.data.sources.items()):
    paths, _ = corpus.resolve(spec['paths'], os.path.join(workdir, 'data'))
    copies = []
    for i, path in enumerate(data_lib.expand_paths(paths, name)):
      copy = os.path.join(workdir, f'{name}.{i}.jsonl')
      with open(copy, 'w') as f:
        for doc in data_lib.read_documents(path, spec.get('text_field', 'text')):
          f.write(json.dumps({'text': tag(number, len(doc))}) + '\n')
          number += 1
      copies.append(copy)
    out[name] = {'paths': ','.join(copies), 'weight': spec['weight'], 'text_field': 'text'}
  if number > 64 ** 3:
    raise ValueError(f'{number} documents: more than the tags number')
  return out


def documents_of(row: np.ndarray) -> set:
  """The document numbers a row of ids (unmasked: the batch's ``labels``) holds."""
  data = (np.clip(row - NUM_SPECIAL, 0, 255)).astype(np.uint8).tobytes()
  return {untag(m) for m in _TAG.findall(data)}


def batch_mixing(rows: Sequence[np.ndarray]) -> Dict[str, float]:
  """Documents in one batch, and the largest fraction of its rows holding one."""
  counts: Dict[int, int] = {}
  for row in rows:
    for doc in documents_of(row):
      counts[doc] = counts.get(doc, 0) + 1
  return {'documents': len(counts), 'max_share': max(counts.values()) / len(rows)}


def measure(preset: str, batches: int = 1000) -> Dict[str, float]:
  """The first ``batches`` training batches of ``preset`` (its host batch, one host)."""
  config = mlm_configs.get_config(preset)
  host_batch = config.train.batch_size
  with tempfile.TemporaryDirectory() as workdir:
    sources = tagged_sources(config, workdir)
    config.unlock()
    config.data.sources = sources
    config.data.workers = 0
    config.lock()
    it = inputs.train_batches(config, workdir, host_batch)
    stats = [batch_mixing(next(it)[0]['labels']) for _ in range(batches)]
    if hasattr(it, 'close'):
      it.close()
  docs = np.array([s['documents'] for s in stats])
  share = np.array([s['max_share'] for s in stats])
  return {'preset': preset, 'batch': host_batch, 'seq_len': config.model.max_seq_len,
          'batches': batches, 'documents_mean': float(docs.mean()),
          'documents_min': int(docs.min()), 'max_share_mean': float(share.mean()),
          'max_share_max': float(share.max())}


def main(argv: List[str]) -> None:
  for preset in argv or ['smoke', 'cpu']:
    print(json.dumps(measure(preset)), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
