"""The step over a device mesh (perceiver.training.mesh, perceiver.training.step): the
placement rules, the batch layout, and, on 8 simulated CPU devices in a subprocess
(tests/scripts/mesh_checks.py), data=8 and fsdp=8 against one device, the compiled step's
per-device state memory, and the 8-device step exported for GPU and TPU."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from perceiver import configs
from perceiver import transform
from perceiver.training import driver
from perceiver.training import mesh as mesh_lib
from perceiver.training import optim
from train.configs import mlm as mlm_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rules_shard_each_matrix_on_its_largest_divisible_axis():
  assert mesh_lib.rule((768, 1280), 8) == ('matrix', P(None, 'fsdp'))
  assert mesh_lib.rule((262, 768), 8) == ('matrix', P(None, 'fsdp'))     # 262 % 8 != 0
  assert mesh_lib.rule((2048, 768), 8) == ('matrix', P('fsdp', None))
  assert mesh_lib.rule((256, 256), 8) == ('matrix', P('fsdp', None))     # the first
  assert mesh_lib.rule((262, 7), 8) == ('matrix, no dimension divisible', P())
  assert mesh_lib.rule((1280,), 8) == ('vector or scalar', P())
  assert mesh_lib.rule((), 8) == ('vector or scalar', P())
  assert mesh_lib.rule((768, 1280), 1) == ('matrix', P())


def test_mesh_shape_from_the_config_and_its_errors():
  assert mesh_lib.resolve_shape(-1, 1, 8) == (8, 1)
  assert mesh_lib.resolve_shape(-1, 4, 8) == (2, 4)
  assert mesh_lib.resolve_shape(2, -1, 8) == (2, 4)
  assert mesh_lib.resolve_shape(2, 4, 8) == (2, 4)
  for data, fsdp, message in ((3, -1, r'mesh.data=3 does not divide the 8 device'),
                              (2, 2, r'mesh.data=2 x mesh.fsdp=2 must be the 8 device'),
                              (-1, -1, 'cannot both be -1'),
                              (0, 1, r'mesh.data must be an integer >= 1, or -1')):
    with pytest.raises(ValueError, match=message):
      mesh_lib.resolve_shape(data, fsdp, 8)
  mesh = mesh_lib.make(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}))
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1}


def test_rules_report_counts_and_names_what_does_not_divide():
  mesh = mesh_lib.make()
  tree = {'a': np.zeros((4, 6)), 'b': np.zeros(6)}
  lines = mesh_lib.rules_report(mesh, tree)
  assert lines[0].startswith('placement on mesh data 1 x fsdp 1')
  assert any('matrix' in line and '1 arrays, 24 values' in line for line in lines)
  assert any('vector or scalar' in line and '1 arrays, 6 values' in line for line in lines)


def _program(model, length=16):
  ids = jnp.ones((1, length), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
  return str(jax.make_jaxpr(model.apply)(params, None, ids))


def test_the_driver_resolves_how_the_model_computes_from_the_mesh_devices():
  """``Run.create`` resolves the platform once, from the mesh's devices, and the apps
  build their models through ``run.build``, which passes it: on a CPU mesh 'auto' is
  XLA:CPU's kernels, whose custom backward passes (custom_vjp) the reference formulas
  have none of; a config that names its kernels keeps them."""
  one = ml_collections.ConfigDict({'data': 1, 'fsdp': 1})
  optimizer = mlm_configs.get_config('smoke').optimizer
  config = configs.tiny(16)
  run = driver.Run.create(one, optimizer, config, jax.devices()[:1])
  assert run.platform == 'cpu'
  built = []
  run.build(lambda *args, platform: built.append((args, platform)), 3)
  assert built == [((config, 3), 'cpu')]
  assert 'custom_vjp' in _program(run.build(transform.masked_lm))
  assert 'custom_vjp' not in _program(transform.masked_lm(config))
  config.kernels, config.compute_dtype = 'reference', 'bfloat16'
  run = driver.Run.create(one, optimizer, config, jax.devices()[:1])
  program = _program(run.build(transform.masked_lm))
  assert 'custom_vjp' not in program and 'bf16' in program


def test_a_run_created_for_another_platform_builds_its_program_on_these_devices():
  """``Run.create(..., platform='cuda')`` on this CPU host: the model and the optimizer
  as a GPU run builds them (the reference formulas, optax's LAMB), over the CPU mesh
  given, and its one train step lowers for 'cuda' (tests/test_lowering.py counts what it
  holds)."""
  one = ml_collections.ConfigDict({'data': 1, 'fsdp': 1})
  config = configs.tiny(16)
  optimizer = mlm_configs.get_config('smoke').optimizer
  cpu = driver.Run.create(one, optimizer, config, jax.devices()[:1])
  gpu = driver.Run.create(one, optimizer, config, jax.devices()[:1], platform='cuda')
  assert gpu.platform == 'cuda' and gpu.mesh.devices.flat[0].platform == 'cpu'
  assert 'custom_vjp' not in _program(gpu.build(transform.masked_lm))
  # Its update is optax's chain (optim.reference), not the CPU's fused LAMB.
  params = {'w': jnp.ones((4, 4)), 'b': jnp.ones(4)}

  def update(tx):
    return str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))

  assert update(gpu.optimizer) == update(optim.reference(optimizer))
  assert update(cpu.optimizer) != update(gpu.optimizer)


def test_round_up_and_the_batch_layout():
  assert [mesh_lib.round_up(v, 8) for v in (0, 1, 8, 9, 17)] == [0, 8, 8, 16, 24]
  devices = jax.device_count()
  layout = mesh_lib.batch_layout(6 * devices, 3)
  assert layout == {'per_device': 2, 'accum': 3, 'local_devices': jax.local_device_count(),
                    'host_batch': 6 * jax.local_device_count(), 'devices': devices}
  with pytest.raises(ValueError, match=r'train.batch_size=5 must be a positive multiple of '
                     r'devices \(\d+\) x train.grad_accum_steps \(2\)'):
    mesh_lib.batch_layout(5, 2, 'train.batch_size', 'train.grad_accum_steps')


def test_accumulation_layout_keeps_each_devices_rows_contiguous():
  """[host_batch] -> [accum, micro]: on one device micro-batch i is rows i*per.."""
  mesh = mesh_lib.make(devices=jax.devices()[:1])
  rows = np.arange(12)
  out = mesh_lib.to_host(mesh_lib.shard_batch({'x': rows}, mesh, accum_steps=3))['x']
  np.testing.assert_array_equal(out, rows.reshape(3, 4))
  flat = mesh_lib.to_host(mesh_lib.shard_batch({'x': rows}, mesh))['x']
  np.testing.assert_array_equal(flat, rows)
  with pytest.raises(ValueError, match='local batch of 12 does not split'):
    mesh_lib.shard_batch({'x': rows}, mesh, accum_steps=5)


@pytest.fixture(scope='module')
def eight_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, str(ROOT / 'tests/scripts/mesh_checks.py')], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=1800)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout)


@pytest.mark.slow
def test_data8_and_fsdp8_train_like_one_device(eight_devices):
  """3 steps from the same start on the same global batches (LAMB fused and optax), at
  the full learning rate after one step of warm-up: the parameters move by far more
  than the layouts may differ by (a thousandth of that movement), so agreeing is not
  agreeing on barely moved parameters."""
  assert set(eight_devices['runs']) == {'fused data=8 fsdp=1', 'fused data=1 fsdp=8',
                                        'optax data=1 fsdp=8'}
  for name, run in eight_devices['runs'].items():
    np.testing.assert_allclose(run['losses'], run['reference_losses'], rtol=1e-5,
                               err_msg=name)
    assert run['param_difference'] < 1e-3 * run['param_movement'], (name, run)
    # They moved: by more than a thousandth of their size (3 steps of the smoke preset's
    # own 100-step warm-up move them by less).
    assert run['param_movement'] > 1e-3 * run['param_norm'], (name, run)
    if 'fsdp=8' in name:   # the parameters were split, not replicated
      assert "P('fsdp', None)" in run['specs'] and "P(None, 'fsdp')" in run['specs'], run
    else:
      assert run['specs'] == ['P()'], run


@pytest.mark.slow
def test_fsdp8_holds_at_most_a_sixth_of_the_replicated_state_per_device(eight_devices):
  sizes = eight_devices['state_bytes']
  assert sizes['fsdp8'] * 6 <= sizes['replicated'], sizes


@pytest.mark.slow
def test_eight_device_step_exports_for_gpu_and_tpu_without_conditionals_or_barriers(
    eight_devices):
  assert len(eight_devices['exported']) == 4
  for name, counts in eight_devices['exported'].items():
    assert counts['conditionals'] == 0 and counts['optimization_barriers'] == 0, (name, counts)
