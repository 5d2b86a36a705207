"""Rematerialisation (the model config's ``remat``) and the activations' batch layout on
a mesh: the same parameters, losses and gradients as without them, on one device and on
8 simulated devices (replicated and FSDP), and what the accelerator program holds."""

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

from bench import lowering
from perceiver import configs
from perceiver import transform
from perceiver.model import layers
from perceiver.model import modules
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent
POLICIES = ('block', 'block_save_dots')


def _config(remat, dropout=0.1):
  config = configs.tiny()
  config.encoder.dropout_prob = dropout
  config.remat = remat
  return config


@pytest.mark.parametrize('remat', POLICIES)
def test_remat_keeps_the_released_parameter_tree(remat):
  """Every name and shape of DeepMind's released checkpoint, under each policy."""
  config = configs.language_mlm()
  config.remat = remat
  ids = jax.ShapeDtypeStruct((1, config.max_seq_len), jnp.int32)
  model = transform.masked_lm(config)
  tree = jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), i), ids)
  ours = {f'{m}/{n}': tuple(v.shape) for m, d in tree.items() for n, v in d.items()}
  assert ours == helpers.released_param_shapes()


@pytest.mark.parametrize('kernels, remat', [
    ('reference', 'block'),
    pytest.param('reference', 'block_save_dots', marks=pytest.mark.slow),
    pytest.param('xla_cpu', 'block', marks=pytest.mark.slow),
    pytest.param('xla_cpu', 'block_save_dots', marks=pytest.mark.slow)])
def test_remat_gives_the_same_loss_and_gradients(kernels, remat):
  """Training mode with dropout: a recomputed block must draw the same masks."""
  ids = jnp.asarray(np.random.default_rng(0).integers(6, 262, (2, 64)), jnp.int32)
  results = {}
  params = None
  for policy in ('none', remat):
    model = transform.masked_lm(_config(policy), compute=layers.Compute(jnp.float32, kernels))
    if params is None:   # one set of random parameters (the tree is the same for every policy)
      params = helpers.params_like(model, ids, seed=0, scale=0.05)
    loss = lambda p, m=model: jnp.mean(m.apply(p, jax.random.PRNGKey(3), ids,
                                               is_training=True) ** 2)
    results[policy] = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(results[remat][0], results['none'][0], rtol=1e-6)
  for got, want in zip(jax.tree.leaves(results[remat][1]), jax.tree.leaves(results['none'][1])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=remat)


def _blocks(config):
  """The attention blocks a policy recomputes: the encoder's cross-attend, each latent
  self-attend, the decoder's cross-attend."""
  encoder = config.encoder
  return 1 + encoder.num_self_attends_per_block * encoder.num_blocks + 1


@pytest.mark.parametrize('platform', ['cuda', pytest.param('tpu', marks=pytest.mark.slow)])
def test_accelerator_program_holds_one_barrier_per_recomputed_block(platform):
  """Without remat the GPU/TPU train step holds no conditional and no optimization
  barrier. With a policy it holds no conditional, and exactly the barriers
  ``jax.checkpoint``'s prevent_cse asks for: one per recomputed block, so that XLA
  cannot merge the recomputation back into the forward pass (which would keep the
  activations the policy drops)."""
  counts = lowering.count_ops(lowering.train_step_text(_config('none'), platform))
  assert counts['conditionals'] == 0 and counts['optimization_barriers'] == 0, counts
  for remat in POLICIES:
    config = _config(remat)
    counts = lowering.count_ops(lowering.train_step_text(config, platform))
    assert counts['conditionals'] == 0, (remat, counts)
    assert counts['optimization_barriers'] == _blocks(config) == 4, (remat, counts)


def test_an_unknown_policy_is_one_error_naming_the_field():
  config = configs.tiny()
  config.remat = 'everything'
  with pytest.raises(ValueError, match=r"^remat must be one of none, block, "
                     r"block_save_dots; got 'everything'$"):
    transform.masked_lm(config)
  with pytest.raises(ValueError, match='^remat must be one of'):
    modules.rematerialised(lambda x: x, 'everything')


def test_older_configs_train_without_remat_and_may_change_it_on_resume():
  old = configs.tiny().to_dict()
  del old['remat']
  assert configs.upgrade(ml_collections.ConfigDict(old)).remat == 'none'
  assert 'remat' in configs.COMPUTE_FIELDS


@pytest.fixture(scope='module')
def eight_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  script = ROOT / 'tests' / 'scripts' / 'remat_checks.py'
  done = subprocess.run([sys.executable, str(script)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=1800)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout)


@pytest.mark.slow
def test_remat_and_layouts_train_like_one_device_without_them(eight_devices):
  """3 steps with dropout from the same start on the same batches: remat off and on, on
  one device, data 8 and fsdp 8, against one device without remat. The parameters must
  agree to a thousandth of how far the 3 steps moved them."""
  assert len(eight_devices['runs']) == 6
  for name, run in eight_devices['runs'].items():
    np.testing.assert_allclose(run['losses'], run['reference_losses'], rtol=1e-5,
                               err_msg=name)
    assert run['param_difference'] < 1e-3 * run['param_movement'], (name, run)


@pytest.mark.slow
def test_eight_device_gpu_program_lays_out_activations_and_adds_only_remat_barriers(
    eight_devices):
  """Over fsdp 8 the program constrains the activations' layout (more sharding
  constraints than the one-device program, which constrains only the gradients), and
  holds no conditional; barriers only with remat, one per recomputed block."""
  exported = eight_devices['exported']
  for name, counts in exported.items():
    assert counts['conditionals'] == 0, (name, counts)
    assert counts['optimization_barriers'] == (4 if 'remat=block' in name else 0), (name,
                                                                                   counts)
  for remat in ('none', 'block'):
    assert (exported[f'remat={remat} fsdp 8']['sharding_constraints'] >
            exported[f'remat={remat} one device']['sharding_constraints']), exported


@pytest.mark.parametrize('name', ['gpu_24gb', 'gpu_24gb_short', 'gpu_80gb', 'gpus_8x80gb'])
def test_gpu_presets_remat_in_bfloat16_and_reach_their_batch_by_accumulation(name):
  from train import mlm   # pylint: disable=import-outside-toplevel
  from train.configs import mlm as mlm_configs   # pylint: disable=import-outside-toplevel
  config = mlm_configs.get_config(name)
  mlm.check_config(config)
  configs.validate(config.model)
  assert (config.model.remat, config.model.compute_dtype) == ('block', 'bfloat16')
  host = mlm_configs.GPU_HOSTS[name.replace('_short', '')]
  assert (config.train.batch_size == config.train.grad_accum_steps *
          host['per_device_batch'] * host['devices'])
  paper = mlm_configs.get_config('paper')
  if name.endswith('_short'):
    assert config.train.batch_size < paper.train.batch_size
    assert config.train.steps < paper.train.steps
  else:
    assert (config.train.batch_size, config.train.steps) == (paper.train.batch_size,
                                                             paper.train.steps)
