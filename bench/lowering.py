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
from typing import Dict, Optional, Sequence

from absl import app
from absl import flags
import jax
from jax import export
import jax.numpy as jnp

from perceiver import configs
from perceiver.training import driver
from train import mlm
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
                    optimizer_config=None, built_for: Optional[str] = None,
                    mesh_config=None, devices=None) -> str:
  """The StableHLO text of one train step for ``platform``, lowered from this host.

  The step is training's own (``driver.Run.train_step`` of ``train.mlm.build``: the
  masked LM, ``train.mlm``'s loss and the paper's LAMB, jitted over the mesh of
  ``mesh_config`` and ``devices``: default one device; any mesh of this host's devices,
  e.g. 8 simulated CPU devices standing for 8 GPUs), built for ``built_for`` (default
  ``platform``: as training builds it on that platform's devices). Only shapes are used,
  so the released model lowers in seconds without allocating its parameters.
  ``batch_size`` is per device.
  """
  optimizer_config = optimizer_config or mlm_configs.get_config('paper').optimizer
  run = driver.Run.create(mesh_config, optimizer_config, model_config,
                          devices or jax.devices()[:1], platform=built_for or platform)
  built = mlm.build(run)
  step = run.train_step(built.loss_fn, mlm.count_fn, built.shardings)
  rows, seq_len = batch_size * run.mesh.devices.size, model_config.max_seq_len
  batch = {
      'input_ids': jax.ShapeDtypeStruct((1, rows, seq_len), jnp.int32),
      'input_mask': jax.ShapeDtypeStruct((1, rows, seq_len), jnp.int32),
      'labels': jax.ShapeDtypeStruct((1, rows, seq_len), jnp.int32),
      'weights': jax.ShapeDtypeStruct((1, rows, seq_len), jnp.float32),
  }
  exported = export.export(step, platforms=[platform])(built.shapes, batch)
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
