"""A run's checkpoints (``perceiver.training.run_checkpoints`` through orbax's
CheckpointManager, read by ``perceiver.params.run_checkpoint``), in process on one
device: async round trips, keep-last-N, refusals, the layout written before the manager,
an edited metadata step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perceiver import configs
from perceiver import transform
from perceiver.params import loading
from perceiver.params import params_file
from perceiver.params import run_checkpoint
from perceiver.training import mesh as mesh_lib
from perceiver.training import run_checkpoints
from perceiver.training import step as step_lib
from tests import helpers


@pytest.fixture(scope='module')
def tiny_params():
  config = configs.tiny()
  return config, helpers.params_like(transform.masked_lm(config),
                                     jnp.zeros((1, 8), jnp.int32))


def _run_state(params):
  """(make, state, shardings): a one-device run's state of ``params`` under Adam, its
  moments and count moved off a fresh ``init``'s."""
  make = step_lib.new_state_fn(lambda: jax.tree.map(jnp.asarray, params), optax.adam(1e-3),
                               jax.random.PRNGKey(7))
  state, shardings = step_lib.init_state(mesh_lib.make(devices=jax.devices()[:1]), make)
  state = state._replace(opt_state=jax.tree.map(
      lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, state.opt_state))
  return make, state, shardings


def _same(a, b):
  return jax.tree.all(jax.tree.map(
      lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


@pytest.mark.slow   # orbax: seconds to import, about a second a save or restore
def test_run_checkpoint_round_trip_keeps_the_last_n_and_refuses_what_does_not_fit(
    tiny_params, tmp_path):
  """Two async saves with keep=1: the newer restores bit-identical into the run's layout
  and reads back as host arrays through loading.load_any (a checkpoint directory, or the
  run's directory); non-finite parameters are not saved; another model's shapes are a
  CheckpointMismatch naming the checkpoint."""
  config, params = tiny_params
  make, state, shardings = _run_state(params)
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
  same = _same
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
  config, params = tiny_params
  params_file.save(tmp_path / 'ckpt_000000300.npz', params, config, step=300)
  manager = run_checkpoints.CheckpointManager(str(tmp_path))
  with pytest.raises(params_file.CheckpointError,
                     match=r'ckpt_000000300\.npz: a checkpoint of the earlier one-file format'):
    manager.restore_latest(None, None)


def _numpy_fingerprint(array):
  """The fingerprint, computed independently in numpy: the sum over positions i of the
  array's 32-bit words times (2 i + 1), modulo 2**32."""
  words = np.ascontiguousarray(array).reshape(-1).view(np.uint32).astype(np.uint64)
  weights = np.arange(words.size, dtype=np.uint64) * 2 + 1
  return int(np.sum((words * weights) % 2**32) % 2**32)


def _write_as_before(directory, step, state, config):
  """A checkpoint written the way this project wrote them before orbax's manager (commit
  98a1636): orbax's Checkpointer of the composite handler on ``ckpt_<step:09d>``, items
  ``params``, ``train`` and ``meta``, the metadata's table built here in numpy."""
  rest = {'opt_state': state.opt_state, 'rng': state.rng,
          'step': jnp.asarray(step, jnp.int32)}
  arrays = {}
  for item, tree in (('params', state.params), ('train', rest)):
    arrays[item] = {jax.tree_util.keystr(path): [
        list(np.shape(x)), str(np.asarray(x).dtype), _numpy_fingerprint(np.asarray(x))]
        for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  meta = {'format': 'perceiver-io-run-checkpoint/1', 'config': config.to_dict(),
          'metadata': {'step': step, 'process_count': 1}, 'data': [{'doc': step}],
          'arrays': arrays}
  ocp = run_checkpoint.ocp()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as writer:
    writer.save(os.path.join(os.path.abspath(directory), f'ckpt_{step:09d}'),
                args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                        train=ocp.args.StandardSave(rest),
                                        meta=ocp.args.JsonSave(meta)))


def test_a_checkpoint_written_before_the_manager_restores_and_counts_toward_keep(
    tiny_params, tmp_path):
  config, params = tiny_params
  make, state, shardings = _run_state(params)
  run = tmp_path / 'run'
  _write_as_before(run, 5, state, config)
  with run_checkpoints.CheckpointManager(str(run), keep=1) as manager:
    assert manager.steps() == [5]
    restored = manager.restore_latest(jax.eval_shape(make), shardings)
    assert (restored.step, restored.data_position(print)) == (5, {'doc': 5})
    assert _same(restored.params, state.params) and _same(restored.opt_state, state.opt_state)
    assert _same(restored.rng, state.rng)
    manager.save(6, state.params, config, opt_state=state.opt_state, rng=state.rng)
  assert sorted(os.listdir(run)) == ['ckpt_000000006']   # keep=1 removed the old one


def test_a_checkpoint_whose_metadata_step_was_edited_is_refused(tiny_params, tmp_path):
  """The metadata says step 5, the arrays were saved at step 6: refused with one line
  naming the checkpoint and both steps, and left in place (it is no damage to skip)."""
  config, params = tiny_params
  make, state, shardings = _run_state(params)
  run = tmp_path / 'run'
  with run_checkpoints.CheckpointManager(str(run), keep=2) as manager:
    manager.save(6, state.params, config, opt_state=state.opt_state, rng=state.rng)
  meta_file = run / 'ckpt_000000006' / run_checkpoint.META_FILE
  meta = json.loads(meta_file.read_text())
  meta['metadata']['step'] = 5
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(run_checkpoint.StepDisagrees) as info:
    run_checkpoints.CheckpointManager(str(run)).restore_latest(jax.eval_shape(make), shardings)
  message = str(info.value)
  assert message.startswith(f'{run / "ckpt_000000006"}: ') and '\n' not in message
  assert 'saved at step 6' in message and 'says step 5' in message
  assert sorted(os.listdir(run)) == ['ckpt_000000006']


def test_saving_a_step_already_there_replaces_it(tiny_params, tmp_path):
  """A run redoing steps (after a kill) saves a step whose checkpoint is
  still there: the new one replaces it (orbax's manager alone would refuse)."""
  config, params = tiny_params
  make, state, shardings = _run_state(params)
  run = tmp_path / 'run'
  with run_checkpoints.CheckpointManager(str(run), keep=2) as manager:
    for doc in ('first', 'again'):
      manager.save(4, state.params, config, opt_state=state.opt_state, rng=state.rng,
                   data_state={'doc': doc})
  assert sorted(os.listdir(run)) == ['ckpt_000000004']
  restored = run_checkpoints.CheckpointManager(str(run)).restore_latest(
      jax.eval_shape(make), shardings)
  assert restored.data == [{'doc': 'again'}]


def test_a_truncated_array_file_is_one_clean_line_and_the_one_before_is_used(
    tiny_params, tmp_path, capfd):
  """The newest checkpoint's largest array file cut short: restore_latest warns in one
  line naming the checkpoint, the array and the reason, without TensorStore's spec repr,
  and restores the step before; the single-host reader says the same in its error; the
  abandoned reads' tracebacks stay off stderr."""
  config, params = tiny_params
  make, state, shardings = _run_state(params)
  run = tmp_path / 'run'
  with run_checkpoints.CheckpointManager(str(run), keep=2) as manager:
    for step in (2, 4):
      manager.save(step, state.params, config, opt_state=state.opt_state, rng=state.rng)
  newest = run / 'ckpt_000000004'
  victim = max((p for p in (newest / 'params').rglob('*') if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
  with pytest.raises(params_file.CheckpointError) as info:
    loading.load_any(newest)
  capfd.readouterr()
  notes = []
  restored = run_checkpoints.CheckpointManager(str(run)).restore_latest(
      jax.eval_shape(make), shardings, note=notes.append)
  assert restored.step == 2 and _same(restored.params, state.params)
  [warning] = notes
  assert warning.startswith(f'warning: {newest} does not read back (params array '), warning
  assert warning.endswith(f'moved aside to {newest}.corrupt; trying the one before it '
                          f'({run / "ckpt_000000002"})')
  error = str(info.value)
  assert error.startswith(f'{newest}: does not read back (params array '), error
  for line in (warning, error):
    assert '\n' not in line and len(line) < 600
    assert '<bound method' not in line and 'TensorStore({' not in line
    assert 'See full TensorStore details' not in line
  import gc  # pylint: disable=import-outside-toplevel
  gc.collect()
  err = capfd.readouterr().err
  assert 'Traceback' not in err and 'Event loop is closed' not in err, err[:2000]
