"""Run by tests/test_mesh.py in a process with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, read by JAX at start-up): the
train step on several meshes from the same start and the same global batches, the
compiled step's memory, and the step exported for GPU and TPU over 8 devices. Prints one
JSON object."""

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench import lowering
from perceiver import configs
from perceiver.model import layers
from perceiver import transform
from perceiver.training import mesh as mesh_lib
from perceiver.training import optim
from perceiver.training import step as step_lib
from train import mlm
from train.configs import mlm as mlm_configs

SEQ, BATCH, STEPS = 64, 8, 3


def batches(seed=0):
  """Global batches of 8 sequences, 15% of bytes masked (the masked ones replaced by the
  tokenizer's mask id 3)."""
  rng = np.random.default_rng(seed)
  for _ in range(STEPS):
    labels = rng.integers(6, 262, (BATCH, SEQ)).astype(np.int32)
    weights = (rng.random((BATCH, SEQ)) < 0.15).astype(np.float32)
    yield {'input_ids': np.where(weights > 0, 3, labels).astype(np.int32),
           'input_mask': np.ones((BATCH, SEQ), np.int32), 'labels': labels,
           'weights': weights}


def mesh(data, fsdp):
  devices = jax.devices()[:data * fsdp]
  return mesh_lib.make(ml_collections.ConfigDict({'data': data, 'fsdp': fsdp}), devices)


def build(model_config, the_mesh, implementation):
  opt = mlm_configs.get_config('smoke').optimizer
  opt.implementation = implementation
  model = transform.masked_lm(model_config, compute=layers.Compute.resolve(model_config, 'cpu'))
  tx = optim.make(opt, platform='cpu')
  make = step_lib.new_state_fn(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32)), tx,
      jax.random.PRNGKey(1))
  state, shardings = step_lib.init_state(the_mesh, make)
  step = step_lib.make_train_step(mlm.make_loss_fn(model, False), mlm.count_fn, tx,
                                  optim.schedule(opt), the_mesh, shardings)
  return state, step


def train(data, fsdp, implementation):
  the_mesh = mesh(data, fsdp)
  state, step = build(configs.tiny(SEQ), the_mesh, implementation)
  losses = []
  for batch in batches():
    state, metrics = step(state, mesh_lib.shard_batch(batch, the_mesh, 1))
    losses.append(float(metrics['loss'] / metrics['count']))
  specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}
  return losses, mesh_lib.to_host(state.params), sorted(specs)


def state_bytes(data, fsdp):
  """Per-device argument bytes of the compiled step (the state; the batch is 8 x 64
  bytes) from XLA's memory analysis, for a model whose matrices all divide by 8 and
  whose vectors are a small part (as in any real configuration)."""
  the_mesh = mesh(data, fsdp)
  model_config = configs.language(d_model=64, d_latents=128, num_latents=16,
                                  num_self_attends=1, max_seq_len=SEQ, qk_channels=64,
                                  num_heads=4)
  state, step = build(model_config, the_mesh, 'fused')
  batch = mesh_lib.shard_batch(next(batches()), the_mesh, 1)
  analysis = step.lower(state, batch).compile().memory_analysis()
  return int(analysis.argument_size_in_bytes)


def main():
  assert jax.device_count() == 8, jax.devices()
  out = {'runs': {}, 'differences': {}}
  # The CPU's fused LAMB on both layouts; optax's chain under FSDP (its trust ratios over
  # sharded tensors).
  for implementation, layouts in (('fused', ((8, 1), (1, 8))), ('optax', ((1, 8),))):
    reference = train(1, 1, implementation)
    for data, fsdp in layouts:
      losses, params, specs = train(data, fsdp, implementation)
      name = f'{implementation} data={data} fsdp={fsdp}'
      diffs = [float(np.max(np.abs(a - b) / (np.abs(b) + 1e-3)))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference[1]))]
      out['runs'][name] = {'losses': losses, 'reference_losses': reference[0],
                           'max_param_difference': max(diffs), 'specs': specs}
  out['state_bytes'] = {'replicated': state_bytes(8, 1), 'fsdp8': state_bytes(1, 8)}
  out['exported'] = {}
  for data, fsdp in ((8, 1), (1, 8)):
    for platform in ('cuda', 'tpu'):
      text = lowering.train_step_text(configs.tiny(SEQ), platform, mesh=mesh(data, fsdp))
      out['exported'][f'{platform} data={data} fsdp={fsdp}'] = lowering.count_ops(text)
  json.dump(out, sys.stdout)


if __name__ == '__main__':
  main()
