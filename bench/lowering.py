r"""What the train step compiles to on each platform, without a device: ``jax.export``.

    python -m bench.lowering --preset=language_mlm --platforms=cpu,cuda,tpu

Lowers ``train.mlm``'s whole train step (forward, backward, LAMB update) for each
platform from this host and counts the StableHLO ops that stand between XLA and a clean
program: conditionals (``stablehlo.case``/``stablehlo.if``) and optimization barriers.
With ``kernels='auto'`` a GPU or TPU program holds none: the XLA:CPU kernels
(``perceiver.model.xla_cpu``) are chosen only when lowering for the CPU.
"""

from __future__ import annotations

import re
from typing import Dict, Sequence

from absl import app
from absl import flags
import jax
from jax import export
import jax.numpy as jnp

from perceiver import configs
from perceiver.model import layers
from perceiver import transform
from train import mlm
from perceiver.training import optim
from perceiver.training import mesh as mesh_lib
from perceiver.training import step as step_lib
from train.configs import mlm as mlm_configs

COUNTED = {
    'conditionals': re.compile(r'\bstablehlo\.(case|if)\b'),
    'optimization_barriers': re.compile(r'\bstablehlo\.optimization_barrier\b'),
    'custom_calls': re.compile(r'\bstablehlo\.custom_call\b'),
}


def count_ops(mlir_text: str) -> Dict[str, int]:
  """How many of each ``COUNTED`` op a StableHLO module's text holds."""
  return {name: len(pattern.findall(mlir_text)) for name, pattern in COUNTED.items()}


def train_step_text(model_config, platform: str, batch_size: int = 1,
                    optimizer_config=None, resolve: bool = True, mesh=None) -> str:
  """The StableHLO text of one train step for ``platform``, lowered from this host.

  The step is ``perceiver.training.step.make_train_step``'s, jitted over ``mesh`` (default:
  one device; any mesh of this host's devices, e.g. 8 simulated CPU devices standing for
  8 GPUs) with its shardings, ``train.mlm``'s loss and the paper's LAMB; only shapes are
  used, so the released model lowers in seconds without allocating its parameters.
  ``batch_size`` is per device. ``resolve``: built for ``platform`` as training builds it
  for its devices ('auto' settings resolved); otherwise built platform-neutral, 'auto'
  chosen at lowering.
  """
  seq_len = model_config.max_seq_len
  mesh = mesh or mesh_lib.make(devices=jax.devices()[:1])
  model = transform.masked_lm(
      model_config, compute=layers.Compute.resolve(model_config, platform if resolve else None))
  optimizer_config = optimizer_config or mlm_configs.get_config('paper').optimizer
  tx = optim.make(optimizer_config, platform=platform if resolve else None)
  make = step_lib.new_state_fn(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32)), tx,
                               jax.random.PRNGKey(0))
  state = jax.eval_shape(make)
  shardings = step_lib.state_shardings(mesh, state)
  step = step_lib.make_train_step(mlm.make_loss_fn(model, decode_masked_only=False),
                                  mlm.count_fn, tx, optim.schedule(optimizer_config), mesh,
                                  shardings)
  rows = batch_size * mesh.devices.size
  batch = {
      'input_ids': jax.ShapeDtypeStruct((1, rows, seq_len), jnp.int32),
      'input_mask': jax.ShapeDtypeStruct((1, rows, seq_len), jnp.int32),
      'labels': jax.ShapeDtypeStruct((1, rows, seq_len), jnp.int32),
      'weights': jax.ShapeDtypeStruct((1, rows, seq_len), jnp.float32),
  }
  exported = export.export(step, platforms=[platform])(state, batch)
  return exported.mlir_module()


FLAGS = flags.FLAGS


def main(argv: Sequence[str]):
  del argv
  for kernels in FLAGS.kernels:
    config = configs.get(FLAGS.preset)
    config.kernels = kernels
    for platform in FLAGS.platforms:
      counts = count_ops(train_step_text(config, platform))
      print(f'{FLAGS.preset} train step, kernels={kernels}, lowered for {platform}: ' +
            ', '.join(f'{n} {k.replace("_", " ")}' for k, n in counts.items()), flush=True)


if __name__ == '__main__':
  flags.DEFINE_string('preset', 'language_mlm', 'Model preset (perceiver.configs).')
  flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'], 'Platforms to lower for.')
  flags.DEFINE_list('kernels', ['auto'], 'kernels settings to lower.')
  app.run(main)
