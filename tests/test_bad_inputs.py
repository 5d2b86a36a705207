"""Bad inputs, command by command: every command answers an expected failure (a bad config
value, data path or row, workdir, checkpoint file, text, metrics file) with one
``error:`` line that names the field, flag, file or tensor, exits non-zero, and leaves
what earlier runs wrote as it was. The error policy itself, flags and config files are
tests/test_cli.py's; signals tests/test_signal_guard.py's; files told apart by content
tests/test_formats.py's; distributed start-up tests/test_hosts.py's."""

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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval.glue import app as glue
from perceiver import configs
from perceiver import convert
from perceiver import fill_mask
from perceiver import transform
from perceiver.params import loading
from perceiver.params import params_file
from perceiver.params import run_checkpoint
from perceiver.training import workdir_lock
from tests import helpers
from train import mlm


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A workdir holding a short finished pretraining run."""
  tmp = tmp_path_factory.mktemp('mlm')
  workdir = tmp / 'run'
  mlm.train(helpers.mlm_tiny_config(tmp, steps=2, checkpoint_every=2), str(workdir))
  return tmp, workdir


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('fill')
  return helpers.save_tiny_checkpoint(tmp / 'tiny.npz'), tmp


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
    ({'data.batch_timeout_s': -1.0}, 'data.batch_timeout_s must be a finite number >= 0'),
]


@pytest.mark.parametrize('overrides,message', _MLM_CASES,
                         ids=[','.join(c[0]) for c in _MLM_CASES])
@pytest.mark.slow
def test_train_mlm_refuses_bad_config_values_before_anything_runs(finished_run, overrides,
                                                                  message):
  tmp, workdir = finished_run
  before = helpers.snapshot(workdir)
  config = helpers.mlm_tiny_config(tmp, steps=4)
  config.unlock()
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  status, stderr = helpers.run_command(lambda: mlm.train(config, str(workdir)))
  assert status == 1 and message in helpers.one_error_line(stderr)
  assert helpers.snapshot(workdir) == before


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
    status, stderr = helpers.run_command(lambda case=case: mlm.train(case, str(tmp_path / 'w')))
    assert status == 1 and message in helpers.one_error_line(stderr), stderr


@pytest.mark.slow
def test_train_mlm_names_an_unwritable_workdir_and_a_busy_one(finished_run, tmp_path):
  tmp, workdir = finished_run
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  config = helpers.mlm_tiny_config(tmp, steps=4)
  status, stderr = helpers.run_command(lambda: mlm.train(config, str(blocker / 'w')))
  line = helpers.one_error_line(stderr)
  assert status == 1 and f'--workdir={blocker / "w"}: cannot create' in line, line
  before = helpers.snapshot(workdir)
  with workdir_lock.WorkdirLock(str(workdir)):   # another run holds it
    config = helpers.mlm_tiny_config(tmp, steps=4)
    status, stderr = helpers.run_command(lambda: mlm.train(config, str(workdir)))
  line = helpers.one_error_line(stderr)
  assert status == 1 and f'{workdir} is in use by pid {os.getpid()}' in line, line
  assert helpers.snapshot(workdir) == before


@pytest.mark.slow
def test_resume_refuses_a_changed_batch_size_unless_allowed(finished_run, tmp_path):
  tmp, workdir = finished_run
  run = tmp_path / 'run'
  os.makedirs(run)
  for name in os.listdir(workdir):
    if name.startswith('ckpt_'):
      shutil.copytree(workdir / name, run / name)
  config = helpers.mlm_tiny_config(tmp, steps=4, batch_size=8)
  status, stderr = helpers.run_command(lambda: mlm.train(config, str(run)))
  assert status == 1
  assert 'written with other settings: train.batch_size' in helpers.one_error_line(stderr)
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
# Checkpoint files.

@pytest.mark.slow
def test_checkpoint_loaders_check_declared_sizes_and_refuse_nan(tmp_path):
  config, params = helpers.tiny_mlm_params()
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
  before = helpers.snapshot(tmp_path)
  status, stderr = helpers.run_command(lambda: convert.convert(
      'deepmind', str(tmp_path / 'nan.pickle'), str(tmp_path / 'out.npz'), config='tiny'))
  assert status == 1 and 'nan.pickle: non-finite values' in helpers.one_error_line(stderr)
  assert helpers.snapshot(tmp_path) == before   # nothing written


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
    status, stderr = helpers.run_command(command)
    assert status == 1 and message in helpers.one_error_line(stderr), stderr


# --------------------------------------------------------------------------------------
# fill_mask.

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
  status, stderr = helpers.run_command(lambda: fill_mask._command(path, text, spans))
  assert status == 1 and message in helpers.one_error_line(stderr)


@pytest.mark.slow
def test_fill_mask_checks_the_text_before_the_checkpoint_and_names_bad_checkpoints(
    tiny_checkpoint):
  path, tmp = tiny_checkpoint
  missing = str(tmp / 'missing.npz')
  status, stderr = helpers.run_command(lambda: fill_mask._command(missing, 'a [[]] b', []))
  assert status == 1 and 'is empty' in stderr   # the text first, not the missing file
  status, stderr = helpers.run_command(lambda: fill_mask._command(missing, 'a [[b]]', []))
  assert status == 1 and f'{missing}: no such checkpoint' in helpers.one_error_line(stderr)
  config = configs.tiny()
  classifier = jax.device_get(transform.classifier(config, 2).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  clf = str(params_file.save(tmp / 'clf.npz', classifier, config, num_outputs=2))
  status, stderr = helpers.run_command(lambda: fill_mask._command(clf, 'a [[b]]', []))
  line = helpers.one_error_line(stderr)
  assert status == 1 and 'clf.npz (the masked language model) does not match' in line
  assert 'missing' in line and 'basic_decoder' in line
  # Invalid UTF-8 on the command line reaches Python as surrogate escapes: the bytes are
  # read as given.
  status, stderr = helpers.run_command(lambda: fill_mask._command(path, 'caf\udce9 [[x]]', []))
  assert status == 0, stderr


@pytest.mark.slow
def test_fill_mask_command_line_takes_invalid_utf8(tiny_checkpoint):
  path, _ = tiny_checkpoint
  done = subprocess.run([sys.executable.encode(), b'-m', b'perceiver.fill_mask',
                         f'--checkpoint={path}'.encode(), b'--text=caf\xe9 [[ au lait]]'],
                        cwd=helpers.ROOT, capture_output=True, timeout=300)
  assert done.returncode == 0, done.stderr.decode(errors='replace')[-2000:]
  assert b"span 5:13 was ' au lait'" in done.stdout
  done = subprocess.run([sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
                         '--text=no [[]] span'], cwd=helpers.ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 1 and helpers.one_error_line(done.stderr)
  assert 'Traceback' not in done.stderr
  verbose = subprocess.run([sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
                            '--text=no [[]] span', '--verbose'], cwd=helpers.ROOT,
                           capture_output=True, text=True, timeout=300)
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
  config = helpers.glue_tiny_config(**overrides)
  status, stderr = helpers.run_command(
      lambda: glue.run('wnli', config, str(data_dir), str(tmp_path / 'out')))
  assert status == 1 and message in helpers.one_error_line(stderr)
  assert not (tmp_path / 'out').exists()


def test_eval_glue_all_checks_every_task_before_training_any(tmp_path):
  data_dir = tmp_path / 'glue'
  helpers.write_glue_task(data_dir, 'rte')
  helpers.write_glue_task(data_dir, 'wnli')
  dev = data_dir / 'WNLI' / 'dev.tsv'
  lines = dev.read_text().splitlines()
  dev.write_text('\n'.join(lines[:3] + ['7\tonly two']) + '\n')
  status, stderr = helpers.run_command(
      lambda: glue.run('all', helpers.glue_tiny_config(), str(data_dir), str(tmp_path / 'out')))
  line = helpers.one_error_line(stderr)
  assert status == 1 and r'WNLI/dev.tsv:4: 2 columns, expected 4' in line, line
  assert not (tmp_path / 'out' / 'rte' / 'dev_metrics.json').exists()   # nothing trained


def test_eval_glue_names_a_workdir_it_cannot_create(tmp_path):
  data_dir = helpers.write_glue_task(tmp_path / 'glue', 'wnli')
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  status, stderr = helpers.run_command(
      lambda: glue.run('wnli', helpers.glue_tiny_config(), str(data_dir), str(blocker / 'out')))
  line = helpers.one_error_line(stderr)
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
    status, stderr = helpers.run_command(lambda: command(str(tmp_path / out)))
    line = helpers.one_error_line(stderr)
    assert status == 1 and line.startswith('error: --workdir (') and (
        'the best and resume checkpoints' in line and 'has 0.1 MiB free' in line), line
    assert not list((tmp_path / out).rglob('ckpt_*')), out


# --------------------------------------------------------------------------------------
# Late checks made early: outputs, metrics files and free space, before the work starts.

def test_eval_mlm_checks_out_before_reading_the_checkpoint(tmp_path):
  from eval import mlm as eval_mlm  # pylint: disable=import-outside-toplevel
  text = tmp_path / 'text.txt'
  text.write_text('some words here\n')
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  missing = str(tmp_path / 'missing.npz')   # would fail second: --out is named first
  status, stderr = helpers.run_command(
      lambda: eval_mlm.run(missing, str(text), str(blocker / 'out.json')))
  line = helpers.one_error_line(stderr)
  assert status == 1 and f'--out={blocker / "out.json"}: cannot write there' in line, line
  status, stderr = helpers.run_command(lambda: eval_mlm.run(missing, str(text), str(tmp_path)))
  assert status == 1 and f'--out={tmp_path}: is a directory' in helpers.one_error_line(stderr)
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
  status, stderr = helpers.run_command(
      lambda: plot.plot([str(tmp_path)], str(blocker / 'curves.png')))
  assert status == 1 and '--out=' in helpers.one_error_line(stderr)
  assert 'cannot write there' in stderr


def test_train_mlm_refuses_to_start_without_room_for_its_checkpoints(tmp_path, monkeypatch):
  import shutil  # pylint: disable=import-outside-toplevel
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda p: real(p)._replace(free=100 * 1024))   # 100 KiB free
  workdir = tmp_path / 'run'
  config = helpers.mlm_tiny_config(tmp_path, steps=2)
  status, stderr = helpers.run_command(lambda: mlm.train(config, str(workdir)))
  line = helpers.one_error_line(stderr)
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


# --------------------------------------------------------------------------------------
# Data that stalls or is too small for its readers.

@pytest.mark.slow
def test_a_stopped_data_worker_ends_the_run_naming_it_and_keeps_the_checkpoints(
    finished_run, tmp_path, monkeypatch):
  from train import workers  # pylint: disable=import-outside-toplevel
  tmp, finished = finished_run
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  checkpoints = {k: v for k, v in helpers.snapshot(workdir).items() if k.startswith('ckpt')}
  started = workers.WorkerPool.__init__
  stopped = []

  def start_then_stop(self, *args, **kwargs):   # as a worker stuck in a read from the start
    started(self, *args, **kwargs)
    for pid in self.pids():
      os.kill(pid, signal.SIGSTOP)
      stopped.append(pid)

  monkeypatch.setattr(workers.WorkerPool, '__init__', start_then_stop)
  config = helpers.mlm_tiny_config(tmp, steps=4)
  config.unlock()
  config.data.workers, config.data.batch_timeout_s = 1, 3.0
  status, stderr = helpers.run_command(lambda: mlm.train(config, str(workdir)))
  line = helpers.one_error_line(stderr)
  assert status == 1 and 'no data for step 3 within 3 s (data.batch_timeout_s)' in line
  assert f'data worker 0 of 1 (pid {stopped[0]}, alive' in line
  assert {k: v for k, v in helpers.snapshot(workdir).items()
          if k.startswith('ckpt')} == checkpoints


@pytest.mark.slow
@pytest.mark.parametrize('size', [2000, 3 << 20])
def test_a_one_document_source_trains_with_the_default_streams(tmp_path, capsys, size):
  """One document (2 kB, or one line longer than DocumentSource.LONG_DOCUMENT_BYTES, as a
  300 MB one would be) once failed at the first step: 'no documents for reader 1 of 8'."""
  path = tmp_path / 'one.jsonl'
  path.write_text(json.dumps({'text': ('one document, many words ' * (size // 25 + 1))[:size]})
                  + '\n')
  config = helpers.mlm_tiny_config(tmp_path, steps=2, checkpoint_every=2)
  config.unlock()
  config.data.sources.gen.paths = config.data.eval_paths = str(path)
  assert config.data.streams == 8
  report = mlm.train(config, str(tmp_path / 'run'))
  assert np.isfinite(report['loss'])
  assert "data.streams=8 -> 1 on this corpus: source 'gen' has 1 record(s)" in (
      capsys.readouterr().out)
  assert (tmp_path / 'run' / 'ckpt_000000002').exists()
