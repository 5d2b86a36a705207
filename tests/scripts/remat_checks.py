"""Run by tests/test_remat.py in a process with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, read by JAX at start-up): the
train step of a tiny model with dropout, with and without rematerialisation, on one
device, data-parallel over 8 and FSDP over 8, from the same start on the same global
batches; and the step's program exported for GPU over 8 devices. Prints one JSON object."""

import json
import re
import sys

import jax
import numpy as np

from bench import lowering
from perceiver import configs
from perceiver.training import mesh as mesh_lib
from tests.scripts import mesh_checks

LAYOUTS = {'one device': (1, 1), 'data 8': (8, 1), 'fsdp 8': (1, 8)}


def model_config(remat):
  config = configs.tiny(mesh_checks.SEQ)
  config.encoder.dropout_prob = 0.1   # the recomputed blocks must draw the same masks
  config.remat = remat
  return config


def train(remat, layout):
  run, state, step = mesh_checks.build(model_config(remat), *LAYOUTS[layout], 'fused')
  initial = mesh_lib.to_host(state.params)
  losses = []
  for batch in mesh_checks.batches():
    state, metrics = step(state, mesh_lib.shard_batch(batch, run.mesh, 1))
    losses.append(float(metrics['loss'] / metrics['count']))
  return losses, initial, mesh_lib.to_host(state.params)


def main():
  assert jax.device_count() == 8, jax.devices()
  reference_losses, initial, reference_params = train('none', 'one device')
  movement = mesh_checks.norm(jax.tree.map(np.subtract, reference_params, initial))
  out = {'runs': {}, 'exported': {}}
  for remat in ('none', 'block'):
    for layout in LAYOUTS:
      losses, _, params = train(remat, layout)
      # Over all parameters together, against how far training moved them: per element,
      # LAMB turns rounding noise in the key biases' zero gradients into updates as
      # large as the learning rate (tests/scripts/mesh_checks.py).
      out['runs'][f'remat={remat} {layout}'] = {
          'losses': losses, 'reference_losses': reference_losses,
          'param_difference': mesh_checks.norm(
              jax.tree.map(np.subtract, params, reference_params)),
          'param_movement': movement}
  for remat in ('none', 'block'):
    for layout in ('one device', 'fsdp 8'):
      data, fsdp = LAYOUTS[layout]
      text = lowering.train_step_text(model_config(remat), 'cuda',
                                      mesh_config=mesh_checks.mesh_config(data, fsdp),
                                      devices=jax.devices()[:data * fsdp])
      counts = lowering.count_ops(text)
      counts['sharding_constraints'] = len(re.findall(r'\bsharding_constraint\b', text))
      out['exported'][f'remat={remat} {layout}'] = counts
  json.dump(out, sys.stdout)


if __name__ == '__main__':
  main()
