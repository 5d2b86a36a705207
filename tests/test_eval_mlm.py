"""eval.mlm: masked-byte scores against an independent numpy forward pass; fixed masks."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import helpers
from tests import numpy_reference
from eval import mlm as eval_mlm
from perceiver.params import params_file
from perceiver import configs as model_configs
from perceiver.model import tokenizer as tok_lib
from perceiver import transform
from train import data as data_lib
from train import masking

ROOT = pathlib.Path(__file__).resolve().parents[1]

_DOCS = ['The cat sat on the mat. It was a sunny day in the old town.',
         'A second document, with commas, digits 1 2 3 and caf\u00e9 bytes.',
         'Short one.',
         'Words words words: the end of the corpus is near, and then it ends here.']


def _corpus(tmp_path):
  path = tmp_path / 'text.jsonl'
  path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in _DOCS))
  return str(path)


def _checkpoint(tmp_path, max_seq_len=32):
  config = model_configs.tiny(max_seq_len=max_seq_len)
  model = transform.masked_lm(config)
  params = model.init(jax.random.PRNGKey(3), np.zeros((1, max_seq_len), np.int32))
  # Larger output bias and embeddings than at initialisation: logits that differ by byte,
  # so the loss and the argmax test something.
  rng = np.random.default_rng(0)
  params = jax.tree.map(np.asarray, params)
  params['embedding_decoder']['bias'] = rng.normal(0, 2.0, params['embedding_decoder'][
      'bias'].shape).astype(np.float32)
  path = tmp_path / 'tiny.npz'
  params_file.save(path, params, config)
  return str(path), params, config


def _numpy_scores(params, config, batches):
  """Loss, accuracy and label counts of ``batches`` from the float64 numpy model."""
  loss = correct = count = 0.0
  counts = np.zeros(tok_lib.VOCAB_SIZE)
  for batch in batches:
    for row in range(batch['rows']):
      logits = numpy_reference.masked_lm_logits(params, config, batch['input_ids'][row],
                                                batch['input_mask'][row])
      for t in np.nonzero(batch['weights'][row])[0]:
        label = batch['labels'][row, t]
        z = logits[t]
        loss += np.log(np.exp(z - z.max()).sum()) + z.max() - z[label]
        correct += float(np.argmax(z) == label)
        count += 1
        counts[label] += 1
  return loss / count, correct / count, counts


@pytest.mark.slow
def test_scores_match_a_numpy_forward_pass(tmp_path):
  ckpt, params, config = _checkpoint(tmp_path)
  data = _corpus(tmp_path)
  result = eval_mlm.run(ckpt, data, seed=5, batch_size=3, mask_prob=0.3)
  masker = masking.WordMasker(0.3)
  docs = eval_mlm.masked_documents([data], masker, seed=5)
  batches = list(eval_mlm.batches(eval_mlm.masked_windows(docs, 32, [tok_lib.SEP_ID]), 3))
  loss, accuracy, counts = _numpy_scores(params, config, batches)
  assert result['masked_bytes'] == counts.sum() > 20
  np.testing.assert_allclose(result['loss'], loss, rtol=1e-4)
  np.testing.assert_allclose(result['accuracy'], accuracy, atol=1e-6)
  np.testing.assert_allclose(result['bits_per_byte'], loss / math.log(2), rtol=1e-4)
  p = counts[counts > 0] / counts.sum()
  np.testing.assert_allclose(result['baseline_loss'], -(p * np.log(p)).sum(), rtol=1e-9)
  assert result['baseline_accuracy'] == counts.max() / counts.sum()
  assert result['accuracy_gap'] == pytest.approx(accuracy - counts.max() / counts.sum())
  # Every byte of the text is in exactly one window, documents joined by SEP.
  text = []
  joined = np.concatenate([b['labels'][r][b['input_mask'][r] > 0]
                           for b in batches for r in range(b['rows'])])
  for i, doc in enumerate(_DOCS):
    text.extend(([tok_lib.SEP_ID] if i else []) + list(np.frombuffer(doc.encode(), np.uint8)
                                                       + tok_lib.NUM_SPECIAL))
  np.testing.assert_array_equal(joined, text)
  assert result['examples'] == math.ceil(len(text) / 32)


def test_context_free_baseline_by_hand():
  counts = np.zeros(tok_lib.VOCAB_SIZE)
  counts[ord(' ') + 6], counts[ord('e') + 6], counts[ord('t') + 6] = 2, 1, 1
  base = eval_mlm.context_free_baseline(counts)
  assert base['baseline_accuracy'] == 0.5 and base['baseline_byte'] == ' '
  # Entropy of (1/2, 1/4, 1/4): 1.5 bits.
  assert base['baseline_bits_per_byte'] == pytest.approx(1.5)
  assert base['baseline_loss'] == pytest.approx(1.5 * math.log(2))


def _masked_stream(data, seed, seq_len, batch_size):
  masker = masking.WordMasker(0.15)
  docs = eval_mlm.masked_documents([data], masker, seed)
  out = []
  for b in eval_mlm.batches(eval_mlm.masked_windows(docs, seq_len, [tok_lib.SEP_ID]),
                            batch_size):
    for r in range(b['rows']):
      keep = b['input_mask'][r] > 0
      out.append(np.stack([b['input_ids'][r][keep], b['weights'][r][keep]]))
  return np.concatenate(out, axis=1)


def test_masks_are_fixed_by_the_seed_whatever_the_window_or_batch(tmp_path):
  data = _corpus(tmp_path)
  a = _masked_stream(data, 7, 32, 4)
  assert a[1].sum() > 0
  np.testing.assert_array_equal(a, _masked_stream(data, 7, 32, 4))    # another run
  np.testing.assert_array_equal(a, _masked_stream(data, 7, 48, 1))    # other windows
  assert not np.array_equal(a, _masked_stream(data, 8, 32, 4))        # another seed
  # Masked bytes are MASK ids in the input, the rest the text.
  assert (a[0][a[1] > 0] == tok_lib.MASK_ID).all()
  assert (a[0][a[1] == 0] != tok_lib.MASK_ID).all()


@pytest.mark.slow
def test_command_line_writes_json_and_names_bad_flags(tmp_path):
  ckpt, _, _ = _checkpoint(tmp_path)
  data = _corpus(tmp_path)
  out = tmp_path / 'scores.json'
  done = subprocess.run([sys.executable, '-m', 'eval.mlm', f'--checkpoint={ckpt}',
                         f'--data={data}', '--seq_len=16', '--max_examples=5',
                         f'--out={out}'], cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  result = json.loads(out.read_text())
  assert result['examples'] == 5 and result['seq_len'] == 16
  assert 'eval.mlm: file 1/1, 5 windows of at most 5 (100%' in done.stderr
  assert f'accuracy {result["accuracy"]:.4f}' in done.stdout
  bad = subprocess.run([sys.executable, '-m', 'eval.mlm', f'--checkpoint={ckpt}',
                        f'--data={tmp_path}/nothing*.jsonl', '--seq_len=64'],
                       cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith('error: --data: no file matches')
  with pytest.raises(eval_mlm.EvalError, match='--seq_len=64 exceeds'):
    eval_mlm.run(ckpt, data, seq_len=64)
  with pytest.raises(params_file.CheckpointError, match='no such checkpoint'):
    eval_mlm.run(str(tmp_path / 'missing.npz'), data)


def _parquet(tmp_path, columns):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'docs.parquet'
  pq.write_table(pa.table(columns), path, row_group_size=2)
  return str(path)


def test_a_parquet_column_is_read_as_the_json_field_is_and_a_missing_one_is_named(tmp_path):
  data = _parquet(tmp_path, {'id': list(range(len(_DOCS))), 'body': _DOCS})
  # --text_field=body reads the Parquet column as the JSON field: the same masked stream.
  masker = masking.WordMasker(0.15)
  docs = eval_mlm.masked_documents([data], masker, 7, text_field='body')
  parquet = [np.stack([d['input_ids'], d['weights']]) for d in docs]
  docs = eval_mlm.masked_documents([_corpus(tmp_path)], masker, 7)
  json_docs = [np.stack([d['input_ids'], d['weights']]) for d in docs]
  assert len(parquet) == len(_DOCS) == len(json_docs)
  for a, b in zip(parquet, json_docs):
    np.testing.assert_array_equal(a, b)
  # The default column is missing: named with the columns there and the flag, before the
  # checkpoint (which does not exist) is read; the library path says the same.
  missing = str(tmp_path / 'missing.npz')
  status, stderr = helpers.run_command(lambda: eval_mlm.run(missing, data))
  expected = (f"error: {data}: Parquet file has no 'text' (--text_field) column (columns: "
              'id, body)')
  assert status == 1 and helpers.one_error_line(stderr) == expected
  status, stderr = helpers.run_command(lambda: eval_mlm.run(missing, data, text_field='id'))
  assert helpers.one_error_line(stderr) == (
      f"error: {data}: Parquet column 'id' (--text_field) is int64, not text")
  with pytest.raises(data_lib.DataError) as e:
    next(eval_mlm.masked_documents([data], masker, 7))
  assert f'error: {e.value}' == expected
