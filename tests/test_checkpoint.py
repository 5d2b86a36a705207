"""Checkpoints: the safe pickle loader, atomic saves, restores, and fill_mask end to end."""

import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perceiver.params import params_file
from perceiver import configs
from perceiver import fill_mask
from perceiver import transform
from perceiver import verify_released
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tiny_params():
  config = configs.tiny()
  return config, helpers.params_like(transform.masked_lm(config),
                                     jnp.zeros((1, 8), jnp.int32))


def _write_deepmind_pickle(path, params, protocol=pickle.HIGHEST_PROTOCOL):
  """The released format: a pickled plain dict of module -> dict of name -> numpy array."""
  plain = {m: {n: np.asarray(v) for n, v in d.items()} for m, d in params.items()}
  with open(path, 'wb') as f:
    pickle.dump(plain, f, protocol=protocol)


class _RunsCommand:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_deepmind_pickle_loads_and_is_checked(tiny_params, tmp_path, protocol):
  config, params = tiny_params
  path = tmp_path / 'tiny.pickle'
  _write_deepmind_pickle(path, params, protocol)
  loaded = params_file.load_deepmind_pickle(path, config)
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))


def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pickle'
  with open(path, 'wb') as f:
    pickle.dump({'embed': {'embeddings': _RunsCommand(f'touch {marker}')}}, f)
  with pytest.raises(params_file.CheckpointError, match=r'evil.pickle.*posix.system|'
                     r'evil.pickle.*os.system'):
    params_file.load_deepmind_pickle(path)
  assert not marker.exists()


def test_pickle_with_missing_extra_and_misshaped_params_is_named(tiny_params, tmp_path):
  config, params = tiny_params
  bad = {m: dict(d) for m, d in params.items()}
  del bad['embedding_decoder']
  bad['embed']['embeddings'] = np.zeros((10, 32), np.float32)
  bad['extra_module'] = {'w': np.zeros(3, np.float32)}
  path = tmp_path / 'bad.pickle'
  _write_deepmind_pickle(path, bad)
  with pytest.raises(params_file.CheckpointError) as info:
    params_file.load_deepmind_pickle(path, config)
  message = str(info.value)
  assert 'bad.pickle' in message
  assert 'missing 1: embedding_decoder/bias' in message
  assert 'unexpected 1: extra_module/w' in message
  assert 'embed/embeddings [10, 32] (expected [262, 32])' in message


def test_save_and_load_round_trip_with_optimizer_state(tiny_params, tmp_path):
  config, params = tiny_params
  opt = optax.lamb(1e-3)
  opt_state = opt.init(params)
  key = jax.random.key(7)
  path = params_file.save(tmp_path / 'ckpt.npz', params, config,
                         trees={'opt_state': opt_state, 'rng': key}, step=12,
                         data={'epoch': 1, 'offset': 99})
  loaded, loaded_config, metadata = params_file.load(path)
  assert loaded_config == config
  assert metadata == {'step': 12, 'data': {'epoch': 1, 'offset': 99}}
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
  restored = params_file.load_tree(path, 'opt_state', opt.init(params))
  assert jax.tree.structure(restored) == jax.tree.structure(opt_state)
  assert jax.tree.all(jax.tree.map(np.array_equal, restored, opt_state))
  restored_key = params_file.load_tree(path, 'rng', jax.random.key(0))
  assert np.array_equal(jax.random.key_data(restored_key), jax.random.key_data(key))
  # np.load opens it too (no pickle needed).
  with np.load(path, allow_pickle=False) as npz:
    np.testing.assert_array_equal(npz['params/embed/embeddings'], params['embed']['embeddings'])


def test_checkpoint_from_before_the_kernels_switch_loads_with_auto(tiny_params, tmp_path):
  """Checkpoints written before ``kernels`` existed carry ``fusion_barrier``: they load
  with ``kernels='auto'`` and build the same model."""
  config, params = tiny_params
  old = config.to_dict()
  del old['kernels']
  old['fusion_barrier'] = 'on'
  path = params_file.save(tmp_path / 'old.npz', params, old)
  _, loaded, _ = params_file.load(path)
  assert 'fusion_barrier' not in loaded and loaded.kernels == 'auto'
  assert loaded.to_dict() == config.to_dict()
  assert params_file.load_config(path).to_dict() == config.to_dict()


def test_failed_write_keeps_the_previous_checkpoint(tiny_params, tmp_path, monkeypatch):
  config, params = tiny_params
  path = tmp_path / 'ckpt.npz'
  params_file.save(path, params, config, step=1)

  calls = []

  def exploding_write(zf, name, array):
    calls.append(name)
    if len(calls) == 5:
      raise RuntimeError('disk full')
    return original(zf, name, array)

  original = params_file._write_npy
  monkeypatch.setattr(params_file, '_write_npy', exploding_write)
  with pytest.raises(RuntimeError, match='disk full'):
    params_file.save(path, params, config, step=2)
  assert params_file.load(path)[2] == {'step': 1}
  assert sorted(os.listdir(tmp_path)) == ['ckpt.npz']   # no temporary left behind


def test_atomic_write_gives_ordinary_permissions(tmp_path):
  from perceiver.command import atomic  # pylint: disable=import-outside-toplevel
  umask = os.umask(0o022)
  try:
    path = tmp_path / 'new.json'
    with atomic.atomic_write(path, 'w') as f:
      f.write('{}')
    assert path.stat().st_mode & 0o777 == 0o644   # as open() would, not mkstemp's 0600
    path.chmod(0o640)
    with atomic.atomic_write(path, 'w') as f:
      f.write('{"a": 1}')
    assert path.stat().st_mode & 0o777 == 0o640 and path.read_text() == '{"a": 1}'
  finally:
    os.umask(umask)


@pytest.mark.slow
def test_kill_9_during_a_write_leaves_the_previous_checkpoint_loadable(tiny_params, tmp_path):
  config, params = tiny_params
  path = tmp_path / 'ckpt.npz'
  params_file.save(path, params, config, step=1)
  # A child process writes another checkpoint to the same path and, once its first array
  # is in the temporary file, says so (a marker file) and blocks mid-write: it is killed
  # there with SIGKILL. No timing: the parent waits on the marker.
  marker = tmp_path / 'mid-write'
  script = textwrap.dedent(f'''
      import pathlib, threading
      import numpy as np
      from perceiver.params import params_file
      from perceiver import configs
      real = params_file._write_npy
      def write_then_block(*args):
        real(*args)
        pathlib.Path({str(marker)!r}).write_text('x')
        threading.Event().wait()
      params_file._write_npy = write_then_block
      big = {{'m': {{'w%d' % i: np.ones((100, 100), np.float32) for i in range(4)}}}}
      params_file.save({str(path)!r}, big, configs.tiny(), step=2)
  ''')
  child = subprocess.Popen([sys.executable, '-c', script], cwd=ROOT)
  deadline = time.monotonic() + 120
  while not marker.exists():
    assert child.poll() is None, 'the writer exited before it was killed'
    assert time.monotonic() < deadline, 'the writer never reached the middle of its write'
    time.sleep(0.01)
  assert any(n.endswith('.tmp') for n in os.listdir(tmp_path))
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert child.returncode == -signal.SIGKILL
  loaded, _, metadata = params_file.load(path)
  assert metadata == {'step': 1}
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))


def test_corrupt_or_foreign_files_are_named(tmp_path):
  junk = tmp_path / 'junk.npz'
  junk.write_bytes(b'PK\x03\x04 this is not a zip')
  with pytest.raises(params_file.CheckpointError, match='junk.npz'):
    params_file.load(junk)
  with pytest.raises(params_file.CheckpointError, match='no such checkpoint'):
    params_file.load(tmp_path / 'absent.npz')
  with pytest.raises(TypeError, match='JSON-serialisable'):
    params_file.save(tmp_path / 'x.npz', {}, {}, when=object())


@pytest.mark.slow
def test_fill_mask_fills_the_marked_span(tiny_params, tmp_path):
  data, spans = fill_mask.parse_marked(b'some words are[[ missing.]]')
  assert data == b'some words are missing.' and spans == [(14, 23)]
  config, params = tiny_params
  path = params_file.save(tmp_path / 'tiny.npz', params, config)
  ids, predicted, filled = fill_mask.fill(params, config, data, spans)
  assert np.all(ids[14:23] == 3) and len(predicted[0]) == 9
  logits = transform.masked_lm(config).apply(params, None, jnp.asarray(ids[None]))
  np.testing.assert_array_equal(predicted[0], np.argmax(logits[0, 14:23], -1))
  assert filled[:14] == data[:14]
  # The command, end to end, on the saved checkpoint.
  result = subprocess.run(
      [sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
       '--text=some words are[[ missing.]]'],
      cwd=ROOT, capture_output=True, text=True, check=True)
  assert "span 14:23 was ' missing.' -> " in result.stdout
  assert f'ids {predicted[0].tolist()}' in result.stdout
  result = subprocess.run(
      [sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
       '--text=some words are[[ missing.]]', '--span=0:4'],
      cwd=ROOT, capture_output=True, text=True, check=True)
  assert "span 0:4 was 'some' -> " in result.stdout
  assert "masked: '____ words are_________' (13 bytes" in result.stdout
  bad = subprocess.run([sys.executable, '-m', 'perceiver.fill_mask', f'--checkpoint={path}',
                        '--text=abc', '--span=2:9'], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and '--span=' in bad.stderr and 'END <= 3' in bad.stderr


@pytest.mark.slow
def test_verify_released_inputs_and_mismatch_report():
  # The published example: the model card's sentence, bytes 51:60 (" missing.") masked.
  ids, mask = verify_released.published_inputs()
  assert ids.shape == mask.shape == (1, 2048)
  assert bytes(i - 6 for i in verify_released.KNOWN_ARGMAX) == b' missing.'
  assert verify_released.SENTENCE[51:60] == b' missing.'
  assert (ids[0, 51:60] == 3).all() and ids[0, 50] == ord('e') + 6
  assert mask.sum() == len(verify_released.SENTENCE) and (ids[0, mask[0] == 0] == 0).all()
  # Weights that are not the released ones are reported, naming both figures.
  config = configs.tiny(max_seq_len=2048)
  params = transform.masked_lm(config).init(jax.random.PRNGKey(0), ids, mask)
  problems = verify_released.check(params, config)
  assert len(problems) == 2
  assert problems[0].startswith('logits[0, :3, :3] = ') and 'published' in problems[0]
  assert problems[1].startswith('greedy fill of bytes 51:60 = ')
  assert verify_released.check(params, configs.tiny(max_seq_len=64)) == [
      'the checkpoint is not a byte model reading 2048 positions (vocab_size 262, '
      'max_seq_len 64)']


# --------------------------------------------------------------------------------------
# A run's checkpoints (perceiver.training.run_checkpoints, orbax), in process on one device.

@pytest.mark.slow   # orbax: seconds to import, about a second a save or restore
def test_run_checkpoint_round_trip_keeps_the_last_n_and_refuses_what_does_not_fit(
    tiny_params, tmp_path):
  """Two async saves with keep=1: the newer restores bit-identical into the run's layout
  and reads back as host arrays through loading.load_any (a checkpoint directory, or the
  run's directory); non-finite parameters are not saved; another model's shapes are a
  CheckpointMismatch naming the checkpoint."""
  from perceiver.params import loading  # pylint: disable=import-outside-toplevel
  from perceiver.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from perceiver.training import run_checkpoints  # pylint: disable=import-outside-toplevel
  from perceiver.training import step as step_lib  # pylint: disable=import-outside-toplevel
  config, params = tiny_params
  optimizer = optax.adam(1e-3)
  make = step_lib.new_state_fn(lambda: jax.tree.map(jnp.asarray, params), optimizer,
                               jax.random.PRNGKey(7))
  state, shardings = step_lib.init_state(mesh_lib.make(devices=jax.devices()[:1]), make)
  state = state._replace(opt_state=jax.tree.map(   # moments unlike the parameters
      lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, state.opt_state))
  run = tmp_path / 'run'
  with run_checkpoints.CheckpointManager(str(run), keep=1) as manager:
    for step in (1, 2):
      manager.save(step, state.params, config, opt_state=state.opt_state, rng=state.rng,
                   data_state={'doc': step}, note='hi')
  assert manager.steps() == [2] and sorted(os.listdir(run)) == ['ckpt_000000002']
  shapes = jax.eval_shape(make)
  restored = manager.restore_latest(shapes, shardings)
  assert (restored.step, restored.metadata['note'], restored.data) == (2, 'hi', [{'doc': 2}])
  assert restored.data_position(print) == {'doc': 2}
  same = lambda a, b: jax.tree.all(jax.tree.map(
      lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))
  assert same(restored.params, state.params) and same(restored.opt_state, state.opt_state)
  assert same(restored.rng, state.rng)
  for where in (run, run / 'ckpt_000000002'):
    host, loaded_config, metadata = loading.load_any(where)
    assert same(host, params) and loaded_config.to_dict() == config.to_dict()
    assert metadata['step'] == 2
  # The commands that take a checkpoint read the run's directory directly.
  from perceiver import convert  # pylint: disable=import-outside-toplevel
  from perceiver.deploy import export  # pylint: disable=import-outside-toplevel
  convert.convert('project', str(run), str(tmp_path / 'p.npz'))
  assert same(params_file.load(tmp_path / 'p.npz')[0], params)
  manifest = export.export(str(run), str(tmp_path / 'exported'))
  assert manifest['task'] == 'masked_lm', manifest
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params)
  with pytest.raises(run_checkpoints.NonFiniteParams, match='non-finite parameters at step 3'):
    manager.save(3, bad, config)
  assert manager.steps() == [2] and sorted(os.listdir(run)) == ['ckpt_000000002']
  wider = shapes._replace(params=jax.tree.map(   # another model: every matrix wider
      lambda x: jax.ShapeDtypeStruct(x.shape[:-1] + (x.shape[-1] * 2,), x.dtype)
      if x.ndim > 1 else x, shapes.params))
  with pytest.raises(params_file.CheckpointMismatch,
                     match=r'ckpt_000000002: its params do not fit this run'):
    manager.restore_latest(wider, shardings)
  float_counts = shapes._replace(opt_state=jax.tree.map(   # orbax would cast silently
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), shapes.opt_state))
  with pytest.raises(params_file.CheckpointMismatch,
                     match=r"count is \[\] int32, this run needs \[\] float32"):
    manager.restore_latest(float_counts, shardings)
  assert manager.steps() == [2]   # not moved aside: it is not damaged


def test_a_workdir_of_the_earlier_one_file_checkpoints_is_named_not_started_over(
    tiny_params, tmp_path):
  from perceiver.training import run_checkpoints  # pylint: disable=import-outside-toplevel
  config, params = tiny_params
  params_file.save(tmp_path / 'ckpt_000000300.npz', params, config, step=300)
  manager = run_checkpoints.CheckpointManager(str(tmp_path))
  with pytest.raises(params_file.CheckpointError,
                     match=r'ckpt_000000300\.npz: a checkpoint of the earlier one-file format'):
    manager.restore_latest(None, None)
