"""The train step as each platform compiles it, lowered from this CPU host by jax.export.

A GPU or TPU program must be the original's clean computation: no conditional (which
XLA:GPU resolves by reading its predicate on the host) and no optimization barrier. The
XLA:CPU kernels, and their conditionals and barriers, belong to programs built for the CPU
only.
"""

import jax
import jax.numpy as jnp
import pytest

from bench import lowering
from perceiver import configs
from perceiver import transform


def _counts(platform, kernels='auto', preset=None, built_for=None):
  config = configs.get(preset) if preset else configs.tiny()
  config.kernels = kernels
  return lowering.count_ops(lowering.train_step_text(config, platform, built_for=built_for))


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_accelerator_train_step_has_no_conditional_and_no_barrier(platform):
  """Forward, backward and LAMB, built for the platform as training builds it."""
  counts = _counts(platform)
  assert counts['conditionals'] == 0 and counts['optimization_barriers'] == 0, counts


@pytest.mark.slow
def test_released_model_train_step_lowers_cleanly_for_gpu():
  counts = _counts('cuda', preset='language_mlm')
  assert counts['conditionals'] == 0 and counts['optimization_barriers'] == 0, counts


def test_cpu_program_keeps_the_xla_cpu_kernels_under_auto():
  """'auto' for the CPU is the 'xla_cpu' program. For the tiny model (24 dense layers,
  4 attentions, 2 latent self-attends): one barrier per dense layer's backward pass, one
  conditional per written-out transpose (1 per dense layer, 4 per attention) and per
  fusion boundary between self-attends: 24 + 16 + 2."""
  auto, cpu = _counts('cpu'), _counts('cpu', kernels='xla_cpu')
  assert auto == cpu
  assert auto['conditionals'] == 24 + 4 * 4 + 2 and auto['optimization_barriers'] == 24


def test_reference_kernels_lower_to_the_clean_program_on_the_cpu_too():
  counts = _counts('cpu', kernels='reference')
  assert counts['conditionals'] == 0 and counts['optimization_barriers'] == 0, counts


@pytest.mark.slow
def test_a_model_built_without_a_platform_is_the_clean_program_everywhere():
  """A model built where the platform is not known (the library's default: e.g. built on
  a CPU host and exported for a GPU) is the original's computation: no conditional, no
  barrier, for any platform; and the train step built for an accelerator, lowered for
  any platform (the CPU included), is clean too: nothing in it depends on where it is
  lowered."""
  ids = jnp.ones((2, 64), jnp.int32)
  model = transform.masked_lm(configs.tiny())
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
  grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, None, ids) ** 2)))
  for platform in ('cuda', 'tpu', 'cpu'):
    text = jax.export.export(grad, platforms=[platform])(params).mlir_module()
    counts = lowering.count_ops(text)
    assert counts['conditionals'] == 0 and counts['optimization_barriers'] == 0, counts
    counts = _counts(platform, built_for='tpu')
    assert counts['conditionals'] == 0 and counts['optimization_barriers'] == 0, counts


def test_platform_picks_the_kernels_of_a_model_built_by_transform():
  """``transform.masked_lm(config, platform=...)``: research code gets the CPU program
  without the training library; the accelerator's and the unknown platform's are the
  reference program, free of the XLA:CPU kernels' conditionals and barriers."""
  ids = jnp.ones((2, 64), jnp.int32)

  def counts(platform):
    model = transform.masked_lm(configs.tiny(), platform=platform)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, None, ids) ** 2)))
    return lowering.count_ops(jax.export.export(grad, platforms=['cpu'])(params).mlir_module())

  cpu = counts('cpu')
  assert cpu['optimization_barriers'] > 0 and cpu['conditionals'] > 0
  for platform in ('cuda', 'tpu', None):
    other = counts(platform)
    assert other['conditionals'] == 0 and other['optimization_barriers'] == 0, platform


def test_count_ops_reads_stablehlo_text():
  text = ('%0 = "stablehlo.case"(%i) ({...}) : ...\n'
          '%1 = stablehlo.optimization_barrier %x : tensor<2xf32>\n'
          '%2 = stablehlo.if %p ... stablehlo.custom_call @foo(%a)\n')
  assert lowering.count_ops(text) == {'conditionals': 2, 'optimization_barriers': 1,
                                      'custom_calls': 1}
