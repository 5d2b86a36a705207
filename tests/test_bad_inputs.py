"""Bad inputs, table by table: every command answers an expected failure with one
``error:`` line that names the field, flag, file or tensor, exits non-zero, and leaves
what earlier runs wrote as it was."""

import hashlib
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile
from contextlib import redirect_stderr

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import glue
from perceiver import checkpoint
from perceiver import cli
from perceiver import configs
from perceiver import convert
from perceiver import fill_mask
from perceiver import loading
from perceiver import transform
from perceiver.training import checkpoints
from tests.test_glue import tiny_config as glue_tiny_config
from tests.test_glue import write_task
from tests.test_train import tiny_config
from train import mlm

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
  mlm.train(tiny_config(tmp, steps=2, checkpoint_every=2), str(workdir))
  return tmp, workdir


_MLM_CASES = [
    ({'train.steps': -5}, 'train.steps must be an integer >= 1, got -5'),
    ({'optimizer.learning_rate': -1e-3}, 'optimizer.learning_rate must be a finite number > 0'),
    ({'optimizer.learning_rate': float('nan')}, 'optimizer.learning_rate must be a finite'),
    ({'train.batch_size': 0}, 'train.batch_size must be an integer >= 1, got 0'),
    ({'data.docs_per_example': 0}, 'data.docs_per_example must be an integer >= 1, got 0'),
    ({'train.checkpoint_every': 0}, 'train.checkpoint_every must be an integer >= 1, got 0'),
    ({'train.log_every': 0}, 'train.log_every must be an integer >= 1, got 0'),
    ({'data.shuffle_block': 0}, 'data.shuffle_block must be an integer >= 1, got 0'),
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
]


@pytest.mark.parametrize('overrides,message', _MLM_CASES,
                         ids=[','.join(c[0]) for c in _MLM_CASES])
def test_train_mlm_refuses_bad_config_values_before_anything_runs(finished_run, overrides,
                                                                  message):
  tmp, workdir = finished_run
  before = _snapshot(workdir)
  config = tiny_config(tmp, steps=4)
  config.unlock()
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  status, stderr = _run(lambda: mlm.train(config, str(workdir)))
  assert status == 1 and message in _one_error_line(stderr)
  assert _snapshot(workdir) == before


def test_train_mlm_names_bad_data_paths_and_rows(tmp_path):
  config = tiny_config(tmp_path, steps=2)
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


def test_train_mlm_names_an_unwritable_workdir_and_a_busy_one(finished_run, tmp_path):
  tmp, workdir = finished_run
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  status, stderr = _run(lambda: mlm.train(tiny_config(tmp, steps=4), str(blocker / 'w')))
  line = _one_error_line(stderr)
  assert status == 1 and f'--workdir={blocker / "w"}: cannot create' in line, line
  before = _snapshot(workdir)
  with checkpoints.WorkdirLock(str(workdir)):   # another run holds it
    status, stderr = _run(lambda: mlm.train(tiny_config(tmp, steps=4), str(workdir)))
  assert status == 1 and f'{workdir} is in use by pid {os.getpid()}' in _one_error_line(
      stderr)
  assert _snapshot(workdir) == before


def test_resume_refuses_a_changed_batch_size_unless_allowed(finished_run, tmp_path):
  tmp, workdir = finished_run
  run = tmp_path / 'run'
  os.makedirs(run)
  for name in os.listdir(workdir):
    if name.startswith('ckpt_'):
      (run / name).write_bytes((workdir / name).read_bytes())
  status, stderr = _run(lambda: mlm.train(tiny_config(tmp, steps=4, batch_size=8), str(run)))
  assert status == 1
  assert 'written with other settings: train.batch_size' in _one_error_line(stderr)
  assert 'train.allow_changes' in stderr
  mlm.train(tiny_config(tmp, steps=3, batch_size=8, allow_changes=True), str(run))
  assert (run / 'ckpt_000000003.npz').is_file()


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
  config = tiny_config(tmp_path, steps=4, checkpoint_every=2)
  workdir = tmp_path / 'run'
  mlm.train(config, str(workdir))
  straight = checkpoint.load(workdir / 'ckpt_000000004.npz')[0]
  for damage in ('flip', 'truncate', 'empty'):
    newest = workdir / 'ckpt_000000004.npz'
    raw = bytearray(newest.read_bytes())
    if damage == 'flip':
      raw[len(raw) // 2] ^= 0x10
    elif damage == 'truncate':
      raw = raw[:len(raw) // 3]
    else:
      raw = bytearray()
    newest.write_bytes(bytes(raw))
    capsys.readouterr()
    mlm.train(config, str(workdir))   # resumes from step 2, redoes steps 3-4
    out = capsys.readouterr().out
    assert f'{newest} does not read back' in out and 'moved aside to' in out, damage
    assert 'resuming from' in out and 'ckpt_000000002.npz at step 2' in out
    aside = pathlib.Path(str(newest) + '.corrupt')
    assert aside.read_bytes() == bytes(raw)   # kept, renamed, not deleted
    aside.unlink()
    again = checkpoint.load(newest)[0]
    for module in straight:
      for name in straight[module]:
        np.testing.assert_array_equal(again[module][name], straight[module][name])
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in records if r['kind'] == 'train']
  assert steps == sorted(set(steps)) == [1, 2, 3, 4]   # one record per step


# --------------------------------------------------------------------------------------
# Checkpoint files.

def _tiny_params(config):
  return jax.device_get(transform.masked_lm(config).init(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 8), jnp.int32)))


def test_checkpoint_loaders_check_declared_sizes_and_refuse_nan(tmp_path):
  config = configs.tiny()
  params = _tiny_params(config)
  good = checkpoint.save(tmp_path / 'good.npz', params, config)
  raw = pathlib.Path(good).read_bytes()
  (tmp_path / 'cut.npz').write_bytes(raw[:len(raw) // 2])
  with pytest.raises(checkpoint.CheckpointError, match=r'cut\.npz: not a perceiver-io'):
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
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'params/embed/embeddings\.npy declares \[1000000000000\]'):
    checkpoint.load(tmp_path / 'huge.npz')
  # A compressed entry inflating far past what the model's shape allows.
  with zipfile.ZipFile(tmp_path / 'bomb.npz', 'w') as out, zipfile.ZipFile(good) as src:
    for item in src.infolist():
      data = src.read(item.filename)
      if item.filename == 'params/embed/embeddings.npy':
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.zeros((262, 4096), np.float32))
        data = buffer.getvalue()
      out.writestr(item.filename, data, compress_type=zipfile.ZIP_DEFLATED)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'embeddings\.npy has shape \[262, 4096\], the model needs '
                           r'\[262, 32\]'):
    checkpoint.load(tmp_path / 'bomb.npz')
  nan = jax.tree.map(np.array, params)
  nan['perceiver_encoder/~/cross_attention/mlp/linear']['w'][0, 0] = np.nan
  checkpoint.save(tmp_path / 'nan.npz', nan, config)
  message = (r'non-finite values \(NaN or infinity\) in 1 parameter\(s\): '
             r'perceiver_encoder/~/cross_attention/mlp/linear/w')
  with pytest.raises(checkpoint.CheckpointError, match=message):
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
  return str(checkpoint.save(tmp / 'tiny.npz', _tiny_params(config), config)), tmp


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
  clf = str(checkpoint.save(tmp / 'clf.npz', classifier, config, num_outputs=2))
  status, stderr = _run(lambda: fill_mask._command(clf, 'a [[b]]', []))
  line = _one_error_line(stderr)
  assert status == 1 and 'clf.npz (the masked language model) does not match' in line
  assert 'missing' in line and 'basic_decoder' in line
  # Invalid UTF-8 on the command line reaches Python as surrogate escapes: the bytes are
  # read as given.
  status, stderr = _run(lambda: fill_mask._command(path, 'caf\udce9 [[x]]', []))
  assert status == 0, stderr


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
  data_dir = write_task(tmp_path / 'glue', 'wnli')
  status, stderr = _run(lambda: glue.run('wnli', glue_tiny_config(**overrides),
                                         str(data_dir), str(tmp_path / 'out')))
  assert status == 1 and message in _one_error_line(stderr)
  assert not (tmp_path / 'out').exists()


def test_eval_glue_all_checks_every_task_before_training_any(tmp_path):
  data_dir = tmp_path / 'glue'
  write_task(data_dir, 'rte')
  write_task(data_dir, 'wnli')
  dev = data_dir / 'WNLI' / 'dev.tsv'
  lines = dev.read_text().splitlines()
  dev.write_text('\n'.join(lines[:3] + ['7\tonly two']) + '\n')
  status, stderr = _run(lambda: glue.run('all', glue_tiny_config(), str(data_dir),
                                         str(tmp_path / 'out')))
  assert status == 1 and r'WNLI/dev.tsv:4: 2 columns, expected 4' in _one_error_line(stderr)
  assert not (tmp_path / 'out' / 'rte' / 'dev_metrics.json').exists()   # nothing trained


def test_eval_glue_names_a_workdir_it_cannot_create(tmp_path):
  data_dir = write_task(tmp_path / 'glue', 'wnli')
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  status, stderr = _run(lambda: glue.run('wnli', glue_tiny_config(), str(data_dir),
                                         str(blocker / 'out')))
  line = _one_error_line(stderr)
  assert status == 1 and f'--workdir={blocker / "out"}: cannot create' in line, line
  assert blocker.read_text() == 'x'
