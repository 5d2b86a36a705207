"""The train step as each platform compiles it, lowered from this CPU host by jax.export.

A GPU or TPU program must be the original's clean computation: no conditional (which
XLA:GPU resolves by reading its predicate on the host) and no optimization barrier. The
XLA:CPU kernels, and their conditionals and barriers, belong to the CPU program only.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from bench import lowering
from perceiver import configs
from perceiver import transform


def _counts(platform, kernels='auto', preset=None, resolve=True):
  config = configs.get(preset) if preset else configs.tiny()
  config.kernels = kernels
  return lowering.count_ops(lowering.train_step_text(config, platform, resolve=resolve))


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_accelerator_train_step_has_no_conditional_and_no_barrier(platform):
  """Forward, backward and LAMB, built for the platform as training builds it."""
  counts = _counts(platform)
  assert counts['conditionals'] == 0 and counts['optimization_barriers'] == 0, counts


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


def test_platform_neutral_program_chooses_per_platform_at_lowering():
  """Built without knowing the platform (the library default), 'auto' is chosen when
  lowering: for a GPU no barrier (the XLA:CPU kernels are not there) and only
  platform-selection conditionals on a constant index, which XLA folds before it
  optimises anything: compiled here for the CPU, the platform-neutral gradient holds
  exactly the 'xla_cpu' program's conditionals."""
  gpu = _counts('cuda', resolve=False)
  assert gpu['optimization_barriers'] == 0 and gpu['conditionals'] > 0

  ids = jnp.ones((2, 64), jnp.int32)

  def compiled_conditionals(kernels):
    config = configs.tiny()
    config.kernels = kernels
    model = transform.masked_lm(config)
    params = model.init(jax.random.PRNGKey(0), ids)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, None, ids) ** 2)))
    return len(re.findall(r'\bconditional\(', grad.lower(params).compile().as_text()))

  assert compiled_conditionals('auto') == compiled_conditionals('xla_cpu') > 0
  assert compiled_conditionals('reference') == 0


def test_count_ops_reads_stablehlo_text():
  text = ('%0 = "stablehlo.case"(%i) ({...}) : ...\n'
          '%1 = stablehlo.optimization_barrier %x : tensor<2xf32>\n'
          '%2 = stablehlo.if %p ... stablehlo.custom_call @foo(%a)\n')
  assert lowering.count_ops(text) == {'conditionals': 2, 'optimization_barriers': 1,
                                      'custom_calls': 1}
