"""The pretraining input pipeline's examples, streams, worker processes and Parquet input."""

import collections
import gzip
import json
import os
import re
import signal
import time

import numpy as np
import pytest

from perceiver.model import tokenizer as tok_lib
from train import data
from train import masking
from train import workers

NUM_SPECIAL = tok_lib.NUM_SPECIAL


def _texts(n, prefix='doc'):
  rng = np.random.default_rng(len(prefix) + n)
  words = ['alpha', 'beta', 'gamma', 'delta', 'caf\u00e9', 'zeta']
  return [f'{prefix} {i}: ' + ' '.join(rng.choice(words, size=rng.integers(3, 40)))
          for i in range(n)]


def _jsonl_gz(path, texts):
  with gzip.open(path, 'wb') as f:
    f.write(''.join(json.dumps({'text': t, 'url': 'u'}) + '\n' for t in texts).encode())
  return str(path)


def _parquet(path, texts, row_group_size=None, column='text'):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  table = pa.table({'id': list(range(len(texts))), column: texts})
  pq.write_table(table, path, row_group_size=row_group_size)
  return str(path)


def _ids(text: bytes):
  return [b + NUM_SPECIAL for b in text]


@pytest.mark.parametrize('open_concatenations', [1, 3, 1024])
def test_every_crop_is_an_example_and_each_byte_is_used_once_per_epoch(
    tmp_path, open_concatenations):
  # Numbered words: every 16-byte crop holds a whole one, so no two crops are alike.
  texts = [f'doc {i}: ' + ' '.join(f'w{i}.{k}' for k in range(3 + 7 * i % 30))
           for i in range(12)]
  path = _jsonl_gz(tmp_path / 'c4-train.00000-of-00001.json.gz', texts)
  seq_len, docs = 16, 3
  source = data.DocumentSource('c4', [path], seed=0)
  stream = data.ExampleStream([source], [1.0], seq_len=seq_len, docs_per_example=docs,
                              block_size=8, open_concatenations=open_concatenations,
                              seed=0)
  # By hand: groups of 3 documents joined by SEP, cut every 16 ids, the last crop padded.
  crops = []   # per concatenation, its crops in order
  for g in range(0, 12, docs):
    joined = []
    for k, text in enumerate(texts[g:g + docs]):
      joined += ([tok_lib.SEP_ID] if k else []) + _ids(text.encode())
    crops.append([tuple(joined[i:i + seq_len] + [tok_lib.PAD_ID] * (
        seq_len - len(joined[i:i + seq_len]))) for i in range(0, len(joined), seq_len)])
  where = {crop: (c, i) for c, cs in enumerate(crops) for i, crop in enumerate(cs)}
  assert len(where) == sum(map(len, crops)) > 2 * len(crops)   # several crops each
  # Padding only in the last crop of each concatenation.
  assert sum(c[-1] == tok_lib.PAD_ID for cs in crops for c in cs) == len(crops)
  # Every example is one of those crops. Each concatenation's crops come in order, all
  # of them before any again (each byte once per epoch), and the concatenations are
  # opened in the file's order (one file: the same order every epoch).
  it = stream.examples()
  seen = [[] for _ in crops]
  for _ in range(5 * len(where)):
    c, i = where[tuple(next(it)[0].tolist())]
    seen[c].append(i)
  for c, indices in enumerate(seen):
    assert indices == [k % len(crops[c]) for k in range(len(indices))]
  opened = [-(-len(s) // len(crops[c])) for c, s in enumerate(seen)]
  assert opened == sorted(opened, reverse=True) and opened[0] - opened[-1] <= 1
  assert min(len(s) for s in seen) >= 2 * len(crops[0])


def _spec(files, streams=2, batch=4, host=0, hosts=1, seq_len=32, **kwargs):
  sources = tuple(data.SourceSpec(name, tuple(paths), weight)
                  for name, paths, weight in files)
  args = dict(seq_len=seq_len, docs_per_example=2, separator='sep', block_size=8, seed=3,
              batch_size=batch, masker=masking.WordMasker(0.15), host=host, hosts=hosts,
              streams=streams)
  args.update(kwargs)
  return data.StreamSpec(sources, **args)


def _two_sources(tmp_path):
  c4 = [_jsonl_gz(tmp_path / f'c4-{i}.json.gz', _texts(30, f'c4 shard {i}')) for i in range(4)]
  wiki = [_jsonl_gz(tmp_path / 'wiki.json.gz', _texts(40, 'wiki'))]
  return [('c4', c4, 0.7), ('wikipedia', wiki, 0.3)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for (x, px), (y, py) in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype, key
      np.testing.assert_array_equal(x[key], y[key])
    assert json.loads(json.dumps(px)) == json.loads(json.dumps(py))


def _stream_examples(spec, j, count):
  """Stream ``j``'s first ``count`` examples (ids), straight from its ExampleStream."""
  return next(spec.stream(j).chunks(count))[0]


def test_a_host_batch_takes_its_rows_from_every_stream_in_turn_and_resumes_exactly(tmp_path):
  """Batch n of 4 rows takes, stream by stream, as many next examples of stream j as
  rows 4n..4n+3 have k % 3 == j: batch 0 takes 2, 1, 1; batch 1 1, 2, 1; batch 2 1, 1, 2."""
  specs = [_spec(_two_sources(tmp_path), streams=3)]
  straight = _take(data.interleave(specs), 9)
  assert [p['batches'] for _, p in straight] == list(range(1, 10))
  assert {p['layout'] for _, p in straight} == {'rows'}
  rows = np.concatenate([b['labels'] for b, _ in straight])     # 36 rows
  counts = [[2, 1, 1], [1, 2, 1], [1, 1, 2]] * 3
  assert [data.stream_rows(4, 3, n) for n in range(9)] == counts
  owner = [j for c in counts for j, rows in enumerate(c) for _ in range(rows)]
  for j in range(3):
    mine = [k for k in range(36) if owner[k] == j]
    assert len(mine) == 12
    # labels hold every original id (PAD where padded): the examples themselves
    np.testing.assert_array_equal(rows[mine], _stream_examples(specs[0], j, 12))
  for cut in (1, 4, 7):
    position = json.loads(json.dumps(straight[cut - 1][1]))
    _assert_same(_take(data.interleave(specs, position), 9 - cut), straight[cut:])


def test_a_position_written_before_rows_were_spread_resumes_one_stream_a_batch(tmp_path):
  """A position without 'layout' (earlier runs) keeps their layout: host batch n is the
  next whole batch of stream n % 3."""
  specs = [_spec(_two_sources(tmp_path), streams=3)]
  old_start = {'batches': 0, 'streams': [None, None, None]}
  straight = _take(data.interleave(specs, old_start), 6)
  assert {p['layout'] for _, p in straight} == {'batches'}
  assert [s['batches'] for s in straight[4][1]['streams']] == [2, 2, 1]
  for j in range(3):
    expected = _stream_examples(specs[0], j, 8)
    got = np.concatenate([straight[n][0]['labels'] for n in (j, j + 3)])
    np.testing.assert_array_equal(got, expected)
  position = json.loads(json.dumps(straight[3][1]))
  _assert_same(_take(data.interleave(specs, position), 2), straight[4:])
  with pytest.raises(data.DataError, match="layout 'columns'"):
    data.start_positions(specs, dict(old_start, layout='columns'))


@pytest.mark.slow
def test_workers_give_the_in_process_batches_and_resume_exactly(tmp_path):
  """Worker processes (spawned: a few seconds) compute the same batches at 1 and 2
  workers as in-process, for two shares (data.hosts) of three streams each."""
  files = _two_sources(tmp_path)
  specs = [_spec(files, streams=3, batch=2, host=h, hosts=2) for h in range(2)]
  straight = _take(data.interleave(specs), 8)
  for count in (1, 2):
    pool = workers.WorkerPool(specs, count)
    try:
      _assert_same(_take(pool, 8), straight)
    finally:
      pool.close()
  pool = workers.WorkerPool(specs, 2, position=json.loads(json.dumps(straight[4][1])))
  try:
    _assert_same(_take(pool, 3), straight[5:])
  finally:
    pool.close()
  assert all(not os.path.exists(f'/proc/{pid}') or _zombie(pid) for pid in pool.pids())


def _zombie(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
  except OSError:
    return True


def _assert_all_end(pids, within_s):
  """Every process of ``pids`` has ended (or is a zombie awaiting its parent) within
  ``within_s`` seconds."""
  deadline = time.time() + within_s
  while time.time() < deadline and not all(_zombie(p) for p in pids):
    time.sleep(0.1)
  assert all(_zombie(p) for p in pids)


@pytest.mark.slow
def test_a_killed_worker_stops_the_pipeline_with_one_error(tmp_path):
  specs = [_spec(_two_sources(tmp_path), streams=2)]
  pool = workers.WorkerPool(specs, 2)
  try:
    next(pool)
    os.kill(pool.pids()[1], signal.SIGKILL)
    start = time.time()
    # Batches it had already written to its pipe still arrive, then the error.
    with pytest.raises(workers.DataWorkerError,
                       match=r'data worker 1 of 2 \(pid \d+\) was killed by SIGKILL'):
      _take(pool, 100_000)
    assert time.time() - start < 30    # an error, not a hang
  finally:
    pool.close()


@pytest.mark.slow
def test_a_worker_error_is_raised_with_its_message(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"text": "fine words here"}\n{"url": "no text"}\n')
  pool = workers.WorkerPool([_spec([('c4', [str(bad)], 1.0)], streams=1)], 1)
  try:
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: JSON line has no 'text' field"):
      next(pool)
  finally:
    pool.close()


def test_parquet_and_json_gz_of_the_same_documents_give_the_same_batches(tmp_path):
  texts = _texts(60, 'wiki') + ['', '   '] + _texts(5, 'tail')   # empty ones are skipped
  gz = _jsonl_gz(tmp_path / 'wiki.json.gz', texts)
  pq_path = _parquet(tmp_path / 'wiki.parquet', texts)
  assert list(data.read_documents(pq_path)) == list(data.read_documents(gz))
  from_gz = _take(data.interleave([_spec([('wikipedia', [gz], 1.0)], streams=1)]), 6)
  from_pq = _take(data.interleave([_spec([('wikipedia', [pq_path], 1.0)], streams=1)]), 6)
  _assert_same(from_gz, from_pq)


def test_parquet_row_groups_are_shared_out_across_readers(tmp_path):
  texts = _texts(40, 'row')
  path = _parquet(tmp_path / 'train-00000-of-00001.parquet', texts, row_group_size=10)
  assert data.parquet_row_groups(path) == 4
  seen = []
  for reader in range(2):
    source = data.DocumentSource('wikipedia', [path], seed=0, process_index=reader,
                                 process_count=2)
    assert len(source.units) == 2    # whole row groups per reader
    docs = source.documents(data.SourceState())
    seen.append([next(docs)[0] for _ in range(20)])
  assert sorted(seen[0] + seen[1]) == sorted(t.encode() for t in texts)
  # More readers than row groups: every P-th row of each group.
  source = data.DocumentSource('wikipedia', [path], seed=0, process_index=1,
                               process_count=8)
  assert len(source.units) == 4
  docs = source.documents(data.SourceState())
  got = sorted(next(docs)[0] for _ in range(8))
  want = sorted(texts[g * 10 + i].encode() for g in range(4) for i in range(1, 10, 8))
  assert got == want


def test_bad_parquet_files_are_named(tmp_path):
  broken = tmp_path / 'broken.parquet'
  broken.write_bytes(b'PAR1 this is not parquet')
  with pytest.raises(data.DataError, match=r'broken.parquet: not a readable Parquet file'):
    data.DocumentSource('wikipedia', [str(broken)], seed=0)
  other = _parquet(tmp_path / 'other.parquet', ['a b c'], column='body')
  with pytest.raises(data.DataError, match=r"other.parquet: Parquet file has no 'text' "
                     r'column \(columns: id, body\)'):
    data.DocumentSource('wikipedia', [other], seed=0)
  assert list(data.read_documents(other, 'body')) == [b'a b c']


def _children(pid):
  found = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
            found.append(int(entry))
      except (OSError, ValueError, IndexError):
        continue
  return found


@pytest.mark.slow
def test_kill_9_mid_run_with_workers_then_resume_equals_a_straight_run(tmp_path):
  """Training with 2 data workers, killed with SIGKILL after a checkpoint, resumed to
  step S + 2: the same parameters as a straight run to S + 2 with the input in-process."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from perceiver.params import loading  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(__file__).resolve().parents[1]
  corpus = tmp_path / 'corpus.jsonl'
  corpus.write_text(''.join(json.dumps({'text': t}) + '\n' for t in _texts(300, 'doc')))
  common = [f'--config.data.sources.stdlib.paths={corpus}', f'--config.data.eval_paths={corpus}',
            '--config.train.eval_every=0', '--config.train.checkpoint_every=2',
            '--config.train.batch_size=4', '--config.train.log_every=1',
            '--config.data.streams=2']

  def command(workdir, steps, workers):
    return [sys.executable, '-m', 'train.mlm', f'--workdir={workdir}', *common,
            f'--config.train.steps={steps}', f'--config.data.workers={workers}']

  killed = tmp_path / 'killed'
  proc = subprocess.Popen(command(killed, 100_000, 2), cwd=root, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not list(killed.glob('ckpt_000000004')):
    assert proc.poll() is None
    time.sleep(0.1)
  data_workers = _children(proc.pid)
  assert len(data_workers) >= 2
  proc.kill()
  proc.wait()
  # The workers end by themselves once the training process has gone.
  _assert_all_end(data_workers, 60)
  saved = max(int(p.name[5:14]) for p in killed.glob('ckpt_*[0-9]'))
  end = saved + 2
  for workdir, workers_count in ((killed, 1), (tmp_path / 'straight', 0)):
    done = subprocess.run(command(workdir, end, workers_count), cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
  a = loading.load_any(killed / f'ckpt_{end:09d}')[0]
  b = loading.load_any(tmp_path / 'straight' / f'ckpt_{end:09d}')[0]
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.mark.slow
def test_closing_the_prefetcher_ends_the_workers_and_waits_are_counted(tmp_path):
  from perceiver.training import feed  # pylint: disable=import-outside-toplevel
  pool = workers.WorkerPool([_spec(_two_sources(tmp_path), streams=2)], 2)
  prefetcher = feed.Prefetcher(pool, depth=2)
  next(prefetcher)      # waits at least for the workers to start and build a block
  assert prefetcher.waited_s > 0
  prefetcher.close()
  _assert_all_end(pool.pids(), 30)


def test_the_data_suite_computes_the_devices_need_from_the_flops():
  from bench import data_rate  # pylint: disable=import-outside-toplevel
  # The figures: a train step of the released model is 3 x 120.9 GFLOP per
  # 2,048-byte sequence; 45% of an H100's 989 TFLOP/s is about 1,230 sequences/s.
  one, eight = data_rate.device_need(1), data_rate.device_need(8)
  assert one['train_flops_per_sequence'] == pytest.approx(3 * 120.9e9, rel=1e-3)
  assert one['sequences_per_s'] == pytest.approx(0.45 * 989e12 / (3 * 120.9e9), rel=1e-3)
  assert eight['sequences_per_s'] == pytest.approx(8 * one['sequences_per_s'])
  assert one['bytes_per_s'] == pytest.approx(2048 * one['sequences_per_s'])


def _long_documents(tmp_path, n, sizes=(1000, 8000)):
  """``n`` documents of ``sizes`` bytes, document i's text '[iiii]' repeated: any
  32-byte crop names its document."""
  rng = np.random.default_rng(n)
  texts = [(f'[{i:04d}]' * 1400)[:int(rng.integers(*sizes))] for i in range(n)]
  return _jsonl_gz(tmp_path / f'long{n}.json.gz', texts)


def _documents_per_row(batch):
  rows = np.clip(batch['labels'] - NUM_SPECIAL, 0, 255).astype(np.uint8)
  return [set(re.findall(rb'\[(\d{4})\]', row.tobytes())) for row in rows]


@pytest.mark.parametrize('open_concatenations', [64, 1])
def test_a_batch_holds_at_most_two_crops_of_one_long_document(
    tmp_path, open_concatenations):
  """The guarantee of data.open_concatenations (train/configs/mlm.py): with B <= open
  concatenations, at most 2 crops of one concatenation in a batch of B. With one open
  (the pipeline before), consecutive crops of a document fill whole batches."""
  files = [('long', [_long_documents(tmp_path, 300)], 1.0)]
  spec = _spec(files, streams=1, batch=32, docs_per_example=1,
               open_concatenations=open_concatenations)
  worst = 0
  for batch, _ in _take(data.interleave([spec]), 60):
    counts = collections.Counter(d for docs in _documents_per_row(batch) for d in docs)
    worst = max(worst, max(counts.values()))
  if open_concatenations == 1:
    assert worst == 32
  else:
    assert worst <= 2


def test_a_small_share_ending_its_epoch_fills_only_its_own_rows_of_a_batch(tmp_path):
  """16 long documents over 4 streams (4 each, 64 open slots): each stream's epoch ends
  on its longest document, whose last crops are all it has left. A batch of 16 takes 4
  rows of each stream, so one document never has more than 4 of them, and documents
  from all four streams are in every batch (one stream a batch, as before, filled whole
  batches with one document)."""
  files = [('long', [_long_documents(tmp_path, 16, (500, 9000))], 1.0)]
  spec = _spec(files, streams=4, batch=16, docs_per_example=1, open_concatenations=64)
  owner = {}   # document -> the stream whose share holds it
  for j in range(4):
    for ids in next(spec.stream(j).chunks(400))[0]:
      for d in set(re.findall(rb'\[(\d{4})\]', np.clip(ids - NUM_SPECIAL, 0, 255)
                                .astype(np.uint8).tobytes())):
        owner[d] = j
  assert len(owner) == 16
  worst, one_document_rows = 0, 0
  for batch, _ in _take(data.interleave([spec]), 150):   # several epochs of each share
    rows = _documents_per_row(batch)
    counts = collections.Counter(d for docs in rows for d in docs)
    worst = max(worst, max(counts.values()))
    assert {owner[d] for docs in rows for d in docs} == {0, 1, 2, 3}
    one_document_rows += sum(len(docs) == 1 for docs in rows)
  assert worst == 4 and one_document_rows > 1000   # the bound is reached, not passed


def test_interleaved_crops_resume_exactly_across_refills_and_epochs(tmp_path):
  """Few open concatenations, long documents and a small share: slots are refilled and
  epochs end many times within the run; every cut resumes to the straight run."""
  files = [('long', [_long_documents(tmp_path, 12, (100, 800))], 0.6),
           ('short', [_jsonl_gz(tmp_path / 'short.json.gz', _texts(20))], 0.4)]
  spec = _spec(files, streams=2, batch=8, docs_per_example=2, open_concatenations=5,
               block_size=16)
  straight = _take(data.interleave([spec]), 120)
  for cut in (1, 37, 83):
    position = json.loads(json.dumps(straight[cut - 1][1]))
    _assert_same(_take(data.interleave([spec], position), 120 - cut), straight[cut:])


def test_the_mixing_measure_names_each_crops_document():
  """bench.mixing: a tagged document's every 64-byte crop names it, whatever the offset,
  and a batch's documents and largest share are counted from the rows."""
  from bench import data_rate, mixing   # pylint: disable=import-outside-toplevel
  texts = {n: mixing.tag(n, 300) for n in (0, 7, 4095, 64 ** 3 - 1)}
  assert all(len(t) == 300 for t in texts.values())
  rows = []
  for n, text in texts.items():
    for start in (0, 1, 2, 3, 200):
      rows.append(np.array(_ids(text[start:start + 64].encode())))
      assert mixing.documents_of(rows[-1]) == {n}
  # A row across two documents (SEP between) names both.
  both = np.array(_ids(texts[7][:30].encode()) + [tok_lib.SEP_ID] +
                  _ids(texts[0][:33].encode()))
  assert mixing.documents_of(both) == {7, 0}
  stats = mixing.batch_mixing(rows[:5] + rows[5:7] + [both])
  assert stats == {'documents': 2, 'max_share': 6 / 8}
  table = data_rate.render_mixing([{'preset': 'smoke', 'batch': 32, 'seq_len': 64,
                                    'batches': 10, 'documents_mean': 17.1,
                                    'documents_min': 9, 'max_share_mean': 0.19,
                                    'max_share_max': 0.47}])
  assert '17.1 (9)' in table and '0.190 (0.470)' in table


def test_a_stopped_worker_is_named_with_its_pid_after_the_bound_on_one_wait(tmp_path):
  """A worker stopped without dying (SIGSTOP, as a hung network read) used to be waited on
  forever; the bound on one wait names it, and closing the pool still ends it."""
  from perceiver.training import distributed  # pylint: disable=import-outside-toplevel
  from perceiver.training import feed  # pylint: disable=import-outside-toplevel
  pool = workers.WorkerPool([_spec(_two_sources(tmp_path), streams=2)], 2)
  prefetcher = feed.Prefetcher(pool, depth=1)
  stopped = pool.pids()[1]
  notes = []
  try:
    os.kill(stopped, signal.SIGSTOP)
    stop = distributed.StopAgreement(note=notes.append)
    started = time.monotonic()
    with pytest.raises(distributed.DataStalledError) as raised:
      for step in range(100):   # worker 0's batches (and those already sent) still come
        stop.next_batch(prefetcher, step, timeout_s=3.0, poll_s=0.2, report_every_s=1.0)
    assert time.monotonic() - started < 25
    message = str(raised.value)
    assert f'data worker 1 of 2 (pid {stopped}, alive' in message
    assert 'data.batch_timeout_s' in message and 'within 3 s' in message
    assert any(f'on data worker 1 of 2 (pid {stopped}' in note for note in notes)
  finally:
    prefetcher.close()
  _assert_all_end(pool.pids(), 20)


def test_the_bound_on_one_wait_names_the_reading_thread_without_workers():
  from perceiver.training import distributed  # pylint: disable=import-outside-toplevel
  from perceiver.training import feed  # pylint: disable=import-outside-toplevel

  def stuck():
    yield 1
    time.sleep(60)    # a read that never returns
    yield 2

  prefetcher = feed.Prefetcher(stuck(), depth=1)
  stop = distributed.StopAgreement()
  assert stop.next_batch(prefetcher, 0, timeout_s=1.0) == 1
  with pytest.raises(distributed.DataStalledError,
                     match=rf"no data for step 2 within 1 s .* waiting on the data-reading "
                           rf"thread 'data-prefetch' of process {os.getpid()}"):
    stop.next_batch(prefetcher, 1, timeout_s=1.0, poll_s=0.2)
  prefetcher.close()
