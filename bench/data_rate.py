"""Throughput of the pretraining data pipeline, and what an accelerator host needs.

Two entry points:

- ``measure``: masked batches per second of ``train.inputs.train_batches`` on the built-in
  corpus (the Python standard library's docstrings, no download), the ``full`` and
  ``smoke`` suites' data row.
- ``suite`` (``python -m bench.run --suite=data``): sequences/s and MB/s of the ``paper``
  preset's data settings (2,048 bytes, 10 documents per concatenation, whole-word
  masking) on real-format shards, at 1 and 2 worker processes, beside the need of 1 and 8
  H100-class devices at 45% MFU (``perceiver.model.flops``), and where the time of one
  sequence goes, stage by stage, and how well the presets' batches mix documents
  (``bench.mixing``: documents per batch, the largest share of one). The shards:
  ``../shared``'s C4 ``json.gz`` and Wikipedia ``jsonl`` samples (small: a reader's cache
  holds them after one pass), ~200 MB of C4 text generated from that sample as 8
  ``json.gz`` shards in the released layout, and the Wikipedia sample repeated into a
  ~160 MB Parquet file of 32 row groups (both beyond the cache, so parsing is measured).
  The generated files go to a temporary directory, made once and reused
  (``default_cache_dir``).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from bench import mixing
from train import inputs
from train import workers as workers_lib
from train.configs import mlm as mlm_configs

BUILTIN = 'builtin:stdlib_docstrings/train'
SHARED_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           '..', 'shared', 'data', 'text')
C4_SAMPLE = 'c4/c4-train.00000-of-01024.first1000.json.gz'
WIKI_SAMPLE = 'wikipedia/train.jsonl'
H100_PEAK = 989e12         # dense bf16 FLOP/s of one H100 SXM (NVIDIA's datasheet)
MFU = 0.45
MIXING_PRESETS = ('smoke', 'cpu', 'small')


def pipeline_config(model_config, block_size: Optional[int] = None, sources=None,
                    workers: int = 0, streams: Optional[int] = None):
  """The pretraining data settings (``paper`` preset) over ``sources`` (default: the
  built-in corpus)."""
  config = mlm_configs.get_config('paper')
  config.unlock()
  if model_config is not None:
    config.model = model_config
  config.data.sources = sources or {'stdlib': {'paths': BUILTIN, 'weight': 1.0,
                                               'text_field': 'text'}}
  if block_size:
    config.data.block_size = block_size
  config.data.workers = workers
  if streams:
    config.data.streams = streams
  config.lock()
  return config


def _cpu_seconds(pids) -> float:
  """User + system CPU seconds of these processes so far (Linux /proc; 0 elsewhere)."""
  total = 0.0
  for pid in pids:
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError):
      pass
  return total


def _rate(config, batch: int, min_seconds: float, workdir: str) -> Dict[str, float]:
  """The rate of ``train_batches``, and the CPU time per sequence of this process and of
  the workers: on a machine shared with other work the wall-clock rate depends on the
  load, the CPU time much less."""
  start = time.perf_counter()
  batches = inputs.train_batches(config, workdir, batch)
  try:
    next(batches)   # start-up (workers, corpus extraction) and the first blocks
    startup = time.perf_counter() - start
    pids = batches.pids() if isinstance(batches, workers_lib.WorkerPool) else []
    count, start = 0, time.perf_counter()
    cpu_main, cpu_workers = time.process_time(), _cpu_seconds(pids)
    # At least two shuffle blocks of every stream, so the block builds are in the rate.
    blocks = 2 * config.data.block_size * max(1, config.data.streams)
    while count * batch < blocks or time.perf_counter() - start < min_seconds:
      next(batches)
      count += 1
    elapsed = time.perf_counter() - start
    cpu_main = time.process_time() - cpu_main
    cpu_workers = _cpu_seconds(pids) - cpu_workers
  finally:
    workers_lib.close(batches)
  seq_len = config.model.max_seq_len
  sequences = count * batch
  return {'batch': batch, 'seq_len': seq_len, 'batches': count, 'seconds': elapsed,
          'startup_s': startup, 'batches_per_s': count / elapsed,
          'sequences_per_s': sequences / elapsed,
          'bytes_per_s': sequences * seq_len / elapsed,
          'main_cpu_us_per_sequence': 1e6 * cpu_main / sequences,
          'worker_cpu_us_per_sequence': 1e6 * cpu_workers / sequences if pids else None}


def measure(model_config, batch: int, *, min_seconds: float = 3.0,
            block_size: Optional[int] = None, cache_dir: Optional[str] = None
            ) -> Dict[str, float]:
  """Masked batches per second, and bytes per second, of ``batch`` sequences, in the
  training process (``data.workers=0``) on the built-in corpus."""
  config = pipeline_config(model_config, block_size)
  with tempfile.TemporaryDirectory() as tmp:
    out = _rate(config, batch, min_seconds, cache_dir or tmp)
  out.update(block_size=config.data.block_size, corpus=BUILTIN,
             masking=f'whole words, p={config.masking.mask_prob}')
  return out


def default_cache_dir() -> str:
  """Where the built-in corpus and the generated shards are written once (reused)."""
  return os.path.join(tempfile.gettempdir(), 'perceiver_bench_corpus')


# ------------------------------------------------------------------------------------------
# Generated shards in the released layouts.

def _sample_lines(path: str) -> List[bytes]:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    return [line if line.endswith(b'\n') else line + b'\n' for line in f if line.strip()]


def c4_shards(out_dir: str, sample: str, text_bytes: int = 200 << 20, shards: int = 8
              ) -> List[str]:
  """~``text_bytes`` of C4 text as ``shards`` gzipped JSON-lines files named as released
  (the sample's records repeated); written once."""
  paths = [os.path.join(out_dir, f'c4-train.{i:05d}-of-{shards:05d}.json.gz')
           for i in range(shards)]
  if all(os.path.exists(p) for p in paths):
    return paths
  os.makedirs(out_dir, exist_ok=True)
  lines = _sample_lines(sample)
  per_pass = sum(len(json.loads(line)['text'].encode()) for line in lines)
  passes = max(1, round(text_bytes / per_pass / shards))
  for path in paths:
    tmp = path + '.tmp'
    with gzip.open(tmp, 'wb', compresslevel=6) as f:
      for _ in range(passes):
        f.writelines(lines)
    os.replace(tmp, path)
  return paths


def wikipedia_parquet(out_dir: str, sample: str, text_bytes: int = 160 << 20,
                      row_groups: int = 32) -> str:
  """~``text_bytes`` of Wikipedia text as one Parquet file of ``row_groups`` row groups,
  with ``wikimedia/wikipedia``'s columns (id, url, title, text); written once."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  path = os.path.join(out_dir, 'wikipedia-20231101.en-train-00000-of-00001.parquet')
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  records = [json.loads(line) for line in _sample_lines(sample)]
  per_pass = sum(len(r['text'].encode()) for r in records)
  records = records * max(1, round(text_bytes / per_pass))
  table = pa.table({'id': [str(i) for i in range(len(records))],
                    'url': [f'https://en.wikipedia.org/wiki?curid={i}'
                            for i in range(len(records))],
                    'title': [r.get('title', '') for r in records],
                    'text': [r['text'] for r in records]})
  pq.write_table(table, path + '.tmp', row_group_size=-(-len(records) // row_groups))
  os.replace(path + '.tmp', path)
  return path


def _size(paths) -> int:
  return sum(os.path.getsize(p) for p in paths)


# ------------------------------------------------------------------------------------------
# What the devices need, and where the time goes.

def device_need(devices: int, seq_len: int = 2048) -> Dict[str, float]:
  """Sequences/s that ``devices`` H100-class devices consume training the released model
  at ``MFU`` of ``H100_PEAK`` (FLOPs from ``perceiver.model.flops``)."""
  from perceiver import configs  # pylint: disable=import-outside-toplevel
  from perceiver.model import flops  # pylint: disable=import-outside-toplevel
  per_sequence = flops.masked_lm_train_step(configs.language_mlm(), seq_len, 1)
  rate = devices * MFU * H100_PEAK / per_sequence
  return {'devices': devices, 'train_flops_per_sequence': per_sequence,
          'sequences_per_s': rate, 'bytes_per_s': rate * seq_len}


def stages(path: str, docs: int = 4000, seq_len: int = 2048, docs_per_example: int = 10,
           batch: int = 64) -> Dict[str, object]:
  """CPU microseconds per 2,048-byte sequence of each stage, on the first ``docs``
  documents of one C4 ``json.gz`` shard, in one process: before (one crop per 10
  documents) and after (every crop of the 10-document concatenation an example)."""
  from perceiver.model import tokenizer  # pylint: disable=import-outside-toplevel
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  from train import masking  # pylint: disable=import-outside-toplevel
  from train import workers  # pylint: disable=import-outside-toplevel
  clock = time.process_time
  t = clock()
  lines = []
  with gzip.open(path, 'rb') as f:
    for line in f:
      lines.append(line)
      if len(lines) == docs:
        break
  read_s = clock() - t
  t = clock()
  texts = [data_lib._json_text(line, path, i, 'text')  # pylint: disable=protected-access
           for i, line in enumerate(lines)]
  parse_s = clock() - t
  doc_bytes = sum(len(x) for x in texts)
  sep = np.asarray(data_lib.SEPARATORS['sep'], np.int32)
  t = clock()
  crops = []
  for g in range(0, len(texts) - docs_per_example + 1, docs_per_example):
    ids = data_lib.join_documents(texts[g:g + docs_per_example], sep)
    for start in range(0, len(ids), seq_len):
      row = np.zeros(seq_len, np.int32)
      piece = ids[start:start + seq_len]
      row[:len(piece)] = piece
      crops.append(row)
  crop_s = clock() - t
  concatenations = len(texts) // docs_per_example
  block = np.stack(crops)
  order = np.random.default_rng(0).permutation(len(block))
  t = clock()
  for i in range(0, len(block) - batch + 1, batch):
    np.stack([block[k] for k in order[i:i + batch]])
  shuffle_s = clock() - t
  masker = masking.WordMasker(0.15)
  rng = np.random.default_rng(0)
  t = clock()
  masked = [masker(block[i:i + batch], (block[i:i + batch] != tokenizer.PAD_ID).astype(
      np.int32), rng) for i in range(0, len(block) - batch + 1, batch)]
  mask_s = clock() - t
  # To the training process (narrowed, pickled, read back, widened): what a worker adds.
  t = clock()
  for b in masked:
    workers._widen([pickle.loads(pickle.dumps(  # pylint: disable=protected-access
        workers._narrow(b), protocol=5))])  # pylint: disable=protected-access
  pipe_s = clock() - t
  import jax  # pylint: disable=import-outside-toplevel
  t = clock()
  for b in masked:
    jax.block_until_ready(jax.device_put(b))
  device_s = clock() - t
  sequences = len(masked) * batch
  per_doc = lambda seconds: seconds / len(texts)
  per_seq = lambda seconds: seconds / sequences
  after_docs = len(texts) / len(crops)      # documents read per example, after
  before_docs = docs_per_example            # before: 10 documents per example
  rows = {'read and decompress': per_doc(read_s), 'JSON parsing': per_doc(parse_s)}
  out = {'documents': len(texts), 'document_bytes_mean': doc_bytes / len(texts),
         'crops_per_concatenation': len(crops) / max(concatenations, 1),
         'padding_fraction': float(np.mean(block == tokenizer.PAD_ID)),
         'stages_us_per_sequence': {}}
  for label, docs_per_seq in (('before', before_docs), ('after', after_docs)):
    row = {name: 1e6 * value * docs_per_seq for name, value in rows.items()}
    # Before, the 10 documents were joined and one crop taken: about the cost of a
    # concatenation; after, the concatenation's cost is shared by its crops.
    row['concatenation and cropping'] = 1e6 * crop_s / (
        concatenations if label == 'before' else len(crops))
    row['block shuffle and batching'] = 1e6 * per_seq(shuffle_s)
    row['whole-word masking'] = 1e6 * per_seq(mask_s)
    row['worker to training process'] = 1e6 * per_seq(pipe_s)
    row['transfer to the device'] = 1e6 * per_seq(device_s)
    out['stages_us_per_sequence'][label] = row
  return out


def suite(min_seconds: float = 10.0, batch: int = 64, workers=(0, 1, 2),
          cache_dir: Optional[str] = None, shared: str = SHARED_TEXT) -> Dict[str, object]:
  """The data suite (module docstring)."""
  shared = os.path.normpath(shared)
  cache_dir = cache_dir or default_cache_dir()
  results: Dict[str, object] = {'batch': batch, 'min_seconds': min_seconds,
                                'needs': [device_need(1), device_need(8)], 'rows': []}
  c4_sample = os.path.join(shared, C4_SAMPLE)
  wiki_sample = os.path.join(shared, WIKI_SAMPLE)
  if not (os.path.exists(c4_sample) and os.path.exists(wiki_sample)):
    results['skipped'] = f'{shared} has no C4 and Wikipedia samples'
    return results
  generated = os.path.join(cache_dir, 'data_suite')
  t = time.perf_counter()
  c4 = c4_shards(os.path.join(generated, 'c4'), c4_sample)
  wiki = wikipedia_parquet(os.path.join(generated, 'wikipedia'), wiki_sample)
  results['generation_s'] = time.perf_counter() - t
  spec = lambda paths, weight: {'paths': ','.join(paths), 'weight': weight,
                                'text_field': 'text'}
  corpora = [
      ('../shared samples: C4 json.gz 70% + Wikipedia jsonl 30%',
       {'c4': spec([c4_sample], 0.7), 'wikipedia': spec([wiki_sample], 0.3)},
       _size([c4_sample, wiki_sample])),
      (f'C4 json.gz, {len(c4)} generated shards', {'c4': spec(c4, 1.0)}, _size(c4)),
      ('Wikipedia Parquet, generated, 32 row groups', {'wikipedia': spec([wiki], 1.0)},
       _size([wiki])),
  ]
  for name, sources, size in corpora:
    for count in workers:
      config = pipeline_config(None, sources=sources, workers=count)
      with tempfile.TemporaryDirectory() as tmp:
        row = _rate(config, batch, min_seconds, tmp)
      row.update(corpus=name, workers=count, file_bytes=size,
                 loadavg=' '.join(f'{x:.2f}' for x in os.getloadavg()))
      results['rows'].append(row)
  results['stages'] = stages(c4[0])
  results['mixing'] = [mixing.measure(preset) for preset in MIXING_PRESETS]
  return results


def render(results: Dict) -> str:
  """The data suite's tables."""
  from bench import report  # pylint: disable=import-outside-toplevel
  parts = []
  if results.get('skipped'):
    parts.append(f'data suite skipped: {results["skipped"]}')
  cpu = lambda v: '-' if v is None else f'{v:,.0f}'
  body = [[r['corpus'], str(r['workers']), f'{r["sequences_per_s"]:,.0f}',
           f'{r["bytes_per_s"] / 1e6:,.1f}', cpu(r.get('worker_cpu_us_per_sequence')),
           cpu(r.get('main_cpu_us_per_sequence')), f'{r["startup_s"]:.1f}', r['loadavg']]
          for r in results['rows']]
  for need in results['needs']:
    body.append([f'need: {need["devices"]} H100-class device(s) at {MFU:.0%} MFU', '-',
                 f'{need["sequences_per_s"]:,.0f}', f'{need["bytes_per_s"] / 1e6:,.1f}',
                 '-', '-', '-', '-'])
  parts.append(report.table(['Data (paper settings, batch %d)' % results['batch'],
                             'workers', 'sequences/s', 'MB/s', 'workers CPU us/seq',
                             'trainer CPU us/seq', 'start-up s', 'load'], body))
  stages_ = results.get('stages')
  if stages_:
    names = list(stages_['stages_us_per_sequence']['before'])
    rows = [[n] + [f'{stages_["stages_us_per_sequence"][k][n]:,.0f}'
                   for k in ('before', 'after')] for n in names]
    rows.append(['total'] + [f'{sum(stages_["stages_us_per_sequence"][k].values()):,.0f}'
                             for k in ('before', 'after')])
    parts += ['', report.table(['CPU us per sequence, one process', 'one crop per 10 documents',
                                'every crop'], rows),
              f'({stages_["documents"]} C4 documents of {stages_["document_bytes_mean"]:,.0f} '
              f'bytes on average; {stages_["crops_per_concatenation"]:.1f} crops per '
              f'concatenation; {stages_["padding_fraction"]:.1%} padding)']
  if results.get('mixing'):
    parts += ['', render_mixing(results['mixing'])]
  return '\n'.join(parts)


def render_mixing(rows) -> str:
  """The mixing table: per preset, documents per batch and the largest share of one."""
  from bench import report  # pylint: disable=import-outside-toplevel
  body = [[r['preset'], f'{r["batch"]} x {r["seq_len"]}', str(r['batches']),
           f'{r["documents_mean"]:.1f} ({r["documents_min"]})',
           f'{r["max_share_mean"]:.3f} ({r["max_share_max"]:.3f})'] for r in rows]
  return report.table(['Mixing (first batches of each preset)', 'batch x bytes', 'batches',
                       'documents per batch: mean (min)',
                       'largest share of one document: mean (max)'], body)
