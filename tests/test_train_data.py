"""The pretraining input pipeline: readers, mixing, cropping, exact resume, masking."""

import gzip
import json

import numpy as np
import pytest

from perceiver.model import tokenizer as tok_lib
from train import corpus
from train import data
from train import masking
from tests import helpers

TOK = tok_lib.BytesTokenizer()
NUM_SPECIAL = tok_lib.NUM_SPECIAL


def _write_jsonl(path, texts, gz=False):
  lines = ''.join(json.dumps({'text': t, 'url': 'x'}) + '\n' for t in texts).encode()
  if gz:
    with gzip.open(path, 'wb') as f:
      f.write(lines)
  else:
    path.write_bytes(lines)
  return str(path)


def test_readers_for_c4_jsonl_and_text(tmp_path):
  c4 = _write_jsonl(tmp_path / 'c4-train.00000-of-01024.json.gz', ['first doc', 'second'],
                    gz=True)
  assert list(data.read_documents(c4)) == [b'first doc', b'second']
  wiki = _write_jsonl(tmp_path / 'wiki.jsonl', ['A caf\u00e9.', '', 'B'])
  assert list(data.read_documents(wiki)) == ['A caf\u00e9.'.encode(), b'B']
  txt = tmp_path / 'plain.txt'
  txt.write_bytes(b'para one\nline two\n\n\n\xff\xfe raw bytes\n')
  assert list(data.read_documents(str(txt))) == [b'para one\nline two', b'\xff\xfe raw bytes']


def test_real_c4_and_wikipedia_files_read_in_full():
  c4 = helpers.shared_path('data', 'text', 'c4', 'c4-train.00000-of-01024.first1000.json.gz')
  docs = list(data.read_documents(str(c4)))
  assert len(docs) == 1000
  head = helpers.shared_path('data', 'text', 'c4', 'c4-train.00000-of-01024.head5.json')
  expected = [json.loads(line)['text'].encode() for line in head.read_text().splitlines()]
  assert docs[:5] == expected
  wiki = helpers.shared_path('data', 'text', 'wikipedia', 'valid.jsonl')
  assert len(list(data.read_documents(str(wiki)))) == 500


def test_bad_input_names_file_and_line(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"text": "ok"}\n{"url": "no text"}\n')
  with pytest.raises(data.DataError, match=r"bad.jsonl:2: JSON line has no 'text' field"):
    list(data.read_documents(str(bad)))
  broken = tmp_path / 'broken.jsonl'
  broken.write_text('{"text": "ok"}\n{"text": \n')
  with pytest.raises(data.DataError, match=r'broken.jsonl:2: not a JSON object'):
    list(data.read_documents(str(broken)))
  corrupt = tmp_path / 'corrupt.json.gz'
  good = gzip.compress(b'{"text": "a"}\n' * 1000)
  corrupt.write_bytes(good[:len(good) // 2])
  with pytest.raises(data.DataError, match=r'corrupt.json.gz: unreadable after line'):
    list(data.read_documents(str(corrupt)))
  with pytest.raises(data.DataError, match=r"data.sources.c4.paths: no file matches"):
    data.expand_paths(str(tmp_path / 'missing-*.json.gz'), 'data.sources.c4.paths')
  with pytest.raises(data.DataError, match='unknown format'):
    list(data.read_documents(str(tmp_path / 'x.csv')))
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  source = data.DocumentSource('wiki', [str(empty)], seed=0)
  with pytest.raises(data.DataError, match="source 'wiki': no documents"):
    next(source.documents(data.SourceState()))


def test_invalid_utf8_in_json_keeps_its_bytes(tmp_path):
  path = tmp_path / 'raw.jsonl'
  path.write_bytes(b'{"text": "caf\xe9 \xff"}\n')   # latin-1 bytes, invalid UTF-8
  assert list(data.read_documents(str(path))) == [b'caf\xe9 \xff']


def _corpus(tmp_path, name, n, prefix):
  return _write_jsonl(tmp_path / f'{name}.jsonl',
                      [f'{prefix} document number {i} ' * 3 for i in range(n)])


def _stream(tmp_path, weights=(0.7, 0.3), **kwargs):
  a = data.DocumentSource('c4', [_corpus(tmp_path, 'a', 50, 'AAA')], seed=1)
  b = data.DocumentSource('wiki', [_corpus(tmp_path, 'b', 40, 'BBB')], seed=1)
  args = dict(seq_len=64, docs_per_example=3, block_size=16, seed=5)
  args.update(kwargs)
  return data.ExampleStream([a, b], list(weights), **args)


def test_examples_mix_sources_by_ratio_and_concatenate_with_sep(tmp_path):
  stream = _stream(tmp_path, seq_len=512)
  it = stream.examples()
  rows = [next(it)[0] for _ in range(400)]
  texts = [TOK.to_string(r) for r in rows]
  from_a = sum(t.startswith('AAA') or 'AAA document' in t for t in texts)
  assert abs(from_a / len(rows) - 0.7) < 0.07
  # Three documents (each under 100 bytes) joined by two SEP ids, then padding.
  assert np.sum(rows[0] == tok_lib.SEP_ID) == 2 and rows[0][-1] == tok_lib.PAD_ID
  assert not any(('AAA' in t) and ('BBB' in t) for t in texts)   # one source per example


def test_crops_are_seq_len_and_padding_only_for_short_text(tmp_path):
  stream = _stream(tmp_path, seq_len=64)
  ids, _ = next(stream.examples())
  assert ids.shape == (64,) and np.all(ids != tok_lib.PAD_ID)
  long_stream = _stream(tmp_path, seq_len=4096)
  ids, _ = next(long_stream.examples())
  assert ids.shape == (4096,) and ids[-1] == tok_lib.PAD_ID


def test_stream_is_deterministic_and_resumes_exactly(tmp_path):
  stream = _stream(tmp_path)
  it = stream.examples()
  straight = [next(it) for _ in range(60)]
  it = _stream(tmp_path).examples()
  again = [next(it)[0] for _ in range(60)]
  np.testing.assert_array_equal(np.stack([x for x, _ in straight]), np.stack(again))
  for cut in (1, 15, 16, 17, 37):      # inside a block, at its end, in a later one
    state = data.StreamState.from_json(json.loads(json.dumps(straight[cut - 1][1].to_json())))
    resumed = stream.examples(state)
    for k in range(cut, 60):
      np.testing.assert_array_equal(next(resumed)[0], straight[k][0])


def test_batches_resume_with_identical_masks(tmp_path):
  masker = masking.WordMasker(0.15)
  stream = _stream(tmp_path)
  it = data.batches(stream, 4, masker)
  run = [next(it) for _ in range(10)]
  resumed = data.batches(_stream(tmp_path), 4, masker, state=run[4][1])
  for k in range(5, 10):
    got, _ = next(resumed)
    for key in run[k][0]:
      np.testing.assert_array_equal(got[key], run[k][0][key])


def test_hosts_read_disjoint_shares(tmp_path):
  files = [_write_jsonl(tmp_path / f's{i}.jsonl', [f'shard {i} doc {j}' for j in range(5)])
           for i in range(4)]
  seen = []
  for host in range(2):
    source = data.DocumentSource('c4', files, seed=0, process_index=host, process_count=2)
    docs = [d for d, _ in zip((x for x, _ in source.documents(data.SourceState())), range(10))]
    seen.append(set(docs))
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20
  # Fewer shards than hosts: documents are dealt out instead.
  single = [files[0]]
  halves = []
  for host in range(2):
    source = data.DocumentSource('c4', single, seed=0, process_index=host, process_count=2)
    halves.append([d for d, _ in zip((x for x, _ in source.documents(data.SourceState())),
                                     range(3))])
  assert halves[0] == [b'shard 0 doc 0', b'shard 0 doc 2', b'shard 0 doc 4']
  assert halves[1][:2] == [b'shard 0 doc 1', b'shard 0 doc 3']


@pytest.mark.slow
def test_builtin_corpus_is_real_text(tmp_path):
  paths = corpus.write_stdlib_corpus(str(tmp_path))
  docs = list(data.read_documents(paths['train']))
  assert len(docs) > 200
  text = b' '.join(docs)
  assert len(text) > 500_000 and text.count(b' the ') > 1000
  assert corpus.resolve('builtin:stdlib_docstrings/valid', str(tmp_path)) == (paths['valid'],
                                                                             True)
  with pytest.raises(ValueError, match='unknown built-in corpus'):
    corpus.resolve('builtin:nope', str(tmp_path))


# ------------------------------------------------------------------------------------------
# Masking.

def _ids(text):
  return TOK.to_int(text)[None]


def test_whole_words_are_masked_with_their_leading_space():
  masker = masking.WordMasker(0.5, include_leading_space=True)
  words = masker.word_ids(_ids('ab  cd e'))[0]
  assert words.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
  masker = masking.WordMasker(0.5, include_leading_space=False)
  assert masker.word_ids(_ids('ab  cd e'))[0].tolist() == [0, 0, -1, -1, 1, 1, -1, 2]
  # Special ids are boundaries and never part of a word; trailing space has no word.
  ids = np.array([[tok_lib.CLS_ID] + TOK.to_int('x y ').tolist() + [tok_lib.SEP_ID, 0]])
  assert masking.WordMasker(0.5).word_ids(ids)[0].tolist() == [-1, 0, 1, 1, -1, -1, -1]


def test_masking_statistics_match_the_probability():
  text = ' '.join(f'word{i % 97}' for i in range(4000))
  ids = np.stack([TOK.to_int(text)[:2048]] * 8)
  mask = np.ones_like(ids)
  masker = masking.WordMasker(0.15)
  batch = masker(ids, mask, np.random.default_rng(0))
  words = masker.word_ids(ids)
  masked_words, total_words = 0, 0
  for row in range(ids.shape[0]):
    for w in np.unique(words[row][words[row] >= 0]):
      sel = batch['weights'][row][words[row] == w]
      assert sel.min() == sel.max()                  # a word is masked whole or not at all
      masked_words += int(sel[0])
      total_words += 1
  rate = masked_words / total_words
  assert abs(rate - 0.15) < 3 * np.sqrt(0.15 * 0.85 / total_words), rate
  assert np.all(batch['input_ids'][batch['weights'] > 0] == tok_lib.MASK_ID)
  assert np.all(batch['input_ids'][batch['weights'] == 0] == ids[batch['weights'] == 0])
  np.testing.assert_array_equal(batch['labels'], ids)


def test_padding_and_special_ids_are_never_masked():
  ids = np.array([TOK.to_int('a b c d e f g h')] * 50)
  ids[:, -3:] = tok_lib.PAD_ID
  mask = (ids != tok_lib.PAD_ID).astype(np.int32)
  batch = masking.WordMasker(0.9)(ids, mask, np.random.default_rng(1))
  assert batch['weights'][:, -3:].sum() == 0
  assert batch['weights'].sum() > 0


def test_bert_replacement_splits_80_10_10_with_real_bytes():
  text = ' '.join(['abcdefg'] * 3000)
  ids = TOK.to_int(text)[None]
  masker = masking.WordMasker(0.5, include_leading_space=False, bert_replacement=True)
  batch = masker(ids, np.ones_like(ids), np.random.default_rng(2))
  words = masker.word_ids(ids)[0]
  chosen = np.unique(words[batch['weights'][0] > 0])
  kinds = {'mask': 0, 'random': 0, 'same': 0}
  for w in chosen:
    got = batch['input_ids'][0][words == w]
    orig = ids[0][words == w]
    if np.all(got == tok_lib.MASK_ID):
      kinds['mask'] += 1
    elif np.array_equal(got, orig):
      kinds['same'] += 1
    else:
      kinds['random'] += 1
      assert got.min() >= tok_lib.NUM_SPECIAL and got.max() < tok_lib.VOCAB_SIZE
  n = len(chosen)
  assert abs(kinds['mask'] / n - 0.8) < 0.05
  assert abs(kinds['random'] / n - 0.1) < 0.04 and abs(kinds['same'] / n - 0.1) < 0.04


def test_masked_positions_list_every_masked_byte_and_cap_whole_words():
  ids = np.stack([TOK.to_int(' '.join(['word'] * 100))] * 3)
  masker = masking.WordMasker(0.5, max_predictions=40)
  batch = masker(ids, np.ones_like(ids), np.random.default_rng(3))
  for row in range(3):
    where = np.nonzero(batch['weights'][row])[0]
    assert len(where) <= 40
    n = int(batch['masked_weights'][row].sum())
    assert n == len(where)
    np.testing.assert_array_equal(batch['masked_positions'][row, :n], where)
    np.testing.assert_array_equal(batch['masked_labels'][row, :n], ids[row, where])
    # Capping drops whole words: every masked word is masked in full.
    words = masker.word_ids(ids)[row]
    for w in np.unique(words[where]):
      assert batch['weights'][row][words == w].all()


@pytest.mark.parametrize('settings', [
    dict(), dict(unit='byte'), dict(include_leading_space=False, bert_replacement=True),
    dict(max_predictions=6)])
def test_a_batch_joined_from_pieces_is_masked_as_each_piece_alone(settings):
  """What lets a host batch of several streams be masked in one call: pieces of 3, 1 and
  4 rows with their own generators give exactly the rows each gives masked alone."""
  rng = np.random.default_rng(0)
  words = ['a', 'bb', 'ccc', 'dddd', '  ', 'caf\u00e9']
  ids = np.stack([TOK.to_int(''.join(rng.choice(words, 40)))[:48] for _ in range(8)])
  ids[5, 30:] = tok_lib.PAD_ID
  ids[2, 10] = tok_lib.SEP_ID
  masker = masking.WordMasker(0.3, **settings)
  pieces = [(3, 10), (1, 11), (4, 12)]
  joined = masker(ids, (ids != tok_lib.PAD_ID).astype(np.int32),
                  [(rows, np.random.default_rng(seed)) for rows, seed in pieces])
  at = 0
  for rows, seed in pieces:
    part = ids[at:at + rows]
    alone = masker(part, (part != tok_lib.PAD_ID).astype(np.int32),
                   np.random.default_rng(seed))
    assert alone.keys() == joined.keys()
    for key, value in alone.items():
      np.testing.assert_array_equal(joined[key][at:at + rows], value, err_msg=key)
    at += rows
  assert joined['weights'].sum() > 0
  with pytest.raises(ValueError, match='do not add up'):
    masker(ids, np.ones_like(ids), [(3, np.random.default_rng(0))])


def _one_document(tmp_path, suffix, size=2000):
  text = ('a few words of one document ' * 100)[:size]
  path = tmp_path / f'one{suffix}'
  if suffix == '.parquet':
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    pq.write_table(pa.table({'text': [text]}), path)
  elif suffix == '.txt':
    path.write_text(text + '\n')
  else:
    _write_jsonl(path, [text], gz=suffix.endswith('.gz'))
  return data.SourceSpec('one', (str(path),), 1.0), text


@pytest.mark.parametrize('suffix', ['.jsonl', '.json.gz', '.txt', '.parquet'])
def test_a_one_document_source_gets_one_stream_and_trains_on_each_byte_once(tmp_path, suffix):
  source, text = _one_document(tmp_path, suffix)
  count, why = data.fitting_streams([source], 1, 8)
  assert count == 1 and "source 'one' has 1 record(s) in 1 file(s)" in why
  spec = data.StreamSpec((source,), seq_len=64, docs_per_example=1, separator='sep',
                         block_size=4, seed=0, batch_size=2, masker=masking.WordMasker(0.15),
                         streams=count)
  rows = []
  for (batch, _), _ in zip(data.interleave([spec]), range(16)):
    rows.extend(batch['labels'])
  # One epoch is the document's crops, in some order: every byte once.
  epoch = rows[:-(-len(text) // 64)]
  got = sorted(bytes((r[r >= NUM_SPECIAL] - NUM_SPECIAL).astype(np.uint8).tolist())
               for r in epoch)
  want = sorted(text[i:i + 64].encode() for i in range(0, len(text), 64))
  assert got == want


def test_streams_fit_the_largest_file_and_an_ample_corpus_keeps_them(tmp_path):
  three = data.SourceSpec('three', (_write_jsonl(tmp_path / 'three.jsonl', ['x', 'y', 'z']),), 1.0)
  big = data.SourceSpec('big', (_write_jsonl(tmp_path / 'big.jsonl',
                                             [f'doc {i}' for i in range(40)]),), 1.0)
  assert data.fitting_streams([big], 1, 8) == (8, None)
  assert data.fitting_streams([big], 4, 8) == (8, None)
  assert data.fitting_streams([big, three], 1, 8)[0] == 3
  # Two hosts (data.hosts or a multi-host run): the streams split what each host reads.
  assert data.fitting_streams([three], 2, 8)[0] == 1
  # Three one-record files: a file per reader, up to three readers.
  files = tuple(_write_jsonl(tmp_path / f'f{i}.jsonl', [f'file {i}']) for i in range(3))
  assert data.fitting_streams([data.SourceSpec('f', files, 1.0)], 1, 8)[0] == 3


def test_a_source_with_fewer_records_than_hosts_is_refused_naming_it(tmp_path):
  source, _ = _one_document(tmp_path, '.jsonl')
  with pytest.raises(data.DataError, match=r"source 'one': 1 record\(s\) in 1 file\(s\) "
                                           r"cannot give each of the 2 hosts"):
    data.fitting_streams([source], 2, 8)
