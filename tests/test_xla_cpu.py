"""The XLA:CPU kernels compute what the reference formulas compute, values and gradients.

``perceiver.model.xla_cpu`` re-arranges the work (hand-written backward passes, row-major
operands, [rows, C] reductions, a fusion boundary); each test here holds one of its
functions, or the whole model under ``kernels='xla_cpu'``, to the reference formula
differentiated by JAX (``kernels='reference'``), which is the original's computation.

``'auto'`` is compared as a CPU program resolves it (built with
``Compute.resolve(config, 'cpu')``, i.e. the XLA:CPU kernels); that an accelerator's
``'auto'`` is the reference program is checked on the lowered program in
``tests/test_lowering.py``.
"""

import dataclasses
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bench import lowering
from perceiver import configs
from perceiver.model import layers
from perceiver import transform
from perceiver.model import xla_cpu


def _relative(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _tiny(kernels, compute_dtype='float32'):
  config = configs.tiny()
  config.kernels = kernels
  config.compute_dtype = compute_dtype
  return config


@pytest.fixture(scope='module')
def tiny_case():
  config = configs.tiny()
  rng = np.random.default_rng(0)
  ids = rng.integers(6, 262, (2, config.max_seq_len)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 40:] = 0
  ids[mask == 0] = 0
  params = jax.jit(transform.masked_lm(config).init)(jax.random.PRNGKey(3), ids, mask)
  # Non-trivial layer-norm and bias parameters, so their gradients are tested too.
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape),
                                                        p.dtype), params)
  return params, jnp.asarray(ids), jnp.asarray(mask)


# Each setting as the program that runs on this CPU builds it: 'auto' resolved for 'cpu'.
_SETTINGS = ('xla_cpu', 'auto')


def _cpu_model(kernels, compute_dtype='float32'):
  config = _tiny(kernels, compute_dtype)
  return transform.masked_lm(config, compute=layers.Compute.resolve(config, 'cpu'))


def test_auto_on_a_cpu_is_the_xla_cpu_kernels_and_elsewhere_the_reference():
  assert layers.resolve_kernels('auto', 'cpu') == 'xla_cpu'
  for platform in ('cuda', 'rocm', 'tpu', None):
    assert layers.resolve_kernels('auto', platform) == 'reference'
  assert layers.resolve_kernels('reference', 'cpu') == 'reference'


def test_compute_resolves_a_config_per_platform():
  """One value per model: the config's dtype, and its kernels with 'auto' resolved."""
  resolve = layers.Compute.resolve
  assert resolve(_tiny('auto'), 'cpu') == layers.Compute(jnp.float32, 'xla_cpu')
  for platform in ('cuda', 'rocm', 'tpu', None):
    assert resolve(_tiny('auto'), platform) == layers.Compute(jnp.float32, 'reference')
  assert resolve(_tiny('auto')) == layers.REFERENCE == layers.Compute()
  assert resolve(_tiny('reference'), 'cpu').kernels == 'reference'
  assert resolve(_tiny('xla_cpu'), 'tpu').kernels == 'xla_cpu'    # asked for: as asked
  bf16 = resolve(_tiny('auto', 'bfloat16'), 'cpu')
  assert bf16.dtype == jnp.bfloat16 and bf16.low_precision == jnp.bfloat16
  assert layers.REFERENCE.low_precision is None
  assert bf16 == layers.Compute('bfloat16', 'xla_cpu')              # dtype normalised
  with pytest.raises(ValueError, match='resolved for a platform'):
    layers.Compute(jnp.float32, 'auto')
  with pytest.raises(ValueError, match='compute dtype must be one of float32, bfloat16'):
    layers.Compute(jnp.float16)
  with pytest.raises(dataclasses.FrozenInstanceError):
    layers.REFERENCE.kernels = 'xla_cpu'


def test_transform_refuses_a_compute_resolved_from_another_config():
  """A model computes as its config says: a Compute of another dtype, or of kernels the
  config does not allow, is refused rather than silently used."""
  with pytest.raises(ValueError, match='not resolved from this config'):
    transform.masked_lm(_tiny('auto'), compute=layers.Compute('bfloat16', 'xla_cpu'))
  with pytest.raises(ValueError, match='not resolved from this config'):
    transform.classifier(_tiny('reference'), 2, compute=layers.Compute(kernels='xla_cpu'))
  with pytest.raises(TypeError, match='must be a perceiver.model.layers.Compute'):
    transform.encoder(_tiny('auto'), compute='cpu')
  with pytest.raises(ValueError, match="platform must be one of cpu, cuda, rocm, tpu .*'gpu'"):
    transform.masked_lm(_tiny('auto'), platform='gpu')
  with pytest.raises(ValueError, match='give platform .* or compute .*, not both'):
    transform.token_classifier(_tiny('auto'), 2, compute=layers.REFERENCE, platform='cpu')


def test_platform_names_what_a_device_compiles_for():
  """``layers.platform``: a CPU device's is 'cpu', the name ``jax.export`` takes and the
  one ``Compute.resolve`` turns into XLA:CPU's kernels; by default this host's first
  device's."""
  cpu = jax.devices('cpu')[0]
  assert layers.platform(cpu) == 'cpu'
  assert layers.platform() == layers.platform(jax.local_devices()[0])
  jax.export.export(jax.jit(jnp.sin), platforms=[layers.platform(cpu)])(jnp.ones(2))
  assert layers.Compute.resolve(_tiny('auto'), layers.platform(cpu)).kernels == 'xla_cpu'


def _module_counts(module, compute, shape=(1, 8, 6)):
  """Conditionals and barriers in the CPU program of ``module``'s gradient (parameters
  and input), built with ``compute``."""
  net = hk.transform(lambda x: module(compute)(x))
  x = jnp.ones(shape, jnp.float32)
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)   # exported: shapes only
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(net.apply(p, None, x) ** 2), argnums=(0, 1)))
  counts = lowering.count_ops(jax.export.export(grad, platforms=['cpu'])(params, x)
                              .mlir_module())
  return {k: counts[k] for k in ('conditionals', 'optimization_barriers')}


def test_a_module_given_a_compute_computes_with_its_kernels():
  """The XLA:CPU dense layer's backward pass holds one barrier and one written-out
  transpose (a conditional); the reference formula neither. A block passes its compute
  on to every dense layer inside it (4 in the attention, 2 in the MLP) and to its norms."""
  linear = lambda compute: layers.Linear(5, compute=compute)
  assert _module_counts(linear, layers.Compute(kernels='xla_cpu')) == {
      'conditionals': 1, 'optimization_barriers': 1}
  assert _module_counts(linear, layers.REFERENCE) == {
      'conditionals': 0, 'optimization_barriers': 0}
  block = lambda compute: (lambda x: layers.SelfAttention(num_heads=2, compute=compute)(
      x, is_training=False))
  counts = _module_counts(block, layers.Compute(kernels='xla_cpu'))
  # 6 dense layers: 6 barriers; their transposes and the attention's 4: 10 conditionals.
  assert counts == {'conditionals': 6 + 4, 'optimization_barriers': 6}, counts
  assert _module_counts(block, layers.REFERENCE) == {
      'conditionals': 0, 'optimization_barriers': 0}


def _loss_and_grads(kernels, params, ids, mask, compute_dtype='float32'):
  model = _cpu_model(kernels, compute_dtype)
  weights = jnp.linspace(-1.0, 1.0, 262)

  def loss(p):
    return jnp.sum(jnp.tanh(model.apply(p, None, ids, mask)) * weights)

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
def test_the_model_under_each_kernels_setting_gives_the_same_loss_and_gradients(tiny_case):
  params, ids, mask = tiny_case
  ref_loss, ref_grads = _loss_and_grads('reference', params, ids, mask)
  # Leaves whose true gradient is 0 (the keys' bias: softmax ignores a shift shared by
  # all keys) hold rounding noise only; they are held to the whole gradient's scale.
  scale = float(optax.tree.norm(ref_grads))
  for kernels in _SETTINGS:
    loss, grads = _loss_and_grads(kernels, params, ids, mask)
    assert abs(float(loss - ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
      error = float(jnp.linalg.norm(a - b))
      assert error <= 1e-5 * (float(jnp.linalg.norm(b)) + 1e-3 * scale), (
          kernels, jax.tree_util.keystr(path), error)


@pytest.mark.slow
def test_bfloat16_gradients_are_as_close_to_float32_under_each_kernels_setting(tiny_case):
  """In bfloat16 the kernels round differently (xla_cpu keeps dx in float32); each is
  held to the float32 reference: as close as the reference formula's own bfloat16."""
  params, ids, mask = tiny_case
  _, exact = _loss_and_grads('reference', params, ids, mask)
  flat = lambda tree: jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(tree)])
  error = {k: _relative(flat(_loss_and_grads(k, params, ids, mask, 'bfloat16')[1]),
                        flat(exact)) for k in layers.KERNELS}
  assert error['reference'] < 5e-2
  for kernels in _SETTINGS:
    assert error[kernels] <= 1.5 * error['reference'] + 1e-3, error


def test_kernels_settings_give_the_same_logits_and_are_checked(tiny_case):
  params, ids, mask = tiny_case
  logits = {k: jax.jit(_cpu_model(k).apply)(params, None, ids, mask) for k in layers.KERNELS}
  for kernels in _SETTINGS:
    np.testing.assert_allclose(logits[kernels], logits['reference'], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='kernels must be one of'):
    transform.masked_lm(_tiny('cuda'))


def _matmul_case():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 24, 40)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((40, 56)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((2, 24, 56)), jnp.float32)
  plain = lambda dtype: lambda x, w: layers.dense_formula(x, w, dtype=dtype)
  grad = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * dy), argnums=(0, 1)))(x, w)
  return x, w, plain, grad


def test_matmul_float32_values_and_gradients_are_jaxs_own():
  x, w, plain, grad = _matmul_case()
  ours = lambda x, w: xla_cpu.matmul(x, w, dtype=jnp.float32)
  np.testing.assert_array_equal(jax.jit(ours)(x, w), jax.jit(plain(jnp.float32))(x, w))
  for a, b in zip(grad(ours), grad(plain(jnp.float32))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_matmul_bfloat16_gradients_follow_the_precision_policy():
  """Forward values are JAX's own. The backward products also take bfloat16 inputs and
  accumulate in float32 (JAX's own derivative instead rounds dx to bfloat16): at least as
  close to the float32 gradients as JAX's."""
  x, w, plain, grad = _matmul_case()
  ours = lambda x, w: xla_cpu.matmul(x, w, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(jax.jit(ours)(x, w), jax.jit(plain(jnp.bfloat16))(x, w))
  exact = grad(plain(jnp.float32))
  for mine, jaxs, want in zip(grad(ours), grad(plain(jnp.bfloat16)), exact):
    assert mine.dtype == jnp.float32
    assert _relative(mine, want) < 1e-2
    assert _relative(mine, want) <= 1.5 * _relative(jaxs, want) + 1e-4


# [1, N, C] (the model's layout) in the default run; the batched and 2-D layouts slow.
@pytest.mark.parametrize('shape', [(1, 7, 5), pytest.param((3, 7, 5), marks=pytest.mark.slow),
                                   pytest.param((7, 5), marks=pytest.mark.slow)])
@pytest.mark.parametrize('kernels', ['reference', 'xla_cpu'])
def test_layer_norm_is_haikus_values_names_and_gradients(shape, kernels):
  """Both kernels give hk.LayerNorm's values bit for bit, its parameter names, and its
  gradients to float32 rounding (xla_cpu sums the parameters' over a [rows, C] view)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)

  def net(module):
    return hk.transform(lambda x: module()(x) * 1.5)

  ours = net(lambda: layers.LayerNorm(compute=layers.Compute(kernels=kernels)))
  theirs = net(lambda: hk.LayerNorm(axis=-1, create_scale=True, create_offset=True))
  params = ours.init(None, x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, theirs.init(None, x)) == {'layer_norm': {'offset': (5,), 'scale': (5,)}}
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                        params)
  np.testing.assert_array_equal(jax.jit(ours.apply)(params, None, x),
                                jax.jit(theirs.apply)(params, None, x))
  grad = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(f.apply(p, None, x) * dy),
                                    argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(theirs))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bias_gradient_is_the_column_sum_of_the_cotangent():
  rng = np.random.default_rng(1)
  shape = (1, 7, 5)
  b = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  db = jax.grad(lambda b: jnp.sum(xla_cpu.broadcast_rows(b, shape) * dy))(b)
  np.testing.assert_allclose(db, np.asarray(dy).reshape(-1, shape[-1]).sum(0), rtol=1e-6)


def test_fusion_barrier_is_the_identity_with_an_identity_gradient():
  x = jnp.arange(12.0).reshape(3, 4)
  value, vjp = jax.vjp(xla_cpu.fusion_barrier, x)
  np.testing.assert_array_equal(value, x)
  np.testing.assert_array_equal(vjp(jnp.ones_like(x) * 3)[0], jnp.full_like(x, 3))


def _textbook_attend(q, k, v, mask, dtype):
  """softmax(q k^T / sqrt(d)) v per head, masked, with rows attending to nothing zeroed:
  written independently of the project's code, differentiated by JAX."""
  cast = lambda a: a.astype(dtype)
  logits = jnp.einsum('bnhd,bmhd->bhnm', cast(q), cast(k), preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None] != 0, logits / math.sqrt(q.shape[-1]), -1e30)
  weights = jax.nn.softmax(logits)
  out = jnp.einsum('bhnm,bmhd->bnhd', cast(weights), cast(v), preferred_element_type=jnp.float32)
  out = out.reshape(out.shape[:2] + (-1,))
  return jnp.where(jnp.all(mask == 0, axis=2, keepdims=True), 0.0, out)


# The two implementations ('auto' unresolved is the reference); bfloat16 in the slow run.
@pytest.mark.parametrize('kernels', ['reference', 'xla_cpu'])
@pytest.mark.parametrize('dtype', [jnp.float32,
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_attend_values_and_gradients_match_the_formula(dtype, kernels):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 6, 3, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 9, 3, 4)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 9, 3, 5)), jnp.float32)
  mask = np.ones((2, 6, 9), np.int32)
  mask[0, :, 7:] = 0
  mask[1, 2] = 0       # a query with nothing to attend to
  mask = jnp.asarray(mask)
  g = jnp.asarray(rng.standard_normal((2, 6, 15)), jnp.float32)
  ours = lambda q, k, v: hk.transform(lambda: layers.attend(
      q, k, v, attention_mask=mask, compute=layers.Compute(dtype, kernels))).apply({}, None)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * g)
  exact = jax.grad(loss(lambda *a: _textbook_attend(*a, mask, jnp.float32)),
                   argnums=(0, 1, 2))(q, k, v)
  mine = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(ours(q, k, v), _textbook_attend(q, k, v, mask, dtype),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(mine, exact):
    assert _relative(a, b) < tolerance
