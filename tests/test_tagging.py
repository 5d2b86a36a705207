"""Token classification (perceiver.transform.token_classifier, eval.tagging): the model's
decoding of chosen positions, its start from an MLM checkpoint, seqeval scores against a
hand count, the command's outputs, learning a context-dependent task, and resume."""

import contextlib
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval.tagging import app as tagging
from eval.tagging import task as tagging_task
from eval.configs import tagging as tagging_configs
from perceiver.params import loading
from perceiver.params import params_file
from perceiver.command import cli
from perceiver import configs as model_configs
from perceiver import convert
from perceiver.params import hf
from perceiver.params import transfer
from perceiver import transform
from tests import helpers
from train.configs import mlm as mlm_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# The model.

def _ids(batch, length, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(6, 262, (batch, length)))


def test_token_classifier_shapes_and_names_without_compiling():
  config = model_configs.tiny(max_seq_len=32)
  model = transform.token_classifier(config, 5)
  ids = jax.ShapeDtypeStruct((2, 32), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)
  positions = jax.ShapeDtypeStruct((2, 4), jnp.int32)
  assert jax.eval_shape(lambda p, i: model.apply(p, None, i), params, ids).shape == (2, 32, 5)
  assert jax.eval_shape(lambda p, i, q: model.apply(p, None, i, None, False, q), params, ids,
                        positions).shape == (2, 4, 5)
  mlm = jax.eval_shape(transform.masked_lm(config).init, jax.random.PRNGKey(0), ids)
  renamed = {m.replace(transform.TOKEN_DECODER, 'basic_decoder'): {
      n: v.shape for n, v in leaves.items()} for m, leaves in params.items()
             if not m.startswith(transform.TOKEN_HEAD)}
  assert renamed == {m: {n: v.shape for n, v in leaves.items()} for m, leaves in mlm.items()
                     if m != 'embedding_decoder'}
  assert params['token_classification_head/linear_1']['w'].shape == (32, 5)
  with pytest.raises(ValueError, match='num_labels must be >= 1'):
    transform.token_classifier(config, 0)


@pytest.mark.slow   # compiles the model (about 15 s of CPU)
def test_decoding_chosen_positions_gives_the_full_decoder_s_logits():
  config = model_configs.tiny(max_seq_len=32)
  model = transform.token_classifier(config, 5)
  ids = _ids(2, 32)
  mask = jnp.ones_like(ids).at[1, 20:].set(0)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, mask)
  apply = jax.jit(lambda ids, mask, positions=None: model.apply(
      params, None, ids, mask, False, positions))
  full = apply(ids, mask)
  assert full.shape == (2, 32, 5)
  positions = jnp.asarray([[0, 5, 9, 31], [3, 4, 19, 7]])
  chosen = apply(ids, mask, positions)
  np.testing.assert_allclose(chosen, np.take_along_axis(np.asarray(full),
                                                        np.asarray(positions)[..., None], 1),
                             atol=1e-5)


@pytest.mark.slow   # compiles the model (about 15 s of CPU)
def test_an_mlm_checkpoint_starts_the_trunk_and_the_token_decoder_exactly(tmp_path):
  config = model_configs.tiny(max_seq_len=32)
  ids = _ids(1, 32)
  mlm = jax.device_get(jax.jit(transform.masked_lm(config).init)(jax.random.PRNGKey(1), ids))
  path = params_file.save(tmp_path / 'mlm.npz', mlm, config)
  tagger = transform.token_classifier(config, 3)
  fresh = jax.eval_shape(tagger.init, jax.random.PRNGKey(2), ids)
  # Same trunk names as the MLM; the decoder has the MLM decoder's structure.
  trunk = {m for m in fresh if not transfer.is_head_module(m)}
  assert trunk == {m for m in mlm if not m.startswith(('basic_decoder', 'embedding_decoder'))}
  decoder = {m.replace(transform.TOKEN_DECODER, 'basic_decoder') for m in fresh
             if m.startswith(transform.TOKEN_DECODER)}
  assert decoder == {m for m in mlm if m.startswith('basic_decoder')}
  notes = []
  for with_decoder in (False, True):
    start = transfer.load_trunk(str(path), config, encoder_dropout=0.0, head_dropout=0.0,
                                note=notes.append, mlm_decoder=with_decoder)
    params = transfer.classifier_params(tagger, start, 0, 32, notes.append)
    for module in trunk:
      for name, value in mlm[module].items():
        np.testing.assert_array_equal(params[module][name], value)
    for module in {m for m in params if m.startswith(transform.TOKEN_DECODER)}:
      source = mlm[module.replace(transform.TOKEN_DECODER, 'basic_decoder')]
      same = all(np.array_equal(params[module][n], v) for n, v in source.items())
      random = bool({'w', 'pos_embs'} & set(source))   # not the layer norms' 1s and 0s
      assert same == (with_decoder or not random), module
  text = '\n'.join(notes)
  assert '  not used from the checkpoint: basic_decoder/' in text   # the first start
  assert text.endswith('  not used from the checkpoint: embedding_decoder')
  assert ('parameters: trunk (embed, perceiver_encoder, token_classification_decoder, '
          'trainable_position_encoding') in text
  assert 'token_classification_decoder and token_classification_head (' in text


# --------------------------------------------------------------------------------------
# Scores.

def test_seqeval_scores_match_a_hand_count_with_iob1_and_iob2():
  gold = [['I-PER', 'I-PER', 'O', 'I-LOC', 'B-LOC', 'O'],    # IOB1: PER[0-1] LOC[3] LOC[4]
          ['B-ORG', 'I-ORG', 'O', 'B-MISC']]                 # IOB2: ORG[0-1] MISC[3]
  pred = [['I-PER', 'I-PER', 'O', 'I-LOC', 'I-LOC', 'O'],    # PER[0-1] LOC[3-4]
          ['B-ORG', 'I-ORG', 'O', 'O']]                      # ORG[0-1]
  # 2 entities right (PER, ORG) of 3 predicted and 5 gold: P 2/3, R 2/5, F1 1/2.
  result = tagging_task.scores(gold, pred, 'entity')
  assert result['precision'] == pytest.approx(2 / 3)
  assert result['recall'] == pytest.approx(2 / 5)
  assert result['f1'] == pytest.approx(0.5) and result['main'] == result['f1']
  assert result['accuracy'] == pytest.approx(8 / 10)
  per_type = result['per_type']
  assert per_type['PER'] == {'precision': 1.0, 'recall': 1.0, 'f1': 1.0, 'support': 1}
  assert per_type['LOC'] == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 2}
  assert per_type['MISC']['support'] == 1 and per_type['MISC']['recall'] == 0.0
  table = tagging_task.type_table(result).splitlines()
  assert table[0].split() == ['type', 'precision', 'recall', 'f1', 'support']
  assert table[-1].split() == ['all', '66.67', '40.00', '50.00', '5']
  assert tagging_task.scores(gold, pred, 'accuracy') == {'accuracy': 0.8, 'num_words': 10,
                                                         'main': 0.8}
  assert tagging_task.resolve_metric('auto', ['O', 'B-PER', 'I-PER']) == 'entity'
  assert tagging_task.resolve_metric('auto', ['NOUN', 'VERB']) == 'accuracy'


def test_presets_the_paper_model_and_the_mlm_cpu_model():
  paper = tagging_configs.get_config('paper')
  assert paper.model.to_dict() == model_configs.language_mlm().to_dict()
  assert (paper.train.epochs, paper.train.batch_size, paper.optimizer.learning_rate) == (
      3, 32, 5e-5)
  tagging.check_config(paper)
  assert tagging.resolve_window(paper, paper.model) == 2048
  # The smoke preset's model is the MLM cpu and smoke presets' (their checkpoints fit it).
  def model(config):   # the dropout is the fine-tuning's (transfer.with_dropout)
    out = config.model.to_dict()
    out['encoder'].pop('dropout_prob', None)
    return out

  smoke = tagging_configs.get_config('smoke')
  for preset in ('cpu', 'smoke'):
    assert model(smoke) == model(mlm_configs.get_config(preset))
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    tagging_configs.get_config('nope')


# --------------------------------------------------------------------------------------
# Generated data whose tags depend on context.

TRIGGERS = helpers.TAGGING_TRIGGERS
write_context_task = helpers.write_tagging_context_task


def _read_conll(path):
  sentences, current = [], []
  for line in pathlib.Path(path).read_text(encoding='utf-8').splitlines():
    if not line:
      sentences.append(current)
      current = []
    else:
      current.append(line.split(' '))
  return sentences


@pytest.mark.slow
def test_a_run_writes_predictions_that_reproduce_its_scores_and_a_loadable_checkpoint(
    tmp_path):
  data_dir = write_context_task(tmp_path / 'data', 40, num_dev=30)
  (tmp_path / 'data' / 'test.txt').write_text(
      (tmp_path / 'data' / 'valid.txt').read_text())
  out = tmp_path / 'out'
  summary = tagging.run(helpers.tagging_tiny_config(), data_dir, str(out))
  assert json.loads((out / 'dev_metrics.json').read_text()) == summary
  rows = _read_conll(out / 'dev_predictions.txt')
  assert len(rows) == 30 and all(len(r) == 3 for s in rows for r in s)
  gold = [[r[1] for r in s] for s in rows]
  pred = [[r[2] for r in s] for s in rows]
  recomputed = tagging_task.scores(gold, pred, 'entity')
  assert {k: v for k, v in summary['results'].items() if k != 'loss'} == recomputed
  assert summary['test_results']['f1'] == recomputed['f1']   # the same sentences
  assert (out / 'dev_entity_table.txt').read_text().splitlines()[0].split()[0] == 'type'
  assert summary['main_score'] == max(e['score'] for e in summary['epochs'])
  params, config, meta = loading.load_any(out / summary['checkpoint'])
  assert meta['token_labels'] == summary['labels'] == ['O', 'B-LOC', 'B-ORG', 'B-PER']
  assert any(m.startswith(transform.TOKEN_HEAD) for m in params) and config.max_seq_len == 64
  assert not (out / 'resume').exists()
  # The Hugging Face export refuses it, saying why.
  with pytest.raises(hf.UnsupportedConfigError, match='no PerceiverForTokenClassification'):
    convert.convert('project', str(out / summary['checkpoint']), str(tmp_path / 'hf'),
                    to='hf')
  assert not (tmp_path / 'hf').exists()
  # A rerun reports the finished run; --noresume refuses it.
  again = tagging.run(helpers.tagging_tiny_config(), data_dir, str(out))
  assert again == summary
  with pytest.raises(tagging.TaggingError, match='already holds a finished run'):
    tagging.run(helpers.tagging_tiny_config(), data_dir, str(out), resume=False)


def write_conllu_task(root, num_train, num_dev):
  """The context task in CoNLL-U, tagged with UPOS-like tags: a name is PROPN after a
  trigger (VERB), else NOUN; other words are X."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  for name, count, offset in (('xx_gen-ud-train.conllu', num_train, 0),
                              ('xx_gen-ud-dev.conllu', num_dev, 1)):
    rng = np.random.default_rng([0, offset])
    lines = []
    for i in range(count):
      words, tags = helpers.tagging_sentence(rng)
      upos = ['VERB' if w in TRIGGERS else 'PROPN' if t != 'O' else
              'NOUN' if w in helpers.TAGGING_NAMES else 'X' for w, t in zip(words, tags)]
      lines += [f'# sent_id = {i}', f'# text = {" ".join(words)}']
      lines += [f'{k + 1}\t{w}\t{w}\t{u}\t_\t_\t0\tdep\t_\t_'
                for k, (w, u) in enumerate(zip(words, upos))] + ['']
    (root / name).write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(root)


@pytest.mark.slow
def test_conllu_upos_is_scored_by_word_accuracy_from_the_written_predictions(tmp_path):
  data_dir = write_conllu_task(tmp_path / 'ud', 40, 20)
  out = tmp_path / 'out'
  summary = tagging.run(helpers.tagging_tiny_config(**{'data.format': 'conllu', 'train.epochs': 1}),
                        data_dir, str(out))
  assert summary['metric'] == 'accuracy' and 'f1' not in summary['results']
  assert summary['labels'] == ['NOUN', 'PROPN', 'VERB', 'X']
  rows = [r for s in _read_conll(out / 'dev_predictions.txt') for r in s]
  assert len(rows) == summary['num_words']['dev']
  assert summary['results']['accuracy'] == pytest.approx(
      np.mean([r[1] == r[2] for r in rows]))
  assert summary['main_score'] == summary['results']['accuracy']
  assert not (out / 'dev_entity_table.txt').exists()


def _error(command):
  """The one ``error:`` line of ``command`` under the commands' policy (exit status 1)."""
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    status = cli.run(command)
  lines = stderr.getvalue().strip().splitlines()
  assert status == 1 and len(lines) == 1 and lines[0].startswith('error: '), lines
  return lines[0]


def test_bad_inputs_are_one_error_line_naming_the_file_line_field_or_checkpoint(tmp_path):
  data_dir = write_context_task(tmp_path / 'data', 4, num_dev=3)
  out = str(tmp_path / 'out')

  def run(config=None, init=None, data=data_dir):
    return _error(lambda: tagging.run(config or helpers.tagging_tiny_config(), data, out, init))

  assert "eval.metric='f1': expected one of auto, entity, accuracy" in run(
      helpers.tagging_tiny_config(**{'eval.metric': 'f1'}))
  assert "data.format='iob': expected one of conll2003, conllu" in run(
      helpers.tagging_tiny_config(**{'data.format': 'iob'}))
  assert 'data.window_overlap=64 must be smaller than the window (64 bytes)' in run(
      helpers.tagging_tiny_config(**{'data.window_overlap': 64}))
  assert 'train.epochs must be an integer >= 1, got 0' in run(
      helpers.tagging_tiny_config(**{'train.epochs': 0}))
  assert f'{tmp_path}/nope.npz: no such checkpoint' in run(init=str(tmp_path / 'nope.npz'))
  # A checkpoint without a masked-LM decoder (here: the encoder alone).
  config = model_configs.tiny(max_seq_len=64)
  shapes = jax.eval_shape(transform.encoder(config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 8), jnp.int32))
  encoder_only = params_file.save(tmp_path / 'enc.npz', jax.tree.map(
      lambda x: np.zeros(x.shape, x.dtype), shapes), config)
  message = run(init=str(encoder_only))
  assert str(encoder_only) in message and 'basic_decoder' in message
  assert message.endswith('pass --config.init.mlm_decoder=false to start the token '
                          'decoder from scratch')
  train = tmp_path / 'data' / 'train.txt'
  train.write_text(train.read_text() + 'lonely\n', encoding='utf-8')
  number = train.read_text().count('\n')
  assert f'{train}:{number}: expected "word ... tag"' in run()
  assert not os.path.exists(os.path.join(out, 'dev_metrics.json'))


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'eval.tagging', *args], cwd=ROOT,
                        capture_output=True, text=True, check=False,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.slow
def test_command_line_errors_are_one_line_naming_the_file_line_or_field(tmp_path):
  data_dir = write_context_task(tmp_path / 'data', 5, num_dev=5)
  with open(tmp_path / 'data' / 'valid.txt', 'a', encoding='utf-8') as f:
    f.write('Peter X X B-MISC\n')
  lines = (tmp_path / 'data' / 'valid.txt').read_text().count('\n')
  runs = {
      'tag': _cli(f'--data_dir={data_dir}', f'--workdir={tmp_path}/o',
                  '--config=eval/configs/tagging.py:smoke'),
      'field': _cli(f'--data_dir={data_dir}', f'--workdir={tmp_path}/o',
                    '--config=eval/configs/tagging.py:smoke', '--config.eval.metric=f2'),
      'dir': _cli(f'--data_dir={tmp_path}/nope', f'--workdir={tmp_path}/o'),
      'format': _cli(f'--data_dir={data_dir}', f'--workdir={tmp_path}/o', '--format=conllu'),
  }
  for name, run in runs.items():
    assert run.returncode == 1 and 'Traceback' not in run.stderr, (name, run.stderr)
    assert len([l for l in run.stderr.splitlines() if l.startswith('error:')]) == 1
  assert (f"error: {tmp_path}/data/valid.txt:{lines}: tag 'B-MISC' does not occur in the "
          'training file') in runs['tag'].stderr
  assert "error: eval.metric='f2': expected one of auto, entity, accuracy" in (
      runs['field'].stderr)
  assert f'--data_dir {tmp_path}/nope: no such directory' in runs['dir'].stderr
  assert f'error: {data_dir}: no train file (looked for *train.conllu)' in (
      runs['format'].stderr)


@pytest.mark.slow
def test_a_smoke_model_learns_context_dependent_tags_from_scratch(tmp_path):
  """The same names are O, B-PER, B-LOC or B-ORG by the word before them: a tagger that
  reads each word alone can do no better than one tag for every name (F1 about 0.26:
  precision 0.21, recall 1/3). The smoke preset's model from scratch passes 0.9 within
  12 epochs of 1,000 sentences (384 steps of 32; measured: 0.905 at step 288, 0.939 at
  the best epoch, 59 s of CPU time for the whole command)."""
  data_dir = write_context_task(tmp_path / 'data', 1000)
  config = tagging_configs.get_config('smoke')
  config.train.update(dict(epochs=12, log_every=100))
  summary = tagging.run(config, data_dir, str(tmp_path / 'out'))
  assert summary['results']['f1'] >= 0.9, summary['epochs']
  assert summary['epochs'][0]['score'] < 0.5      # it was learned, not given


_RUN = """
import sys
sys.path.insert(0, {root!r})
from eval.tagging import app as tagging
from tests import helpers
tagging.run(helpers.tagging_tiny_config(**{{'train.epochs': 3, 'train.batch_size': 4}}),
            {data!r}, {out!r})
"""


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_dev_metrics(tmp_path):
  """kill -9 after the first epoch's resume checkpoint; the same command again continues
  from it and ends with the dev metrics of a run never stopped."""
  data_dir = write_context_task(tmp_path / 'data', 24, num_dev=60)
  # JAX's persistent compilation cache: the three runs compile the same steps once.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2')

  def start(out):
    return subprocess.Popen([sys.executable, '-c', _RUN.format(root=str(ROOT), data=data_dir,
                                                               out=str(out))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)

  straight = start(tmp_path / 'straight')
  assert straight.wait(timeout=600) == 0, straight.stdout.read()[-3000:]
  killed = start(tmp_path / 'killed')
  resume_dir = tmp_path / 'killed' / 'resume'
  deadline = time.monotonic() + 600
  while not list(resume_dir.glob('ckpt_*[0-9]')) and time.monotonic() < deadline:
    assert killed.poll() is None, killed.stdout.read()[-3000:]
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / 'killed' / 'dev_metrics.json').exists(), 'finished before the kill'
  again = start(tmp_path / 'killed')
  output, _ = again.communicate(timeout=600)
  assert again.returncode == 0, output[-3000:]
  assert re.search(r'resuming from .* at step \d+ \(epoch [12] of 3 done\)', output)
  results = [json.loads((tmp_path / name / 'dev_metrics.json').read_text())
             for name in ('straight', 'killed')]
  assert results[1]['results'] == results[0]['results']
  assert results[1]['epochs'] == results[0]['epochs']
  assert (tmp_path / 'killed' / 'dev_predictions.txt').read_text() == (
      tmp_path / 'straight' / 'dev_predictions.txt').read_text()
  assert not resume_dir.exists()
