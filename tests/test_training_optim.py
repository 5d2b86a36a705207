"""The fused LAMB against optax's chain: same state, same updates up to float rounding;
and the layout of optax's LAMB state that the fused LAMB depends on."""

import jax
import numpy as np
import optax
import pytest

from perceiver.training import optim
from train.configs import mlm as mlm_configs


def _config(**overrides):
  config = mlm_configs.get_config('paper').optimizer
  config.unlock()
  config.update(dict(warmup_steps=2, decay_steps=50), **overrides)
  return config


# A few leaves of each kind the model has (matrices and embeddings are decayed; biases
# and layer-norm vectors are not), small enough that each optimizer compiles in a second
# or two; the updates are per leaf, so more leaves of the same kinds test nothing more.
_SHAPES = {
    'embed': {'embeddings': (262, 16)},
    'trainable_position_encoding': {'pos_embs': (64, 16)},
    'cross_attention/linear': {'w': (16, 24), 'b': (24,)},
    'cross_attention/layer_norm': {'scale': (16,), 'offset': (16,)},
    'self_attention/mlp/linear_1': {'w': (24, 96), 'b': (96,)},
    'embedding_decoder': {'bias': (262,)},
}


def _params_and_grads(scale):
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 32))
  params = {m: {n: 0.02 * jax.random.normal(next(keys), shape) for n, shape in d.items()}
            for m, d in _SHAPES.items()}
  grads = jax.tree.map(lambda p: scale * jax.random.normal(next(keys), p.shape), params)
  return params, grads


# The first case in the default run; the other two (each compiles both optimizers) slow.
@pytest.mark.parametrize('clip,scale', [pytest.param(1.0, 1.0, marks=pytest.mark.slow),
                                        (1.0, 1e-3),
                                        pytest.param(0.0, 1.0, marks=pytest.mark.slow)])
def test_fused_lamb_matches_optax(clip, scale):
  """Clipping on (triggered or not) and off; weight decay on matrices only."""
  config = _config(clip_grad_norm=clip, implementation='fused')
  fused, reference = optim.make(config), optim.reference(config)
  params, grads = _params_and_grads(scale)
  state_f, state_r = fused.init(params), reference.init(params)
  assert jax.tree.structure(state_f) == jax.tree.structure(state_r)
  p_f = p_r = params
  for _ in range(4):
    u_f, state_f = jax.jit(fused.update)(grads, state_f, p_f)
    u_r, state_r = jax.jit(reference.update)(grads, state_r, p_r)
    for a, b in zip(jax.tree.leaves(u_f), jax.tree.leaves(u_r)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-12)
    p_f, p_r = optax.apply_updates(p_f, u_f), optax.apply_updates(p_r, u_r)
  for a, b in zip(jax.tree.leaves(state_f), jax.tree.leaves(state_r)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-12)


@pytest.mark.slow
def test_fused_lamb_state_loads_into_the_reference_and_back():
  config = _config()
  params, grads = _params_and_grads(1.0)
  fused, reference = optim.fused_lamb(config), optim.reference(config)
  state = jax.jit(fused.update)(grads, fused.init(params), params)[1]
  # A state written by one continues in the other (checkpoints stay interchangeable).
  u_f, _ = jax.jit(fused.update)(grads, state, params)
  u_r, _ = jax.jit(reference.update)(grads, state, params)
  for a, b in zip(jax.tree.leaves(u_f), jax.tree.leaves(u_r)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-12)


def test_optax_lamb_state_is_laid_out_as_the_fused_lamb_reads_it():
  """Fails when an optax release changes the state that ``fused_lamb`` unpacks: its
  (adam, masked decay, trust ratio, schedule) tuple after the clipping state."""
  params, _ = _params_and_grads(1.0)
  state = optim.reference(_config()).init(params)
  clip_state, lamb_state = state
  assert type(clip_state).__name__ == 'EmptyState'
  assert [type(s).__name__ for s in lamb_state] == [
      'ScaleByAdamState', 'MaskedState', 'EmptyState', 'ScaleByScheduleState']
  adam = lamb_state[0]
  assert adam._fields == ('count', 'mu', 'nu')
  assert jax.tree.structure(adam.mu) == jax.tree.structure(params)
  assert lamb_state[3]._fields == ('count',)
  assert optim.unpack_lamb_state(lamb_state) is lamb_state
  with pytest.raises(TypeError, match="implementation='optax'"):
    optim.unpack_lamb_state(lamb_state[:3])


def test_auto_is_the_fused_lamb_for_the_cpu_and_optax_elsewhere():
  config = _config(implementation='auto')
  params, grads = _params_and_grads(1.0)
  state = optim.reference(config).init(params)
  program = lambda tx: str(jax.make_jaxpr(tx.update)(grads, state, params))
  fused, ref = program(optim.fused_lamb(config)), program(optim.reference(config))
  assert fused != ref
  for platform, expected in (('cpu', fused), ('cuda', ref), ('tpu', ref), (None, ref)):
    assert program(optim.make(config, platform=platform)) == expected, platform


@pytest.mark.slow
def test_implementation_is_checked():
  with pytest.raises(ValueError, match='implementation'):
    optim.make(_config(implementation='nope'))
  # 'optax' is optax's own chain whatever the platform; 'fused' the fused update.
  params, grads = _params_and_grads(1.0)
  state = optim.reference(_config()).init(params)
  program = lambda tx: str(jax.make_jaxpr(tx.update)(grads, state, params))
  for platform in ('cpu', 'cuda', None):
    assert program(optim.make(_config(implementation='optax'), platform=platform)) == (
        program(optim.reference(_config())))
    assert program(optim.make(_config(implementation='fused'), platform=platform)) == (
        program(optim.fused_lamb(_config())))
