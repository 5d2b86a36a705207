r"""What the train step compiles to on each platform, without a device: ``jax.export``.

    python -m bench.lowering --preset=language_mlm --platforms=cpu,cuda,tpu

Lowers ``train.mlm``'s whole train step (forward, backward, LAMB update) for each
platform from this host and counts the StableHLO ops that stand between XLA and a clean
program: conditionals (``stablehlo.case``/``stablehlo.if``) and optimization barriers.
With ``kernels='auto'`` a GPU or TPU program holds none: the XLA:CPU kernels
(``perceiver.xla_cpu``) are chosen only when lowering for the CPU.
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
from perceiver import transform
from train import mlm
from perceiver.training import optim
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
                    optimizer_config=None, resolve: bool = True) -> str:
  """The StableHLO text of one train step for ``platform``, lowered from this host.

  The step is ``perceiver.training.step.train_step_fn`` (what ``make_train_step`` pmaps) mapped over
  a one-device axis, with ``train.mlm``'s loss and the paper's LAMB; only shapes are
  used, so the released model lowers in seconds without allocating its parameters.
  ``resolve``: built for ``platform`` as training builds it for its devices ('auto'
  settings resolved); otherwise built platform-neutral, 'auto' chosen at lowering.
  """
  seq_len = model_config.max_seq_len
  model = transform.masked_lm(model_config, platform=platform if resolve else None)
  optimizer_config = optimizer_config or mlm_configs.get_config('paper').optimizer
  tx = optim.make(optimizer_config, platform=platform if resolve else None)
  body = step_lib.train_step_fn(mlm.make_loss_fn(model, decode_masked_only=False),
                                mlm.count_fn, tx, optim.schedule(optimizer_config))
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  params = jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), i), ids)
  state = jax.eval_shape(lambda p: step_lib.TrainState(
      jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.PRNGKey(0)), params)
  batch = {
      'input_ids': jax.ShapeDtypeStruct((1, batch_size, seq_len), jnp.int32),
      'input_mask': jax.ShapeDtypeStruct((1, batch_size, seq_len), jnp.int32),
      'labels': jax.ShapeDtypeStruct((1, batch_size, seq_len), jnp.int32),
      'weights': jax.ShapeDtypeStruct((1, batch_size, seq_len), jnp.float32),
  }
  devices = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((1,) + tuple(x.shape), x.dtype), tree)
  # shard_map over one device, as pmap maps the step (a vmap would turn the XLA:CPU
  # kernels' run-time conditionals into selects).
  mesh = jax.sharding.Mesh(jax.devices()[:1], (step_lib.AXIS,))
  spec = jax.sharding.PartitionSpec(step_lib.AXIS)
  unstack = lambda tree: jax.tree.map(lambda x: x[0], tree)
  restack = lambda tree: jax.tree.map(lambda x: x[None], tree)
  mapped = jax.shard_map(lambda s, b: restack(body(unstack(s), unstack(b))), mesh=mesh,
                         in_specs=spec, out_specs=spec)
  exported = export.export(jax.jit(mapped), platforms=[platform])(devices(state), devices(batch))
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
