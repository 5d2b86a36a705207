"""This project's parameter file (``perceiver.params.params_file``: a zip of arrays and
metadata) and DeepMind's released pickle: the safe unpickler, round trips with optimizer
state, atomic saves, old configs, damaged and foreign files."""

import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax
import pytest

from perceiver.params import params_file
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tiny_params():
  return helpers.tiny_mlm_params()


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


def _trained_lamb_state(params, steps=3):
  """LAMB's state after ``steps`` real updates with random gradients: moments nonzero and
  unlike a fresh ``init``'s, the count at ``steps``."""
  opt = optax.lamb(1e-3)
  opt_state = opt.init(params)
  rng = np.random.default_rng(0)

  @jax.jit
  def update(grads, opt_state, params):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(steps):
    grads = jax.tree.map(lambda x: rng.standard_normal(np.shape(x)).astype(np.float32),
                         params)
    params, opt_state = update(grads, opt_state, params)
  return opt, opt_state


def test_save_and_load_round_trip_with_optimizer_state(tiny_params, tmp_path):
  config, params = tiny_params
  opt, opt_state = _trained_lamb_state(params)
  key = jax.random.key(7)
  path = params_file.save(tmp_path / 'ckpt.npz', params, config,
                          trees={'opt_state': opt_state, 'rng': key}, step=12,
                          data={'epoch': 1, 'offset': 99})
  loaded, loaded_config, metadata = params_file.load(path)
  assert loaded_config == config
  assert metadata == {'step': 12, 'data': {'epoch': 1, 'offset': 99}}
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
  template = opt.init(params)   # zero moments, count 0: what a loader ignoring the file gives
  restored = params_file.load_tree(path, 'opt_state', template)
  assert jax.tree.structure(restored) == jax.tree.structure(opt_state)
  assert jax.tree.all(jax.tree.map(np.array_equal, restored, opt_state))
  moments = [(np.asarray(r), np.asarray(t)) for r, t in zip(
      jax.tree.leaves(restored), jax.tree.leaves(template)) if np.ndim(r) > 0]
  assert moments and all(not np.array_equal(r, t) for r, t in moments)
  assert [int(c) for c in jax.tree.leaves(restored) if np.ndim(c) == 0] == [3]
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
