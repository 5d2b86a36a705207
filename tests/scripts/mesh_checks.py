"""Run by tests/test_mesh.py in a process with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, read by JAX at start-up): the
train step on several meshes from the same start and the same global batches, the
compiled step's memory, and the step exported for GPU and TPU over 8 devices. Prints one
JSON object."""

import json
import sys

import jax
import ml_collections
import numpy as np

from bench import lowering
from perceiver import configs
from perceiver.training import driver
from perceiver.training import mesh as mesh_lib
from train import mlm
from train.configs import mlm as mlm_configs

SEQ, BATCH, STEPS = 64, 8, 3
# The smoke preset's learning rate (3e-3) reached after one step of warm-up (its own 100
# would leave it at 0, 3e-5 and 6e-5 over the 3 steps: parameters that barely move would
# agree across meshes whatever the step did).
WARMUP_STEPS = 1


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


def mesh_config(data, fsdp):
  return ml_collections.ConfigDict({'data': data, 'fsdp': fsdp})


def build(model_config, data, fsdp, implementation):
  """``(run, fresh state, train step)``: training's own step (``Run.train_step`` of
  ``train.mlm.build``) over ``data`` x ``fsdp`` of the 8 devices."""
  opt = mlm_configs.get_config('smoke').optimizer
  opt.implementation = implementation
  opt.warmup_steps = WARMUP_STEPS
  run = driver.Run.create(mesh_config(data, fsdp), opt, model_config,
                          jax.devices()[:data * fsdp])
  built = mlm.build(run)
  return run, run.init(built.make_state), run.train_step(built.loss_fn, mlm.count_fn,
                                                          built.shardings)


def norm(tree) -> float:
  """The Euclidean norm of all of a tree's values together."""
  return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))
                           for x in jax.tree.leaves(tree))))


def train(data, fsdp, implementation):
  run, state, step = build(configs.tiny(SEQ), data, fsdp, implementation)
  initial = mesh_lib.to_host(state.params)
  losses = []
  for batch in batches():
    state, metrics = step(state, mesh_lib.shard_batch(batch, run.mesh, 1))
    losses.append(float(metrics['loss'] / metrics['count']))
  specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}
  return losses, initial, mesh_lib.to_host(state.params), sorted(specs)


def state_bytes(data, fsdp):
  """Per-device argument bytes of the compiled step (the state; the batch is 8 x 64
  bytes) from XLA's memory analysis, for a model whose matrices all divide by 8 and
  whose vectors are a small part (as in any real configuration)."""
  model_config = configs.language(d_model=64, d_latents=128, num_latents=16,
                                  num_self_attends=1, max_seq_len=SEQ, qk_channels=64,
                                  num_heads=4)
  run, state, step = build(model_config, data, fsdp, 'fused')
  batch = mesh_lib.shard_batch(next(batches()), run.mesh, 1)
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
      losses, _, params, specs = train(data, fsdp, implementation)
      name = f'{implementation} data={data} fsdp={fsdp}'
      out['runs'][name] = {
          'losses': losses, 'reference_losses': reference[0], 'specs': specs,
          # Over all parameters together: an array whose gradient is zero by construction
          # (an attention key bias: softmax ignores it) moves by the optimizer's
          # normalised rounding noise, which differs with the layout as noise does.
          'param_difference': norm(jax.tree.map(np.subtract, params, reference[2])),
          'param_movement': norm(jax.tree.map(np.subtract, reference[2], reference[1])),
          'param_norm': norm(reference[1])}
  out['state_bytes'] = {'replicated': state_bytes(8, 1), 'fsdp8': state_bytes(1, 8)}
  out['exported'] = {}
  for data, fsdp in ((8, 1), (1, 8)):
    for platform in ('cuda', 'tpu'):
      text = lowering.train_step_text(configs.tiny(SEQ), platform,
                                      mesh_config=mesh_config(data, fsdp),
                                      devices=jax.devices()[:data * fsdp])
      out['exported'][f'{platform} data={data} fsdp={fsdp}'] = lowering.count_ops(text)
  json.dump(out, sys.stdout)


if __name__ == '__main__':
  main()
