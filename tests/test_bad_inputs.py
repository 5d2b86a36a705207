"""Bad inputs, table by table: every command answers an expected failure with one
``error:`` line that names the field, flag, file or tensor, exits non-zero, and leaves
what earlier runs wrote as it was."""

import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
from contextlib import redirect_stderr

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval.glue import app as glue
from perceiver.params import params_file
from perceiver.command import cli
from perceiver import configs
from perceiver import convert
from perceiver import fill_mask
from perceiver.params import loading
from perceiver import transform
from perceiver.params import run_checkpoint
from perceiver.training import workdir_lock
from tests import helpers
from train import mlm
from train.configs import mlm as mlm_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _snapshot(directory):
  """{relative path: sha256} of every file under ``directory``."""
  out = {}
  for path in sorted(pathlib.Path(directory).rglob('*')):
    if path.is_file() and path.name != '.lock':
      out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def _run(command):
  """(exit status, stderr) of ``command`` under the commands' error policy."""
  stderr = io.StringIO()
  with redirect_stderr(stderr):
    status = cli.run(command)
  return status, stderr.getvalue()


def _one_error_line(stderr):
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr
  return lines[0]


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A workdir holding a short finished pretraining run."""
  tmp = tmp_path_factory.mktemp('mlm')
  workdir = tmp / 'run'
  mlm.train(helpers.mlm_tiny_config(tmp, steps=2, checkpoint_every=2), str(workdir))
  return tmp, workdir


_MLM_CASES = [
    ({'train.steps': -5}, 'train.steps must be an integer >= 1, got -5'),
    ({'optimizer.learning_rate': -1e-3}, 'optimizer.learning_rate must be a finite number > 0'),
    ({'optimizer.learning_rate': float('nan')}, 'optimizer.learning_rate must be a finite'),
    ({'train.batch_size': 0}, 'train.batch_size must be an integer >= 1, got 0'),
    ({'data.docs_per_example': 0}, 'data.docs_per_example must be an integer >= 1, got 0'),
    ({'train.checkpoint_every': 0}, 'train.checkpoint_every must be an integer >= 1, got 0'),
    ({'train.log_every': 0}, 'train.log_every must be an integer >= 1, got 0'),
    ({'data.block_size': 0}, 'data.block_size must be an integer >= 1, got 0'),
    ({'data.prefetch': 0}, 'data.prefetch must be an integer >= 1, got 0'),
    ({'data.streams': 0}, 'data.streams must be an integer >= 1, got 0'),
    ({'data.workers': -1}, 'data.workers must be an integer >= 0, got -1'),
    ({'masking.mask_prob': 1.5}, 'masking.mask_prob must be in (0, 1), got 1.5'),
    ({'optimizer.b2': 1.0}, 'optimizer.b2 must be in [0, 1), got 1.0'),
    ({'optimizer.decay_steps': 1}, 'optimizer.decay_steps must be an integer > '
                                   'optimizer.warmup_steps (2), got 1'),
    ({'optimizer.name': 'sgd'}, "optimizer.name must be 'lamb' or 'adamw', got 'sgd'"),
    ({'data.separator': 'tab'}, 'data.separator must be one of eos, newline, none, sep'),
    ({'train.batch_size': 3, 'train.grad_accum_steps': 2},
     'train.batch_size=3 must be a positive multiple of devices (1) x '
     'train.grad_accum_steps (2)'),
    ({'data.hosts': '2/2'}, "data.hosts='2/2': '2/2' is not INDEX/COUNT with INDEX < COUNT"),
    ({'model.compute_dtype': 'float16'}, "compute_dtype must be 'float32' or 'bfloat16'"),
    ({'model.kernels': 'gpu'}, 'kernels must be one of auto, reference, xla_cpu'),
    ({'train.stop_timeout_s': 0.0}, 'train.stop_timeout_s must be a finite number > 0'),
    ({'distributed.initialization_timeout_s': float('inf')},
     'distributed.initialization_timeout_s must be a finite number > 0'),
]


@pytest.mark.parametrize('overrides,message', _MLM_CASES,
                         ids=[','.join(c[0]) for c in _MLM_CASES])
@pytest.mark.slow
def test_train_mlm_refuses_bad_config_values_before_anything_runs(finished_run, overrides,
                                                                  message):
  tmp, workdir = finished_run
  before = _snapshot(workdir)
  config = helpers.mlm_tiny_config(tmp, steps=4)
  config.unlock()
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  status, stderr = _run(lambda: mlm.train(config, str(workdir)))
  assert status == 1 and message in _one_error_line(stderr)
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_train_mlm_names_bad_data_paths_and_rows(tmp_path):
  config = helpers.mlm_tiny_config(tmp_path, steps=2)
  config.unlock()
  cases = []
  config.data.sources.gen.paths = str(tmp_path)          # a directory
  cases.append((config.copy_and_resolve_references(), 'matches only directories'))
  config.data.sources.gen.paths = str(tmp_path / 'none*.jsonl')
  cases.append((config.copy_and_resolve_references(), "no file matches"))
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"text": "fine"}\n{"text": broken\n')
  config.data.sources.gen.paths = str(bad)
  cases.append((config.copy_and_resolve_references(), f'{bad}:2: not a JSON object'))
  config.data.workers = 1    # the same error, raised in a worker process
  cases.append((config.copy_and_resolve_references(), f'{bad}:2: not a JSON object'))
  config.data.workers = 0
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  no_text = tmp_path / 'wiki.parquet'
  pq.write_table(pa.table({'title': ['A'], 'body': ['words']}), no_text)
  config.data.sources.gen.paths = str(no_text)
  cases.append((config.copy_and_resolve_references(),
                f"{no_text}: Parquet file has no 'text' column (columns: title, body)"))
  not_parquet = tmp_path / 'broken.parquet'
  not_parquet.write_bytes(b'not parquet at all')
  config.data.sources.gen.paths = str(not_parquet)
  cases.append((config.copy_and_resolve_references(),
                f'{not_parquet}: not a readable Parquet file'))
  for case, message in cases:
    status, stderr = _run(lambda case=case: mlm.train(case, str(tmp_path / 'w')))
    assert status == 1 and message in _one_error_line(stderr), stderr


@pytest.mark.slow
def test_train_mlm_names_an_unwritable_workdir_and_a_busy_one(finished_run, tmp_path):
  tmp, workdir = finished_run
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  config = helpers.mlm_tiny_config(tmp, steps=4)
  status, stderr = _run(lambda: mlm.train(config, str(blocker / 'w')))
  line = _one_error_line(stderr)
  assert status == 1 and f'--workdir={blocker / "w"}: cannot create' in line, line
  before = _snapshot(workdir)
  with workdir_lock.WorkdirLock(str(workdir)):   # another run holds it
    status, stderr = _run(lambda: mlm.train(helpers.mlm_tiny_config(tmp, steps=4), str(workdir)))
  assert status == 1 and f'{workdir} is in use by pid {os.getpid()}' in _one_error_line(
      stderr)
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_resume_refuses_a_changed_batch_size_unless_allowed(finished_run, tmp_path):
  tmp, workdir = finished_run
  run = tmp_path / 'run'
  os.makedirs(run)
  for name in os.listdir(workdir):
    if name.startswith('ckpt_'):
      shutil.copytree(workdir / name, run / name)
  config = helpers.mlm_tiny_config(tmp, steps=4, batch_size=8)
  status, stderr = _run(lambda: mlm.train(config, str(run)))
  assert status == 1
  assert 'written with other settings: train.batch_size' in _one_error_line(stderr)
  assert 'train.allow_changes' in stderr
  mlm.train(helpers.mlm_tiny_config(tmp, steps=3, batch_size=8, allow_changes=True), str(run))
  assert run_checkpoint.is_run_checkpoint(run / 'ckpt_000000003')


def _largest_file(directory):
  return max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
  """A bit flipped in the newest checkpoint's largest array file (caught by the saved
  fingerprints), that file truncated, its metadata emptied: each time the run moves it
  aside, resumes from the one before, and redoes the steps to the same parameters."""
  config = helpers.mlm_tiny_config(tmp_path, steps=4, checkpoint_every=2)
  workdir = tmp_path / 'run'
  mlm.train(config, str(workdir))
  newest = workdir / 'ckpt_000000004'
  straight = loading.load_any(newest)[0]
  for damage in ('flip', 'truncate', 'empty'):
    victim = (newest / 'meta' / 'metadata' if damage == 'empty' else
              _largest_file(newest / 'params'))
    raw = bytearray(victim.read_bytes())
    if damage == 'flip':
      raw[len(raw) // 2] ^= 0x10
    elif damage == 'truncate':
      raw = raw[:len(raw) // 3]
    else:
      raw = bytearray()
    victim.write_bytes(bytes(raw))
    capsys.readouterr()
    mlm.train(config, str(workdir))   # resumes from step 2, redoes steps 3-4
    out = capsys.readouterr().out
    assert f'{newest} does not read back' in out and 'moved aside to' in out, (damage, out)
    assert 'resuming from' in out and 'ckpt_000000002 at step 2' in out
    aside = pathlib.Path(str(newest) + '.corrupt')
    assert (aside / victim.relative_to(newest)).read_bytes() == bytes(raw)   # kept, renamed
    shutil.rmtree(aside)
    again = loading.load_any(newest)[0]
    for module in straight:
      for name in straight[module]:
        np.testing.assert_array_equal(again[module][name], straight[module][name])
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in records if r['kind'] == 'train']
  assert steps == sorted(set(steps)) == [1, 2, 3, 4]   # one record per step


# --------------------------------------------------------------------------------------
# Checkpoint files.

def _tiny_params(config):
  return helpers.params_like(transform.masked_lm(config), jnp.zeros((1, 8), jnp.int32))


@pytest.mark.slow
def test_checkpoint_loaders_check_declared_sizes_and_refuse_nan(tmp_path):
  config = configs.tiny()
  params = _tiny_params(config)
  good = params_file.save(tmp_path / 'good.npz', params, config)
  raw = pathlib.Path(good).read_bytes()
  (tmp_path / 'cut.npz').write_bytes(raw[:len(raw) // 2])
  with pytest.raises(params_file.CheckpointError, match=r'cut\.npz: not a perceiver-io'):
    loading.load_any(tmp_path / 'cut.npz')
  # An .npy header claiming 10^12 elements (the entry's size is unchanged).
  header = np.lib.format.header_data_from_array_1_0(np.zeros((262, 32), np.float32))
  huge = dict(header, shape=(10 ** 12,))
  with zipfile.ZipFile(tmp_path / 'huge.npz', 'w') as out, zipfile.ZipFile(good) as src:
    for item in src.infolist():
      data = src.read(item.filename)
      if item.filename == 'params/embed/embeddings.npy':
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, huge)
        data = buffer.getvalue() + data[len(buffer.getvalue()):]
      out.writestr(item, data)
  with pytest.raises(params_file.CheckpointError,
                     match=r'params/embed/embeddings\.npy declares \[1000000000000\]'):
    params_file.load(tmp_path / 'huge.npz')
  # A compressed entry inflating far past what the model's shape allows.
  with zipfile.ZipFile(tmp_path / 'bomb.npz', 'w') as out, zipfile.ZipFile(good) as src:
    for item in src.infolist():
      data = src.read(item.filename)
      if item.filename == 'params/embed/embeddings.npy':
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.zeros((262, 4096), np.float32))
        data = buffer.getvalue()
      out.writestr(item.filename, data, compress_type=zipfile.ZIP_DEFLATED)
  with pytest.raises(params_file.CheckpointError,
                     match=r'embeddings\.npy has shape \[262, 4096\], the model needs '
                           r'\[262, 32\]'):
    params_file.load(tmp_path / 'bomb.npz')
  nan = jax.tree.map(np.array, params)
  nan['perceiver_encoder/~/cross_attention/mlp/linear']['w'][0, 0] = np.nan
  params_file.save(tmp_path / 'nan.npz', nan, config)
  message = (r'non-finite values \(NaN or infinity\) in 1 parameter\(s\): '
             r'perceiver_encoder/~/cross_attention/mlp/linear/w')
  with pytest.raises(params_file.CheckpointError, match=message):
    loading.load_any(tmp_path / 'nan.npz')
  with open(tmp_path / 'nan.pickle', 'wb') as f:
    pickle.dump({m: dict(v) for m, v in nan.items()}, f)
  before = _snapshot(tmp_path)
  status, stderr = _run(lambda: convert.convert('deepmind', str(tmp_path / 'nan.pickle'),
                                                str(tmp_path / 'out.npz'),
                                                config='tiny'))
  assert status == 1 and 'nan.pickle: non-finite values' in _one_error_line(stderr)
  assert _snapshot(tmp_path) == before   # nothing written


# --------------------------------------------------------------------------------------
# fill_mask.

@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('fill')
  config = configs.tiny()
  return str(params_file.save(tmp / 'tiny.npz', _tiny_params(config), config)), tmp


@pytest.mark.parametrize('text,spans,message', [
    ('some [[]] words', [], 'the span ending at byte 7 is empty'),
    ('some [[wo[[r]]ds]] here', [], '"[[" at byte 9 opens a span inside another'),
    ('some [[words', [], 'a "[[" has no closing "]]"'),
    ('some words]]', [], '"]]" at byte 10 closes no span'),
    ('some [[words]]', ['3:7'], 'spans 3:7 and 5:10 overlap'),
    ('some words', ['4:99'], "--span='4:99': needs 0 <= START < END <= 10"),
    ('some words', [], 'nothing to fill'),
    ('x' * 70 + '[[y]]', [], '--text is 71 bytes; the model reads at most 64'),
])
def test_fill_mask_refuses_bad_spans_and_texts(tiny_checkpoint, text, spans, message):
  path, _ = tiny_checkpoint
  status, stderr = _run(lambda: fill_mask._command(path, text, spans))
  assert status == 1 and message in _one_error_line(stderr)


@pytest.mark.slow
def test_fill_mask_checks_the_text_before_the_checkpoint_and_names_bad_checkpoints(
    tiny_checkpoint):
  path, tmp = tiny_checkpoint
  missing = str(tmp / 'missing.npz')
  status, stderr = _run(lambda: fill_mask._command(missing, 'a [[]] b', []))
  assert status == 1 and 'is empty' in stderr   # the text first, not the missing file
  status, stderr = _run(lambda: fill_mask._command(missing, 'a [[b]]', []))
  assert status == 1 and f'{missing}: no such checkpoint' in _one_error_line(stderr)
  config = configs.tiny()
  classifier = jax.device_get(transform.classifier(config, 2).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  clf = str(params_file.save(tmp / 'clf.npz', classifier, config, num_outputs=2))
  status, stderr = _run(lambda: fill_mask._command(clf, 'a [[b]]', []))
  line = _one_error_line(stderr)
  assert status == 1 and 'clf.npz (the masked language model) does not match' in line
  assert 'missing' in line and 'basic_decoder' in line
  # Invalid UTF-8 on the command line reaches Python as surrogate escapes: the bytes are
  # read as given.
  status, stderr = _run(lambda: fill_mask._command(path, 'caf\udce9 [[x]]', []))
  assert status == 0, stderr


@pytest.mark.slow
def test_fill_mask_command_line_takes_invalid_utf8(tiny_checkpoint):
  path, _ = tiny_checkpoint
  done = subprocess.run([sys.executable.encode(), b'-m', b'perceiver.fill_mask',
                         f'--checkpoint={path}'.encode(), b'--text=caf\xe9 [[ au lait]]'],
                        cwd=ROOT, capture_output=True, timeout=300)
  assert done.returncode == 0, done.stderr.decode(errors='replace')[-2000:]
  assert b"span 5:13 was ' au lait'" in done.stdout
  done = subprocess.run([sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
                         '--text=no [[]] span'], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 1 and _one_error_line(done.stderr)
  assert 'Traceback' not in done.stderr
  verbose = subprocess.run([sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
                            '--text=no [[]] span', '--verbose'], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
  assert verbose.returncode != 0 and 'Traceback' in verbose.stderr


# --------------------------------------------------------------------------------------
# eval.glue.

@pytest.mark.parametrize('overrides,message', [
    ({'optimizer.learning_rate': -5e-5}, 'optimizer.learning_rate must be a finite number'),
    ({'train.epochs': 0}, 'train.epochs must be an integer >= 1, got 0'),
    ({'train.log_every': 0}, 'train.log_every must be an integer >= 1, got 0'),
    ({'eval.batch_size': 0}, 'eval.batch_size must be an integer >= 1, got 0'),
    ({'dropout.head': 1.0}, 'dropout.head must be in [0, 1), got 1.0'),
])
def test_eval_glue_refuses_bad_config_values(tmp_path, overrides, message):
  data_dir = helpers.write_glue_task(tmp_path / 'glue', 'wnli')
  status, stderr = _run(lambda: glue.run('wnli', helpers.glue_tiny_config(**overrides),
                                         str(data_dir), str(tmp_path / 'out')))
  assert status == 1 and message in _one_error_line(stderr)
  assert not (tmp_path / 'out').exists()


def test_eval_glue_all_checks_every_task_before_training_any(tmp_path):
  data_dir = tmp_path / 'glue'
  helpers.write_glue_task(data_dir, 'rte')
  helpers.write_glue_task(data_dir, 'wnli')
  dev = data_dir / 'WNLI' / 'dev.tsv'
  lines = dev.read_text().splitlines()
  dev.write_text('\n'.join(lines[:3] + ['7\tonly two']) + '\n')
  status, stderr = _run(lambda: glue.run('all', helpers.glue_tiny_config(), str(data_dir),
                                         str(tmp_path / 'out')))
  assert status == 1 and r'WNLI/dev.tsv:4: 2 columns, expected 4' in _one_error_line(stderr)
  assert not (tmp_path / 'out' / 'rte' / 'dev_metrics.json').exists()   # nothing trained


def test_eval_glue_names_a_workdir_it_cannot_create(tmp_path):
  data_dir = helpers.write_glue_task(tmp_path / 'glue', 'wnli')
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  status, stderr = _run(lambda: glue.run('wnli', helpers.glue_tiny_config(), str(data_dir),
                                         str(blocker / 'out')))
  line = _one_error_line(stderr)
  assert status == 1 and f'--workdir={blocker / "out"}: cannot create' in line, line
  assert blocker.read_text() == 'x'



@pytest.mark.slow
def test_eval_glue_and_tagging_refuse_to_start_without_room_for_their_checkpoints(
    tmp_path, monkeypatch):
  import shutil  # pylint: disable=import-outside-toplevel
  from eval.tagging import app as tagging  # pylint: disable=import-outside-toplevel
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda p: real(p)._replace(free=100 * 1024))   # 100 KiB free
  data_dir = helpers.write_glue_task(tmp_path / 'glue', 'wnli')
  tag_dir = helpers.write_tagging_context_task(tmp_path / 'conll', 4, num_dev=3)
  for command, out in (
      (lambda out: glue.run('wnli', helpers.glue_tiny_config(), str(data_dir), out), 'glue'),
      (lambda out: tagging.run(helpers.tagging_tiny_config(), tag_dir, out), 'tagging')):
    status, stderr = _run(lambda: command(str(tmp_path / out)))
    line = _one_error_line(stderr)
    assert status == 1 and line.startswith('error: --workdir (') and (
        'the best and resume checkpoints' in line and 'has 0.1 MiB free' in line), line
    assert not list((tmp_path / out).rglob('ckpt_*')), out

# --------------------------------------------------------------------------------------
# Flags and config files: one error line naming the flag, before anything runs.

def _ml_collections_error(config, path):
  """The exception ml_collections raises for an override of a field ``config`` lacks."""
  from ml_collections.config_flags import config_path  # pylint: disable=import-outside-toplevel
  try:
    config_path.get_type(path, config)
  except (KeyError, AttributeError) as e:
    return e
  raise AssertionError(f'{path} was found')


@pytest.mark.parametrize('argv,path,message', [
    (['x', '--config.train.stepz=10'], 'train.stepz',
     "--config.train.stepz=10: no config field 'train.stepz' (did you mean 'train.steps'?)"),
    (['x', '--workdir=w', '--config.trian.steps', '3'], 'trian.steps',
     "--config.trian.steps: no config field 'trian.steps' (did you mean 'train.steps'?)"),
    (['x', '--config.optimizer.zzz=1'], 'optimizer.zzz',
     "--config.optimizer.zzz=1: no config field 'optimizer.zzz'"),
])
def test_an_unknown_config_field_is_named_with_its_flag_and_hint(argv, path, message):
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({'train': {'steps': 1, 'batch_size': 2},
                                      'optimizer': {'learning_rate': 1.0}})
  assert cli._unknown_field(_ml_collections_error(config, path), argv) == message


def test_a_renamed_config_field_names_its_new_name():
  argv = ['x', '--config.data.shuffle_block=16']
  error = _ml_collections_error(mlm_configs.get_config('smoke'), 'data.shuffle_block')
  assert cli._unknown_field(error, argv, mlm.RENAMED_FIELDS) == (
      "--config.data.shuffle_block=16: no config field 'data.shuffle_block' "
      "(renamed 'data.block_size')")


def test_a_config_file_traceback_is_cut_to_its_last_line():
  error = ValueError("flag --config=c.py:nope: Error whilst parsing config file:\n\n"
                     "Traceback (most recent call last):\n  File \"c.py\", line 3\n"
                     "ValueError: unknown preset 'nope'; known: a, b\n")
  assert cli._flag_error_line(error) == (
      "--config=c.py:nope: the config file does not load: unknown preset 'nope'; known: a, b")
  assert cli._flag_error_line(ValueError('flag --x=y: bad\n  value')) == '--x=y: bad value'


_FLAG_CASES = [
    (['train.mlm', '--config.train.stepz=10'],
     "--config.train.stepz=10: no config field 'train.stepz' (did you mean 'train.steps'?)"),
    (['train.mlm', '--config=train/configs/mlm.py:nope'],
     "--config=train/configs/mlm.py:nope: the config file does not load: unknown preset "
     "'nope'"),
    (['train.mlm', '--config=missing_config.py'],
     "--config=missing_config.py: the config file does not load: [Errno 2] No such file"),
    (['train.mlm', '--config.train.steps=abc'], "--config.train.steps=abc: invalid literal"),
    (['train.mlm', '--config=README.md'],
     '--config=README.md: the config file does not load: SyntaxError: '),
    (['train.mlm', '--stepz=3'], "Unknown command line flag 'stepz'"),
    (['eval.glue', '--task=rte', '--config.train.epochz=1'],
     "--config.train.epochz=1: no config field 'train.epochz' (did you mean 'train.epochs'?)"),
    (['eval.mlm', '--data=x'], '--checkpoint'),
    (['perceiver.convert', '--from=hf', '--src=a'], '--dst'),
]


@pytest.mark.slow
@pytest.mark.parametrize('argv,message', _FLAG_CASES, ids=[' '.join(c[0]) for c in _FLAG_CASES])
def test_commands_answer_bad_flags_and_config_files_with_one_line(tmp_path, argv, message):
  done = subprocess.run([sys.executable, '-m', *argv, f'--workdir={tmp_path / "w"}']
                        if argv[0] in ('train.mlm', 'eval.glue') else
                        [sys.executable, '-m', *argv], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-2000:]
  assert message in _one_error_line(done.stderr)
  assert not (tmp_path / 'w').exists()


# --------------------------------------------------------------------------------------
# Signals at any moment. The guard changes process-wide handlers, so each case runs in
# its own small Python process (no JAX: about a second each).

_GUARDED = '''
import gc, hashlib, os, signal, sys, threading, time
from perceiver.command import signal_guard
signal_guard.install(stop_status={stop_status})
from perceiver.command import cli
{body}
'''


def _guarded(body, stop_status='None'):
  done = subprocess.run([sys.executable, '-c', _GUARDED.format(body=body,
                                                               stop_status=stop_status)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  return done.returncode, done.stderr


def test_a_signal_while_starting_ends_the_command_at_once():
  status, stderr = _guarded('os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\n'
                            'print("not stopped")', stop_status=0)
  assert (status, stderr) == (0, 'SIGTERM received while starting: stopped; nothing was '
                                 'written\n')
  status, stderr = _guarded('os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)')
  assert status == 128 + signal.SIGINT
  assert _one_error_line(stderr) == ('error: interrupted (SIGINT received while starting): '
                                     'nothing was written')


def test_a_signal_during_the_command_is_reported_with_what_was_kept():
  body = '''
def command():
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(30)
sys.exit(cli.run(command, saved='the last checkpoint in w is kept', stop_status={s}))
'''
  status, stderr = _guarded(body.format(s=0))
  assert (status, stderr) == (0, 'SIGTERM received before the command finished: stopped; '
                                 'nothing was lost; the last checkpoint in w is kept\n')
  status, stderr = _guarded(body.format(s=None))
  assert status == 128 + signal.SIGTERM
  assert _one_error_line(stderr) == ('error: interrupted (SIGTERM received): the command did '
                                     'not finish; the last checkpoint in w is kept')


def test_a_second_signal_ends_a_native_call_at_once():
  # hashlib hashes a large buffer without the GIL and without looking at signals: the
  # Python handler cannot run until it returns (about a second per pass).
  body = '''
def kill_twice():
  time.sleep(0.1)
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.05)
  os.kill(os.getpid(), signal.SIGTERM)

def command():
  data = b'x' * (1 << 29)
  threading.Thread(target=kill_twice).start()
  started = time.monotonic()
  for _ in range(20):
    hashlib.sha256(data).hexdigest()
  print('native calls ran to the end')
sys.exit(cli.run(command, saved='kept', stop_status=0))
'''
  status, stderr = _guarded(body)
  assert status == 128 + signal.SIGTERM, stderr
  assert _one_error_line(stderr) == 'error: SIGTERM received twice: stopped at once; kept'


def test_a_stop_dropped_inside_a_garbage_collector_callback_is_delivered_again():
  body = '''
def callback(phase, info):
  if phase == 'start' and not fired:
    fired.append(1)
    os.kill(os.getpid(), signal.SIGTERM)   # the handler runs here, inside the callback
    sum(range(1000))

fired = []
gc.callbacks.append(callback)

def command():
  gc.collect()
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    sum(range(1000))
  print('not stopped')
sys.exit(cli.run(command, stop_status=0))
'''
  status, stderr = _guarded(body)
  assert (status, stderr) == (0, 'SIGTERM received before the command finished: stopped; '
                                 'nothing was lost\n')


def _start(argv, tmp_path):
  """A command started in the background, its stdout unbuffered and readable as it runs."""
  out = open(tmp_path / 'stdout', 'w')   # pylint: disable=consider-using-with
  err = open(tmp_path / 'stderr', 'w')   # pylint: disable=consider-using-with
  process = subprocess.Popen([sys.executable, '-m', *argv], cwd=ROOT, stdout=out,
                             stderr=err, env=dict(os.environ, PYTHONUNBUFFERED='1'))
  return process


def _wait_for(process, path, text, timeout=300):
  import time  # pylint: disable=import-outside-toplevel
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if text in path.read_text():
      return
    assert process.poll() is None, path.read_text()
    time.sleep(0.05)
  raise AssertionError(f'{text!r} did not appear in {path}')


@pytest.mark.slow
def test_train_mlm_sigterm_during_set_up_exits_0_and_says_nothing_was_lost(tmp_path):
  workdir = tmp_path / 'run'
  process = _start(['train.mlm', '--config=train/configs/mlm.py:smoke',
                    f'--workdir={workdir}'], tmp_path)
  _wait_for(process, tmp_path / 'stdout', 'new run in')   # set-up, before any step
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=300) == 0
  lines = [l for l in (tmp_path / 'stderr').read_text().splitlines()
           if not l.startswith(('I', 'W')) or l.startswith('SIGTERM')]
  assert lines == [f'SIGTERM received before the command finished: stopped; nothing was '
                   f'lost; the last complete checkpoint in {workdir} is kept'], lines
  assert not list(workdir.glob('ckpt_*'))


@pytest.mark.slow
def test_eval_mlm_says_it_was_interrupted(tiny_checkpoint, tmp_path):
  path, _ = tiny_checkpoint
  text = tmp_path / 'text.txt'
  text.write_text('\n\n'.join(f'document {i} ' + 'words and more words ' * 50
                              for i in range(3000)))
  out = tmp_path / 'scores.json'
  process = _start(['eval.mlm', f'--checkpoint={path}', f'--data={text}', '--batch_size=1',
                    '--seq_len=64', f'--out={out}'], tmp_path)
  _wait_for(process, tmp_path / 'stderr', 'windows')   # a progress line: it is scoring
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=300) == 128 + signal.SIGTERM
  line = (tmp_path / 'stderr').read_text().strip().splitlines()[-1]
  assert line == 'error: interrupted (SIGTERM received): the command did not finish', line
  assert not out.exists()


# --------------------------------------------------------------------------------------
# Distributed start-up: bounded, and the error names the address and what it waited for.

@pytest.mark.slow
@pytest.mark.parametrize('process_id,waited', [
    (1, 'process 1 of 2 waited 3 s for the coordinator at {address} to answer'),
    (0, 'process 0 of 2 waited 3 s for every other process to connect to the coordinator '
        'it serves at {address}'),
])
def test_distributed_start_up_gives_up_naming_the_address(tmp_path, process_id, waited):
  import socket  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  with socket.socket() as probe:   # a port nobody listens on (closed again at once)
    probe.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{probe.getsockname()[1]}'
  started = time.monotonic()
  done = subprocess.run(
      [sys.executable, '-m', 'train.mlm', f'--workdir={tmp_path / "w"}',
       '--config.distributed.enabled=true',
       f'--config.distributed.coordinator_address={address}',
       '--config.distributed.num_processes=2',
       f'--config.distributed.process_id={process_id}',
       '--config.distributed.initialization_timeout_s=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  assert time.monotonic() - started < 120   # not JAX's 300 s
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: distributed start-up: {waited.format(address=address)}'
                         ), last
  assert 'distributed.initialization_timeout_s' in last
  assert 'Traceback' not in done.stderr and 'Check failure' not in done.stderr
  assert not (tmp_path / 'w').exists()


# --------------------------------------------------------------------------------------
# Files told apart by content: every message names what the file is and what was expected.

def _kinds_of_files(directory, tiny_npz):
  """{name: path} of files that are not what their names say."""
  import struct  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(directory)
  files = {}
  files['empty'] = directory / 'empty.npz'
  files['empty'].write_bytes(b'')
  files['random'] = directory / 'random.npz'
  files['random'].write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096,
                                                                       dtype=np.uint8)))
  files['numpy'] = directory / 'arrays.npz'
  np.savez(files['numpy'], a=np.zeros(3))
  files['zip'] = directory / 'notes.npz'
  with zipfile.ZipFile(files['zip'], 'w') as zf:
    zf.writestr('readme.txt', 'hello')
  files['safetensors'] = directory / 'weights.safetensors'
  header = b'{"__metadata__":{}}'
  files['safetensors'].write_bytes(struct.pack('<Q', len(header)) + header)
  files['project_as_pickle'] = directory / 'project.pickle'
  files['project_as_pickle'].write_bytes(pathlib.Path(tiny_npz).read_bytes())
  files['pickle_as_npz'] = directory / 'params.npz'
  with open(files['pickle_as_npz'], 'wb') as f:
    pickle.dump({'embed': {'embeddings': np.zeros((2, 2), np.float32)}}, f, protocol=4)
  files['directory'] = directory / 'outputs'
  (files['directory'] / 'ckpt_12.npz').mkdir(parents=True)   # not ckpt_<step>/ either
  return files


_ANY_CHECKPOINT = ("expected this project's checkpoint, DeepMind's pickle or a Hugging Face "
                   'directory')


@pytest.mark.parametrize('name,message', [
    ('empty', f'empty.npz: an empty file (0 bytes); {_ANY_CHECKPOINT}'),
    ('random', 'random.npz: not a checkpoint format this project reads (it starts with b'),
    ('numpy', 'arrays.npz: a numpy .npz archive not written by this project (no '
              f'metadata.json); {_ANY_CHECKPOINT}'),
    ('zip', f'notes.npz: a zip archive that is not a checkpoint; {_ANY_CHECKPOINT}'),
    ('safetensors', 'weights.safetensors: a safetensors file without config.json beside it'),
    ('directory', 'outputs: a directory that is no checkpoint (no config.json: not a '
                  'Hugging Face checkpoint; no meta/metadata: not a run checkpoint; no '
                  'ckpt_<step>/ in it: not a run directory)'),
])
def test_load_any_names_what_a_file_is(tiny_checkpoint, tmp_path, name, message):
  path, _ = tiny_checkpoint
  files = _kinds_of_files(tmp_path, path)
  with pytest.raises(params_file.CheckpointError) as raised:
    loading.load_any(files[name])
  assert message in str(raised.value)
  assert 'pickle' not in str(raised.value).split(';')[0]   # not "not a safe ... pickle"


@pytest.mark.parametrize('source,name,message', [
    ('deepmind', 'project_as_pickle', "project.pickle: this project's checkpoint (a zip of "
                                      ".npy arrays and metadata.json), not DeepMind's "
                                      'parameter pickle: use --from=project'),
    ('deepmind', 'random', "random.npz: not a checkpoint format this project reads"),
    ('project', 'pickle_as_npz', "params.npz: a Python pickle, not this project's checkpoint (a "
                                 'parameter file or a run checkpoint): use --from=deepmind'),
    ('project', 'empty', "empty.npz: an empty file (0 bytes), not this project's checkpoint"),
    ('hf', 'project_as_pickle', 'not a Hugging Face directory (or its weights file with '
                                'config.json beside it): use --from=project'),
])
def test_convert_names_what_src_is_and_the_from_that_reads_it(tiny_checkpoint, tmp_path,
                                                              source, name, message):
  path, _ = tiny_checkpoint
  files = _kinds_of_files(tmp_path, path)
  before = _snapshot(tmp_path)
  status, stderr = _run(lambda: convert.convert(source, str(files[name]),
                                                str(tmp_path / 'out.npz'), config='tiny'
                                                if source == 'deepmind' else None))
  line = _one_error_line(stderr)
  assert status == 1 and f'--src={files[name]}' in line and message in line, line
  assert _snapshot(tmp_path) == before


def test_a_checkpoint_without_a_config_is_named_by_every_command(tiny_checkpoint, tmp_path):
  from eval import mlm as eval_mlm  # pylint: disable=import-outside-toplevel
  path, _ = tiny_checkpoint
  broken = tmp_path / 'noconfig.npz'
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, 'w') as out:
    for item in src.infolist():
      data = src.read(item.filename)
      if item.filename == 'metadata.json':
        header = json.loads(data)
        del header['config']
        data = json.dumps(header).encode()
      out.writestr(item, data)
  text = tmp_path / 'text.txt'
  text.write_text('some words here\n')
  message = f'{broken}: metadata.json holds no model config'
  for command in (lambda: fill_mask._command(str(broken), 'a [[b]]', []),
                  lambda: convert.convert('project', str(broken), str(tmp_path / 'o.npz')),
                  lambda: eval_mlm.run(str(broken), str(text))):
    status, stderr = _run(command)
    assert status == 1 and message in _one_error_line(stderr), stderr


@pytest.mark.slow
def test_a_resume_whose_only_checkpoint_is_corrupt_says_it_starts_over(finished_run, tmp_path,
                                                                        capsys):
  tmp, workdir = finished_run
  run = tmp_path / 'run'
  run.mkdir()
  newest = sorted(workdir.glob('ckpt_*[0-9]'))[-1]
  shutil.copytree(newest, run / newest.name)
  victim = _largest_file(run / newest.name / 'params')
  victim.write_bytes(victim.read_bytes()[:1000])   # truncated
  capsys.readouterr()
  mlm.train(helpers.mlm_tiny_config(tmp, steps=1), str(run))
  out = capsys.readouterr().out
  assert (f'{run / newest.name} does not read back' in out and
          'no other checkpoint is left: starting a new run from step 0' in out), out
  assert 'the checkpoint before it' not in out
  assert 'new run in' in out and run_checkpoint.is_run_checkpoint(run / 'ckpt_000000001')


# --------------------------------------------------------------------------------------
# Late checks made early: outputs, metrics files and free space, before the work starts.

def test_eval_mlm_checks_out_before_reading_the_checkpoint(tmp_path):
  from eval import mlm as eval_mlm  # pylint: disable=import-outside-toplevel
  text = tmp_path / 'text.txt'
  text.write_text('some words here\n')
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  missing = str(tmp_path / 'missing.npz')   # would fail second: --out is named first
  status, stderr = _run(lambda: eval_mlm.run(missing, str(text), str(blocker / 'out.json')))
  line = _one_error_line(stderr)
  assert status == 1 and f'--out={blocker / "out.json"}: cannot write there' in line, line
  status, stderr = _run(lambda: eval_mlm.run(missing, str(text), str(tmp_path)))
  assert status == 1 and f'--out={tmp_path}: is a directory' in _one_error_line(stderr)
  assert blocker.read_text() == 'x'


_GOOD_RECORD = '{"kind": "train", "step": 1, "loss": 2.0, "accuracy": 0.1, "elapsed_s": 3}'


@pytest.mark.parametrize('content,message', [
    (_GOOD_RECORD.encode() + b'\n{"kind": "train", "step": 2, "note": "caf\xe9"}\n',
     'metrics.jsonl:2: not UTF-8 text (byte 42 of the line)'),
    (_GOOD_RECORD.encode() + b'\n{"kind": "train", "step": 2, "loss": "2.5", "time": 1}\n',
     "metrics.jsonl:2: field 'loss' is '2.5', not a finite number"),
    (b'{"kind": "train", "step": 1, "loss": 2.0}\n',
     'metrics.jsonl:1: no elapsed_s or time field'),
    (b'{"kind": ["train"], "step": 1, "loss": 2.0, "time": 1}\n',
     'metrics.jsonl:1: not a metrics record (no step or kind)'),
    (b'{"kind": "train", "step": null, "loss": 2.0, "time": 1}\n',
     "metrics.jsonl:1: field 'step' is None, not a finite number"),
])
def test_train_plot_names_the_line_of_a_bad_metrics_file(tmp_path, content, message):
  from train import plot  # pylint: disable=import-outside-toplevel
  (tmp_path / 'metrics.jsonl').write_bytes(content)
  with pytest.raises(plot.PlotError) as raised:
    plot.read_metrics(str(tmp_path))
  assert message in str(raised.value)


def test_train_plot_checks_out_before_drawing(tmp_path):
  from train import plot  # pylint: disable=import-outside-toplevel
  (tmp_path / 'metrics.jsonl').write_text(_GOOD_RECORD + '\n')
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  status, stderr = _run(lambda: plot.plot([str(tmp_path)], str(blocker / 'curves.png')))
  assert status == 1 and '--out=' in _one_error_line(stderr)
  assert 'cannot write there' in stderr


def test_train_mlm_refuses_to_start_without_room_for_its_checkpoints(tmp_path, monkeypatch):
  import shutil  # pylint: disable=import-outside-toplevel
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda p: real(p)._replace(free=100 * 1024))   # 100 KiB free
  workdir = tmp_path / 'run'
  status, stderr = _run(lambda: mlm.train(helpers.mlm_tiny_config(tmp_path, steps=2), str(workdir)))
  line = _one_error_line(stderr)
  assert status == 1 and line.startswith(f'error: --workdir={workdir}: ') and (
      'more checkpoint(s) of' in line and 'has 0.1 MiB free' in line), line
  assert not list(workdir.glob('ckpt_*')) and not (workdir / 'metrics.jsonl').exists()


# --------------------------------------------------------------------------------------
# A pathological document: its reading cost is bounded by the crop, not by its size.

@pytest.mark.parametrize('suffix', ['.jsonl', '.txt'])
def test_a_huge_one_line_document_is_parsed_once_per_pass_not_per_example(
    tmp_path, monkeypatch, suffix):
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  words = [bytes(rng.integers(97, 123, 6, dtype=np.uint8)).decode() for _ in range(500)]
  text = ' '.join(rng.choice(words, 600_000))   # about 4 MB on one line
  path = tmp_path / f'huge{suffix}'
  path.write_text(json.dumps({'text': text}) + '\n' if suffix == '.jsonl' else text + '\n')
  # The per-source cache (128 MiB) would hide the cost at this size; a 300 MB document
  # does not fit it: shrink it to 1 MiB so this document does not either.
  monkeypatch.setattr(data_lib.DocumentSource, 'CACHE_BYTES', 1 << 20)
  parsed = []
  real = data_lib.read_documents

  def counting(*args, **kwargs):
    for doc in real(*args, **kwargs):
      parsed.append(len(doc))
      yield doc

  monkeypatch.setattr(data_lib, 'read_documents', counting)
  source = data_lib.DocumentSource('huge', [str(path)], seed=0)
  stream = data_lib.ExampleStream([source], [1.0], seq_len=64, docs_per_example=10,
                                  block_size=16, seed=0)
  examples = stream.examples()
  count = 64
  rows = [next(examples)[0] for _ in range(count)]
  piece = data_lib.DocumentSource.PIECE_BYTES
  # Each example reads at most docs_per_example pieces' worth of parsing (plus the first
  # parse); before, each one parsed the whole document up to ten times.
  assert sum(parsed) <= len(text) + count * 10 * piece, (len(parsed), sum(parsed))
  # The pieces are the document, in order, and the examples are real crops of it.
  pieces = [doc for doc, _ in zip((d for d, _ in source.documents(data_lib.SourceState())),
                                  range(len(text) // piece + 1))]
  assert b''.join(pieces) == text.encode() and max(map(len, pieces)) == piece
  for row in rows:
    crop = bytes((row[row >= 6] - 6).astype(np.uint8).tolist())
    assert len(crop) >= 50 and crop[:20] in text.encode()
