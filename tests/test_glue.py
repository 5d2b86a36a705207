"""GLUE fine-tuning (eval.glue): generated GLUE-format files and a tiny model, then one
end-to-end run on the real files (../shared/data/glue, or $PERCEIVER_GLUE_DIR)."""

import json
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval.glue import app as glue
from eval.glue import data as glue_data
from eval.glue import inputs as glue_inputs
from eval.glue import metrics
from eval.glue import runs
from eval.glue import task as glue_task
from eval.configs import glue as glue_configs
from perceiver.params import loading
from perceiver.params import run_checkpoint
from perceiver.params import params_file
from perceiver import configs as model_configs
from perceiver.params import transfer
from perceiver import transform
from perceiver.training import mesh as mesh_lib
from perceiver.training import step as step_lib
from perceiver.training import epochs
from tests import helpers

ROOT = helpers.ROOT
SEQ = helpers.GLUE_SEQ

write_task = helpers.write_glue_task


def read_tsv(path):
  lines = pathlib.Path(path).read_text(encoding='utf-8').splitlines()
  return lines[0].split('\t'), [line.split('\t') for line in lines[1:]]


def recompute(task, path):
  """task_metrics from a written dev_predictions file (label strings or 3-decimal scores)."""
  _, rows = read_tsv(path)
  if task.is_regression:
    preds = np.array([float(r[1]) for r in rows])
    labels = np.array([float(r[2]) for r in rows])
  else:
    preds = np.array([task.labels.index(r[1]) for r in rows])
    labels = np.array([task.labels.index(r[2]) for r in rows])
  return preds, labels


def check_task_outputs(task_name, data_dir, task_dir, has_log=True):
  """The written predictions, metrics and checkpoint agree with each other and the data."""
  task = glue_data.TASKS[task_name]
  summary = json.loads((task_dir / 'dev_metrics.json').read_text())
  for split in task.dev_splits:
    header, rows = read_tsv(task_dir / f'{split}_predictions.tsv')
    assert header == ['index', 'prediction', 'label']
    examples = glue_data.load_split(data_dir, task, split).examples
    assert [r[0] for r in rows] == [e.index for e in examples]
    gold = [f'{e.label:.3f}' if task.is_regression else e.label for e in examples]
    assert [r[2] for r in rows] == gold
    preds, labels = recompute(task, task_dir / f'{split}_predictions.tsv')
    key = task.result_key(split)
    assert summary['results'][key] == metrics.task_metrics(key, preds, labels)
  assert summary['main_score'] == glue_task.selection_score(task, summary['results'])
  best = [e for e in summary['epochs'] if e['epoch'] == summary['best_epoch']][0]
  assert best['results'] == summary['results']
  assert summary['main_score'] == max(e['score'] for e in summary['epochs'])
  records = [json.loads(line) for line in (task_dir / 'metrics.jsonl').read_text().splitlines()]
  assert {r['kind'] for r in records} == {'train', 'eval'}
  assert [r['epoch'] for r in records if r['kind'] == 'eval'] == [
      e['epoch'] for e in summary['epochs']]
  if has_log:
    assert (task_dir / 'log.txt').read_text().count('new best dev score') >= 1
  return summary


def test_single_task_writes_consistent_outputs_and_a_loadable_best_checkpoint(tmp_path):
  data_dir = write_task(tmp_path / 'glue', 'sst2')
  # One epoch: the default run's GLUE run (test_stsb and the sweep run two or more).
  out = glue.run('sst2', helpers.glue_tiny_config(**{'train.epochs': 1}), str(data_dir),
                 str(tmp_path / 'out'), do_predict=True)
  task_dir = tmp_path / 'out' / 'sst2'
  summary = check_task_outputs('sst2', data_dir, task_dir)
  assert out['results'] == summary['results'] and out['tasks_run'] == ['sst2']
  assert summary['num_examples'] == {'train': 24, 'dev': 10, 'test': 6}
  assert summary['total_steps'] == 3 and summary['init'] == 'scratch'
  # The best epoch's checkpoint reproduces the written dev predictions.
  params, config, meta = loading.load_any(task_dir / summary['checkpoint'])
  assert (meta['task'], meta['epoch'], meta['step']) == ('sst2', summary['best_epoch'],
                                                         summary['best_step'])
  assert meta['num_outputs'] == 2 and meta['labels'] == ['0', '1']
  model = transform.classifier(config, meta['num_outputs'])
  split = glue_data.load_split(data_dir, 'sst2', 'dev')
  enc = glue_inputs.encode_split(glue_data.TASKS['sst2'], split, 'dev', SEQ, 16)
  mesh = mesh_lib.make()
  shardings = mesh_lib.state_shardings(mesh, params)
  predict_step = step_lib.make_predict_step(glue_task.make_predict_fn(model), mesh, shardings)
  outputs = epochs.predict(predict_step, mesh_lib.place(params, shardings), len(enc), 8, mesh,
                           lambda rows: glue_inputs.host_batch(enc, rows, 8),
                           glue_inputs.MODEL_INPUTS)
  _, rows = read_tsv(task_dir / 'dev_predictions.tsv')
  assert [r[1] for r in rows] == [str(i) for i in outputs.argmax(-1)]
  # The submission file: the test file's indices, label strings.
  header, rows = read_tsv(tmp_path / 'out' / 'submission' / 'SST-2.tsv')
  assert header == ['index', 'prediction']
  assert [r[0] for r in rows] == [str(1000 + i) for i in range(6)]   # the 'index' column
  assert {r[1] for r in rows} <= {'0', '1'}
  assert summary['submission'] == [os.path.join('..', 'submission', 'SST-2.tsv')]


@pytest.mark.slow
def test_stsb_is_a_regression_with_three_decimal_predictions(tmp_path):
  data_dir = write_task(tmp_path / 'glue', 'stsb')
  glue.run('stsb', helpers.glue_tiny_config(), str(data_dir), str(tmp_path / 'out'),
           do_predict=True)
  summary = check_task_outputs('stsb', data_dir, tmp_path / 'out' / 'stsb')
  assert set(summary['results']['stsb']) == {'pearson', 'spearman'}
  _, rows = read_tsv(tmp_path / 'out' / 'stsb' / 'dev_predictions.tsv')
  assert all(len(r[1].split('.')[1]) == 3 for r in rows)
  _, rows = read_tsv(tmp_path / 'out' / 'submission' / 'STS-B.tsv')
  assert [r[0] for r in rows] == [str(1000 + i) for i in range(6)]
  assert all(np.isfinite(float(r[1])) for r in rows)
  params, config, meta = loading.load_any(tmp_path / 'out' / 'stsb' / summary['checkpoint'])
  assert meta['num_outputs'] == 1 and meta['labels'] == []
  assert params['classification_head/linear_1']['w'].shape[-1] == 1


@pytest.mark.slow
def test_all_runs_the_present_tasks_and_tables_the_rest_as_missing(tmp_path, capsys):
  data_dir = tmp_path / 'glue'
  write_task(data_dir, 'mnli')
  write_task(data_dir, 'wnli')
  out = glue.run('all', helpers.glue_tiny_config(**{'train.epochs': 1}), str(data_dir),
                 str(tmp_path / 'out'), do_predict=True)
  assert out['tasks_run'] == ['mnli', 'wnli']
  assert out['missing_tasks'] == ['cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'qnli', 'rte']
  assert set(out['results']) == {'mnli-m', 'mnli-mm', 'wnli'}
  assert out['average'] is None
  check_task_outputs('mnli', data_dir, tmp_path / 'out' / 'mnli')
  check_task_outputs('wnli', data_dir, tmp_path / 'out' / 'wnli')
  table = (tmp_path / 'out' / 'glue_table.txt').read_text()
  assert table.strip() == metrics.format_table(out['results'])
  saved = json.loads((tmp_path / 'out' / 'glue_results.json').read_text())
  assert saved['results'] == out['results'] and saved['missing_tasks'] == out['missing_tasks']
  assert set(saved['wall_time_s']) == {'mnli', 'wnli', 'total'}
  printed = capsys.readouterr().out
  assert table.strip() in printed
  assert 'warning: no folder in' in printed and 'cola (CoLA/)' in printed
  assert 'AX.tsv (the diagnostic set' in printed
  assert sorted(os.listdir(tmp_path / 'out' / 'submission')) == [
      'MNLI-m.tsv', 'MNLI-mm.tsv', 'WNLI.tsv']
  _, rows = read_tsv(tmp_path / 'out' / 'submission' / 'MNLI-mm.tsv')
  assert {r[1] for r in rows} <= {'contradiction', 'entailment', 'neutral'}
  assert 'not in the average' in table and 'average' in (tmp_path / 'out' / 'log.txt').read_text()


@pytest.mark.slow
def test_sweep_runs_each_grid_point_and_keeps_the_best(tmp_path):
  data_dir = write_task(tmp_path / 'glue', 'rte')
  glue.run('rte', helpers.glue_tiny_config(**{'train.epochs': 1}), str(data_dir),
           str(tmp_path / 'out'), sweep=True)
  task_dir = tmp_path / 'out' / 'rte'
  summary = check_task_outputs('rte', data_dir, task_dir)
  points = json.loads((task_dir / 'sweep.json').read_text())['points']
  assert [(p['batch_size'], p['learning_rate']) for p in points] == [(4, 3e-3), (8, 3e-3)]
  best = max(points, key=lambda p: p['main_score'])
  assert summary['sweep']['best'] == best['dir'] and summary['main_score'] == best['main_score']
  for p in points:
    point = check_task_outputs('rte', data_dir, task_dir / p['dir'], has_log=False)
    assert point['total_steps'] == 24 // p['batch_size']
  assert (task_dir / 'dev_predictions.tsv').read_text() == (
      task_dir / best['dir'] / 'dev_predictions.tsv').read_text()
  assert run_checkpoint.is_run_checkpoint(task_dir / summary['checkpoint'])
  assert summary['checkpoint'].startswith(best['dir'] + os.sep)


# --------------------------------------------------------------------------------------
# Initialisation from checkpoints.

def _tiny_mlm_params(config):
  # Distinct values, so a copy is told apart from a fresh initialisation.
  return helpers.params_like(transform.masked_lm(config), jnp.zeros((1, 8), jnp.int32),
                             seed=3, scale=1.0)


def _load_trunk(config, path):
  return transfer.load_trunk(path, config.model, encoder_dropout=config.dropout.encoder,
                             head_dropout=config.dropout.head)


def _check_trunk_copied(init, mlm_params):
  model = transform.classifier(init.model_config, 3)
  params = transfer.classifier_params(model, init, seed=0, length=SEQ)
  trunk = {m: v for m, v in params.items() if not transfer.is_head_module(m)}
  assert set(trunk) == set(init.params) and trunk
  for module, leaves in trunk.items():
    for name, value in leaves.items():
      np.testing.assert_array_equal(value, mlm_params[module][name])
  heads = [m for m in params if transfer.is_head_module(m)]
  assert heads and all(m not in mlm_params for m in heads)
  # The MLM decoder is reported unused.
  assert 'embedding_decoder' in init.unused
  assert any(m.startswith('basic_decoder') for m in init.unused)


@pytest.mark.slow
def test_init_from_a_project_mlm_checkpoint_copies_the_trunk_exactly(tmp_path, capsys):
  config = model_configs.tiny(max_seq_len=SEQ)
  mlm_params = _tiny_mlm_params(config)
  path = params_file.save(tmp_path / 'mlm.npz', mlm_params, config, step=5)
  init = _load_trunk(helpers.glue_tiny_config(), str(path))
  assert init.model_config.encoder.dropout_prob == 0.1
  assert init.model_config.classifier.head_dropout_prob == 0.1
  _check_trunk_copied(init, mlm_params)
  assert 'model config from it' in capsys.readouterr().out


@pytest.mark.slow
def test_init_from_a_deepmind_format_pickle_copies_the_trunk_exactly(tmp_path, monkeypatch):
  config = model_configs.tiny(max_seq_len=SEQ)
  # The released pickle is the language_mlm() model; a tiny one stands in for it here.
  monkeypatch.setattr(model_configs, 'language_mlm', lambda: model_configs.tiny(SEQ))
  mlm_params = _tiny_mlm_params(config)
  path = tmp_path / 'tiny.pickle'
  with open(path, 'wb') as f:
    pickle.dump({m: dict(v) for m, v in mlm_params.items()}, f)
  init = _load_trunk(helpers.glue_tiny_config(), str(path))
  _check_trunk_copied(init, mlm_params)


def test_paper_preset_has_table_13s_settings():
  c = glue_configs.get_config()   # the default preset
  helpers.assert_released_architecture(c.model)   # Table 11: the released model's trunk
  assert (c.train.epochs, c.optimizer.name, c.optimizer.warmup_steps,
          c.optimizer.weight_decay) == (10, 'lamb', 200, 0.01)
  assert tuple(c.sweep.batch_sizes) == (16, 32, 64)
  assert tuple(c.sweep.learning_rates) == (1e-4, 5e-5, 2e-5, 1e-5)
  assert c.train.batch_size in c.sweep.batch_sizes
  assert c.optimizer.learning_rate in c.sweep.learning_rates
  with pytest.raises(ValueError, match="unknown preset 'nope'.*known: cpu, paper, smoke"):
    glue_configs.get_config('nope')


def test_the_released_checkpoints_parameters_fill_the_paper_presets_trunk():
  released = helpers.released_param_shapes()   # the released pickle's names and shapes
  model_config = glue_configs.get_config('paper').model   # = configs.language_mlm()
  trunk = {f'{m}/{n}': shape for m, leaves in transfer.trunk_shapes(model_config).items()
           for n, shape in leaves.items()}
  assert trunk and all(released.get(path) == shape for path, shape in trunk.items())
  unused = {path.split('/')[0] for path in set(released) - set(trunk)}
  assert unused == {'basic_decoder', 'embedding_decoder'}   # the MLM decoder only


def test_bad_init_checkpoints_are_named(tmp_path):
  config = model_configs.tiny(max_seq_len=SEQ)
  with pytest.raises(params_file.CheckpointError, match='nothing.npz: no such checkpoint'):
    _load_trunk(helpers.glue_tiny_config(), str(tmp_path / 'nothing.npz'))
  params = _tiny_mlm_params(config)
  del params['perceiver_encoder/~/self_attention_1/mlp/linear']
  path = params_file.save(tmp_path / 'broken.npz', params, config)
  with pytest.raises(params_file.CheckpointError, match=(
      r'broken.npz \(the classifier trunk\) does not match the model: missing 2: '
      r'perceiver_encoder/~/self_attention_1/mlp/linear/b')):
    _load_trunk(helpers.glue_tiny_config(), str(path))
  params = _tiny_mlm_params(config)
  params['embed'] = {'embeddings': np.zeros((262, 16), np.float32)}
  path = params_file.save(tmp_path / 'misshaped.npz', params, config)
  with pytest.raises(params_file.CheckpointError, match=(
      r'misshaped.npz: entry params/embed/embeddings.npy has shape \[262, 16\], the model '
      r'needs \[262, 32\]')):
    _load_trunk(helpers.glue_tiny_config(), str(path))
  garbage = tmp_path / 'garbage.bin'
  garbage.write_bytes(b'not a checkpoint')
  with pytest.raises(params_file.CheckpointError, match='garbage.bin'):
    _load_trunk(helpers.glue_tiny_config(), str(garbage))


# --------------------------------------------------------------------------------------
# Pieces.

def test_encoding_in_chunks_pads_each_split_to_its_rounded_longest_example():
  task = glue_data.TASKS['rte']
  examples = [glue_data.Example(str(i), 'x' * (3 * i), 'yy', 'entailment') for i in range(9)]
  split = glue_data.Split('RTE/dev.tsv', examples, [], 9)
  whole = glue_inputs.encode_split(task, split, 'dev', max_seq_len=20, length_multiple=8, chunk=100)
  chunked = glue_inputs.encode_split(task, split, 'dev', max_seq_len=20, length_multiple=8, chunk=2)
  reference = glue_data.encode(examples, task, 20)
  for enc in (whole, chunked):
    assert enc.length == 20   # longest: 24 + 1 + 2 bytes, cut to 20
    np.testing.assert_array_equal(enc.input_ids, reference.input_ids)
    np.testing.assert_array_equal(enc.input_mask, reference.input_mask)
    assert enc.num_truncated == reference.num_truncated == 3
    assert enc.indices == [str(i) for i in range(9)]
  short = glue_inputs.encode_split(task, glue_data.Split('p', examples[:3], [], 3), 'dev', 64, 8)
  assert short.length == 16   # longest 6 + 1 + 2 = 9 bytes, rounded up to 16


def test_zero_weight_padding_rows_do_not_count():
  config = model_configs.tiny(max_seq_len=SEQ)
  model = transform.classifier(config, 2)
  rng = np.random.default_rng(0)
  ids = rng.integers(6, 200, size=(3, 16)).astype(np.int32)
  batch = {'input_ids': ids, 'input_mask': np.ones_like(ids),
           'labels': np.array([0, 1, 1], np.int32), 'weights': np.ones(3, np.float32)}
  # Padding rows with arbitrary content: only their zero weight matters.
  padded = {k: np.concatenate([v, v[:2][::-1]]) for k, v in batch.items()}
  padded['weights'][3:] = 0
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)
  loss_fn = jax.jit(glue_task.make_loss_fn(model, regression=False), static_argnums=3)
  loss, sums = loss_fn(params, None, batch, False)
  padded_loss, padded_sums = loss_fn(params, None, padded, False)
  np.testing.assert_allclose(padded_loss, loss, rtol=1e-6)
  assert padded_sums['correct'] == sums['correct']
  assert epochs.count_weights(padded) == epochs.count_weights(batch) == 3


def test_epochs_visit_every_example_once_in_a_seeded_order():
  split = glue_inputs.EncodedSplit('train', 'p', [str(i) for i in range(10)],
                                   np.arange(10, dtype=np.int16)[:, None],
                                   np.ones((10, 1), np.int8), np.arange(10, dtype=np.int32), 0)
  def train_batches(split, batch_size, seed, start_step=0):
    return epochs.seeded_epochs(len(split), batch_size, seed, start_step,
                                lambda rows: glue_inputs.host_batch(split, rows, batch_size))

  stream = train_batches(split, 4, seed=0)
  epoch1 = [next(stream) for _ in range(3)]
  epoch2 = [next(stream) for _ in range(3)]
  assert [step for _, step in epoch1 + epoch2] == [1, 2, 3, 4, 5, 6]
  # Resumed at step 3 (an epoch's end) or 4, the stream continues as it would have.
  resumed = train_batches(split, 4, seed=0, start_step=3)
  assert all(np.array_equal(a['labels'], b['labels'])
             for (a, _), (b, _) in zip(epoch2, [next(resumed) for _ in range(3)]))
  resumed = train_batches(split, 4, seed=0, start_step=4)
  assert np.array_equal(next(resumed)[0]['labels'], epoch2[1][0]['labels'])
  again = [b for b, _ in [next(train_batches(split, 4, seed=0))]]
  epoch1, epoch2 = [b for b, _ in epoch1], [b for b, _ in epoch2]
  seen = np.concatenate([b['labels'][b['weights'] > 0] for b in epoch1])
  assert sorted(seen) == list(range(10)) and len(epoch1) == 3
  assert epoch1[-1]['weights'].tolist() == [1, 1, 0, 0]
  assert all(np.array_equal(a['labels'], b['labels']) for a, b in zip(epoch1, again))
  assert not all(np.array_equal(a['labels'], b['labels']) for a, b in zip(epoch1, epoch2))


# --------------------------------------------------------------------------------------
# Errors.

def test_bad_input_is_an_error_naming_the_file_line_task_or_field(tmp_path):
  data_dir = write_task(tmp_path / 'glue', 'rte')
  config = helpers.glue_tiny_config()
  out = str(tmp_path / 'out')
  with pytest.raises(glue.GlueError, match="unknown task 'sst-2'; known tasks: cola, sst2, "
                     'mrpc, stsb, qqp, mnli, qnli, rte, wnli, or all'):
    glue.run('sst-2', config, str(data_dir), out)
  with pytest.raises(glue.GlueError, match='--data_dir .*nowhere: no such directory'):
    glue.run('rte', config, str(tmp_path / 'nowhere'), out)
  with pytest.raises(glue.GlueError, match=r'sst2: folder .*SST-2 not found'):
    glue.run('sst2', config, str(data_dir), out)
  (data_dir / 'RTE' / 'train.tsv').rename(data_dir / 'RTE' / 'train.tsv.bak')
  with pytest.raises(glue_data.GlueDataError, match=r'rte: file .*RTE/train\.tsv not found'):
    glue.run('rte', config, str(data_dir), out)
  (data_dir / 'RTE' / 'train.tsv.bak').rename(data_dir / 'RTE' / 'train.tsv')
  assert not os.path.exists(out + '/sst2')
  with pytest.raises(glue.GlueError, match='holds none of the GLUE task folders'):
    glue.run('all', config, str(tmp_path), out)
  with pytest.raises(glue.GlueError, match=r'train.batch_size=3 must be a positive '
                     r'multiple of devices \(1\) x train.grad_accum_steps \(2\)'):
    config = helpers.glue_tiny_config(**{'train.batch_size': 3, 'train.grad_accum_steps': 2})
    glue.run('rte', config, str(data_dir), out)
  with pytest.raises(glue.GlueError, match=r'data.max_seq_len=100 must be in \[2, 64\]'):
    glue.run('rte', helpers.glue_tiny_config(**{'data.max_seq_len': 100}), str(data_dir), out)
  dev = data_dir / 'RTE' / 'dev.tsv'
  lines = dev.read_text().splitlines()
  dev.write_text('\n'.join(lines[:3] + ['7\tonly two']) + '\n')
  with pytest.raises(glue_data.GlueDataError, match=r'RTE/dev\.tsv:4: 2 columns, expected 4'):
    glue.run('rte', config, str(data_dir), out)
  dev.write_text('\n'.join(lines[:3] + ['7\ta\tb\tmaybe']) + '\n')
  with pytest.raises(glue_data.GlueDataError, match=r"RTE/dev\.tsv:4: unknown label 'maybe'"):
    glue.run('rte', config, str(data_dir), out)


@pytest.mark.slow
def test_a_finished_task_is_kept_refused_or_retrained_and_cleaning_spares_other_files(
    tmp_path):
  data_dir = write_task(tmp_path / 'glue', 'wnli')
  task_dir = tmp_path / 'out' / 'wnli'
  (task_dir / 'checkpoint').mkdir(parents=True)
  ours = ['dev_metrics.json', 'metrics.jsonl', 'log.txt', 'dev_predictions.tsv',
          'checkpoint/ckpt_000000007/meta/metadata', 'resume/ckpt_000000003/params/x',
          'bs8_lr0.001/sweep.json', 'bs8_lr0.001/checkpoint/ckpt_000000003/meta/metadata']
  theirs = ['notes.txt', 'checkpoint/README', 'bs8_lr0.001/mine.npz']
  for name in ours + theirs:
    (task_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (task_dir / name).write_text('x')
  summary = {'task': 'wnli', 'results': {'wnli': {'accuracy': 0.25}}, 'wall_time_s': 1.0}
  (task_dir / 'dev_metrics.json').write_text(json.dumps(summary))
  # By default a finished task is skipped and its results reported.
  out = glue.run('wnli', helpers.glue_tiny_config(), str(data_dir), str(tmp_path / 'out'))
  assert out['results'] == {'wnli': {'accuracy': 0.25}}
  assert all((task_dir / name).exists() for name in ours)
  # --noresume refuses it, before touching anything.
  with pytest.raises(glue.GlueError, match='wnli already holds a finished run.*--overwrite'):
    glue.run('wnli', helpers.glue_tiny_config(), str(data_dir), str(tmp_path / 'out'), resume=False)
  assert all((task_dir / name).exists() for name in ours)
  runs.clean_task_dir(str(task_dir))
  assert not any((task_dir / name).exists() for name in ours)
  assert all((task_dir / name).exists() for name in theirs)


def _cli(*args):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  return subprocess.run([sys.executable, '-m', 'eval.glue', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_command_line_errors_are_one_line_without_a_traceback(tmp_path):
  unknown = _cli('--task=foo', f'--data_dir={tmp_path}', f'--workdir={tmp_path}/o')
  assert unknown.returncode == 1 and 'Traceback' not in unknown.stderr
  assert "error: unknown task 'foo'; known tasks: cola, sst2" in unknown.stderr
  typo = _cli('--task=rte', f'--data_dir={tmp_path}', f'--workdir={tmp_path}/o',
              '--config=eval/configs/glue.py:smoke', '--config.train.epochz=1')
  assert typo.returncode != 0 and 'epochz' in typo.stderr
  preset = _cli('--task=rte', f'--data_dir={tmp_path}', f'--workdir={tmp_path}/o',
                '--config=eval/configs/glue.py:nope')
  assert preset.returncode != 0 and "unknown preset 'nope'" in preset.stderr
  missing = _cli('--task=rte', f'--workdir={tmp_path}/o')
  assert missing.returncode != 0 and '--data_dir' in missing.stderr


@pytest.mark.slow
def test_command_line_fine_tunes_from_a_project_mlm_checkpoint(tmp_path):
  config = model_configs.tiny(max_seq_len=SEQ)
  path = params_file.save(tmp_path / 'mlm.npz', _tiny_mlm_params(config), config)
  data_dir = write_task(tmp_path / 'glue', 'wnli')
  run = _cli('--task=wnli', f'--data_dir={data_dir}', f'--workdir={tmp_path}/out',
             f'--init_checkpoint={path}', '--config=eval/configs/glue.py:smoke',
             '--config.train.epochs=1', '--config.train.batch_size=8', '--do_predict')
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'trunk (embed, perceiver_encoder, trainable_position_encoding; ' in run.stdout
  assert f'copied from {path}' in run.stdout
  assert 'not used from the checkpoint: basic_decoder' in run.stdout
  assert '[train] step 3/3 (100%)' in run.stdout and 'eta' in run.stdout
  check_task_outputs('wnli', data_dir, tmp_path / 'out' / 'wnli')
  assert (tmp_path / 'out' / 'submission' / 'WNLI.tsv').is_file()
  assert json.loads((tmp_path / 'out' / 'wnli' / 'dev_metrics.json').read_text())[
      'init'] == str(path)


_TWO_DEVICES = """
import sys
sys.path.insert(0, {root!r})
import jax
from eval.glue import app as glue
from tests import helpers
assert jax.local_device_count() == 2, jax.devices()
for data, fsdp in ((2, 1), (1, 2)):
  config = helpers.glue_tiny_config(**{{'train.epochs': 2, 'mesh.data': data,
                                       'mesh.fsdp': fsdp}})
  glue.run('wnli', config,
           {data_dir!r}, {out!r} + f'/data{{data}}_fsdp{{fsdp}}')
"""


@pytest.mark.slow
def test_two_devices_data_parallel_or_fsdp_give_the_one_device_run(tmp_path):
  """With dropout: its keys come from the step alone (perceiver.training.step), so every
  layout draws the same masks. Batches of 8 (4 per device), 20 examples: the last batch
  of each epoch is half padding."""
  data_dir = str(write_task(tmp_path / 'glue', 'wnli', num_train=20, num_dev=9))
  config = helpers.glue_tiny_config(**{'train.epochs': 2})
  assert config.dropout.encoder > 0 and config.dropout.head > 0
  glue.run('wnli', config, data_dir, str(tmp_path / 'one'))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  script = _TWO_DEVICES.format(root=str(ROOT), data_dir=data_dir, out=str(tmp_path / 'two'))
  done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                        text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  runs = {}
  for name in ('one', 'two/data2_fsdp1', 'two/data1_fsdp2'):
    task_dir = tmp_path / name / 'wnli'
    lines = (task_dir / 'metrics.jsonl').read_text().splitlines()
    runs[name] = ([json.loads(line) for line in lines],
                  (task_dir / 'dev_predictions.tsv').read_text())
  one, one_preds = runs.pop('one')
  for name, (other, other_preds) in runs.items():
    assert [r['step'] for r in other] == [r['step'] for r in one], name
    np.testing.assert_allclose([r['loss'] for r in other], [r['loss'] for r in one],
                               rtol=1e-4, err_msg=name)
    assert other_preds == one_preds, name


# --------------------------------------------------------------------------------------
# The real files.

_OTHER_FSDP = """
import os, sys, types
sys.path.insert(0, {root!r})
import jax
from eval.glue import app as glue
from perceiver.training import epochs
from tests import helpers
assert jax.local_device_count() == 2, jax.devices()
# The run below leaves its resume checkpoint, as one stopped after its last epoch would.
epochs.shutil = types.SimpleNamespace(rmtree=lambda path, ignore_errors=False: None)
config = helpers.glue_tiny_config(**{{'train.epochs': 1, 'mesh.fsdp': 1}})
glue.run('wnli', config, {data_dir!r}, {out!r})
os.remove(os.path.join({out!r}, 'wnli', 'dev_metrics.json'))
try:
  glue.run('wnli', helpers.glue_tiny_config(**{{'train.epochs': 1, 'mesh.fsdp': 2}}),
           {data_dir!r}, {out!r})
except glue.GlueError as e:
  print(f'REFUSED: {{e}}')
"""


@pytest.mark.slow
def test_a_resume_with_another_mesh_fsdp_is_refused_naming_the_field(tmp_path):
  data_dir = str(write_task(tmp_path / 'glue', 'wnli', num_train=16, num_dev=4))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  script = _OTHER_FSDP.format(root=str(ROOT), data_dir=data_dir, out=str(tmp_path / 'out'))
  done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                        text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  refused = [line for line in done.stdout.splitlines() if line.startswith('REFUSED: ')]
  assert len(refused) == 1, done.stdout[-3000:]
  assert re.fullmatch(r'REFUSED: \S+/wnli/resume/ckpt_\d+ was written by a run with other '
                      r'settings \(mesh\.fsdp=1 \(now 2\)\); pass --noresume to start over, '
                      r'or use another --workdir', refused[0]), refused[0]

@pytest.mark.slow
def test_end_to_end_on_the_real_rte_files(tmp_path):
  data_dir = helpers.glue_dir()
  config = helpers.glue_tiny_config(**{'data.max_seq_len': SEQ, 'train.batch_size': 16,
                          'train.log_every': 100, 'eval.batch_size': 64})
  out = glue.run('rte', config, str(data_dir), str(tmp_path / 'out'))
  summary = check_task_outputs('rte', data_dir, tmp_path / 'out' / 'rte')
  assert summary['total_steps'] == 2 * 156   # 2490 examples in batches of 16
  assert summary['num_examples'] == {'train': 2490, 'dev': 277}
  assert summary['num_truncated']['dev'] > 0 and summary['padded_length']['dev'] == SEQ
  assert 0.0 < out['results']['rte']['accuracy'] < 1.0


_FINETUNE = """
import sys
import time
sys.path.insert(0, {root!r})
from eval.glue import app as glue
from tests import helpers
glue.run('wnli', helpers.glue_tiny_config(**{{'train.epochs': 3, 'train.batch_size': 4,
                                 'eval.batch_size': 4}}), {data!r}, {out!r})
"""


@pytest.mark.slow
def test_a_fine_tune_killed_mid_way_resumes_to_the_uninterrupted_dev_metrics(tmp_path):
  """kill -9 after the first epoch's resume checkpoint; rerunning the same command
  continues from it and ends with exactly the dev metrics of a run never stopped."""
  data_dir = str(write_task(tmp_path / 'glue', 'wnli', num_train=24, num_dev=200))

  def start(out):
    script = _FINETUNE.format(root=str(ROOT), data=data_dir, out=str(out))
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    return subprocess.Popen([sys.executable, '-c', script], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  straight = start(tmp_path / 'straight')
  assert straight.wait(timeout=600) == 0, straight.stdout.read()[-3000:]
  killed = start(tmp_path / 'killed')
  resume_dir = tmp_path / 'killed' / 'wnli' / 'resume'
  deadline = time.monotonic() + 600
  while not list(resume_dir.glob('ckpt_*[0-9]')) and time.monotonic() < deadline:
    assert killed.poll() is None, killed.stdout.read()[-3000:]
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / 'killed' / 'wnli' / 'dev_metrics.json').exists(), (
      'the run finished before it was killed')
  again = start(tmp_path / 'killed')
  output, _ = again.communicate(timeout=600)
  assert again.returncode == 0, output[-3000:]
  assert re.search(r'resuming from .* at step (6|12) \(epoch (1|2) of 3 done\)', output)
  results = [json.loads((tmp_path / name / 'wnli' / 'dev_metrics.json').read_text())
             for name in ('straight', 'killed')]
  assert results[1]['results'] == results[0]['results']
  assert results[1]['epochs'] == results[0]['epochs']
  assert (tmp_path / 'killed' / 'wnli' / 'dev_predictions.tsv').read_text() == (
      tmp_path / 'straight' / 'wnli' / 'dev_predictions.tsv').read_text()
  assert not resume_dir.exists()   # removed once the task finished
  steps = [json.loads(line)['step'] for line in (
      tmp_path / 'killed' / 'wnli' / 'metrics.jsonl').read_text().splitlines()
      if json.loads(line)['kind'] == 'train']
  assert steps == sorted(set(steps))   # one record per step after the resume
