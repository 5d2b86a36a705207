"""Our side: the forward pass, forward+backward, and the train step that training runs.

Every callable is an XLA executable compiled once here (``jit`` ... ``lower``
... ``compile``), so its cost and memory analyses describe exactly what is timed. The
train step is training's own (``perceiver.training.driver.Run.train_step`` with
``train.mlm``'s model and loss and ``perceiver.training.optim.make``'s optimizer), state
placed on the mesh and donated as ``train.mlm`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perceiver import configs
from perceiver.model import flops
from perceiver import transform
from train import masking
from train import mlm
from perceiver.model import layers
from perceiver.training import driver
from perceiver.training import mesh as mesh_lib
from perceiver.training import step as step_lib
from train.configs import mlm as mlm_configs

PRECISIONS = ('float32', 'bfloat16')


@dataclasses.dataclass
class Compiled:
  """A timed callable and what XLA says about it."""
  run: Callable[[], Any]
  xla_flops: Optional[float]
  memory: Dict[str, int]


def tiny_hf() -> ml_collections.ConfigDict:
  """``configs.tiny()`` with the decoder transformers' text decoder is fixed to (8 heads,
  qk 256), so that the peer can be built: the smoke suite's model."""
  config = configs.tiny()
  config.decoder.num_heads = 8
  config.decoder.qk_channels = 256
  return config


def model_config(preset: str, precision: str, max_seq_len: Optional[int] = None,
                 kernels: str = 'auto') -> ml_collections.ConfigDict:
  """A model preset (``perceiver.configs`` or 'tiny_hf') at ``precision`` ('float32' or
  'bfloat16'), optionally with a longer ``max_seq_len`` and another ``kernels`` setting."""
  config = tiny_hf() if preset == 'tiny_hf' else configs.get(preset)
  config.kernels = kernels
  if max_seq_len:
    config.max_seq_len = max_seq_len
    config.decoder.output_index_dims = max_seq_len
  config.compute_dtype = precision
  return config


def optimizer_config(implementation: str = 'auto') -> ml_collections.ConfigDict:
  """The pretraining optimizer (LAMB, the paper's hyperparameters), as training builds it,
  with another ``implementation`` if asked ('auto', 'fused' or 'optax')."""
  config = mlm_configs.get_config('paper').optimizer
  config.unlock()
  config.implementation = implementation
  return config


def example_batch(batch: int, seq_len: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """A whole-word-masked batch (15%) of English-like bytes, as the data pipeline makes."""
  rng = np.random.default_rng(seed)
  words = [w.encode() for w in ('the', 'model', 'reads', 'bytes', 'of', 'text', 'and',
                                'predicts', 'masked', 'words', 'from', 'their', 'context')]
  rows = []
  for _ in range(batch):
    text = b' '.join(words[i] for i in rng.integers(0, len(words), seq_len))[:seq_len]
    rows.append(np.frombuffer(text, np.uint8).astype(np.int32) + 6)
  ids = np.stack(rows)
  return masking.WordMasker(0.15)(ids, np.ones_like(ids), rng)


def init_params(config, seq_len: int):
  """Float32 parameters (the same tree at every precision)."""
  model = transform.masked_lm(config, platform=layers.platform())
  return model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32))


def _xla_info(compiled) -> Dict[str, Any]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  stats = compiled.memory_analysis()
  memory = {}
  if stats is not None:
    for field in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                  'temp_size_in_bytes', 'generated_code_size_in_bytes'):
      memory[field.replace('_size_in_bytes', '')] = int(getattr(stats, field, 0))
    # Arguments and temporaries live together; outputs not aliased to arguments add.
    memory['peak'] = (memory['argument'] + memory['temp'] + memory['output']
                      - memory['alias'])
  return {'xla_flops': float(cost.get('flops', 0.0)) if cost else None, 'memory': memory}


def forward(config, params, batch) -> Compiled:
  """Inference: logits for every position, no dropout.

  In bfloat16 the dense weights are cast once beforehand (``transform.inference_params``:
  the same values the model's per-call casts produce, so the logits are identical).
  """
  model = transform.masked_lm(config, platform=layers.platform())
  params = transform.inference_params(params, config)
  fn = jax.jit(lambda p, ids, mask: model.apply(p, None, ids, mask))
  ids, mask = jnp.asarray(batch['input_ids']), jnp.asarray(batch['input_mask'])
  compiled = fn.lower(params, ids, mask).compile()
  return Compiled(lambda: compiled(params, ids, mask).block_until_ready(),
                  **_xla_info(compiled))


def _loss(config):
  model = transform.masked_lm(config, platform=layers.platform())
  loss_fn = mlm.make_loss_fn(model, decode_masked_only=False)

  def mean_loss(params, batch):
    loss_sum, _ = loss_fn(params, None, batch, True)
    return loss_sum / jnp.maximum(mlm.count_fn(batch), 1)

  return mean_loss


def forward_backward(config, params, batch) -> Compiled:
  """The training loss and its gradient (no optimizer): the step's matmul work."""
  fn = jax.jit(jax.value_and_grad(_loss(config)))
  device_batch = jax.tree.map(jnp.asarray, batch)
  compiled = fn.lower(params, device_batch).compile()
  return Compiled(lambda: jax.block_until_ready(compiled(params, device_batch)),
                  **_xla_info(compiled))


def train(config, params, batch, optimizer=None, mesh_config=None) -> Compiled:
  """One step of ``train.mlm``: its own (``driver.Run.train_step`` of ``train.mlm.build``),
  jitted over the mesh of ``mesh_config`` (default: data parallel over every device), state
  donated, LAMB from ``perceiver.training.optim``.

  The state is placed from ``params`` by the mesh's rules (not consumed); each call
  advances it.
  """
  optimizer = optimizer or optimizer_config()
  run = driver.Run.create(mesh_config, optimizer, config)
  built = mlm.build(run)
  step = run.train_step(built.loss_fn, mlm.count_fn, built.shardings)
  state = step_lib.state_from_params(jax.device_get(params), run.optimizer,
                                     jax.random.PRNGKey(1), built.shardings)
  device_batch = mesh_lib.shard_batch(batch, run.mesh, accum_steps=1)
  compiled = step.lower(state, device_batch).compile()
  holder = [state]

  def run_step():
    holder[0], metrics = compiled(holder[0], device_batch)
    jax.block_until_ready((holder[0], metrics))

  return Compiled(run_step, **_xla_info(compiled))


def optimizer_name(optimizer=None) -> str:
  optimizer = optimizer or optimizer_config()
  name = optimizer.name.upper() if optimizer.name == 'lamb' else optimizer.name
  return f'{name} ({optimizer.get("implementation", "auto")})'


def analytic_flops(config, seq_len: int, batch: int, kind: str) -> float:
  """Matmul FLOPs: forward = batch x forward; fwd_bwd and train = 3x that."""
  if kind == 'forward':
    return float(batch * flops.masked_lm_forward(config, seq_len))
  return float(flops.masked_lm_train_step(config, seq_len, batch))


def param_bytes(params) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params)))
