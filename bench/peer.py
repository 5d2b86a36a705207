"""The peer: transformers' ``PerceiverForMaskedLM`` (PyTorch) with the same config and weights.

The model is built from this project's parameters through ``perceiver.params.hf`` (the same map
the interop tests check to 1e-5), so both sides compute the same function on the same
numbers. Timed operations mirror ours:

- forward: ``model(inputs=ids, attention_mask=mask).logits`` under ``torch.inference_mode``;
- train step: forward with ``labels`` (-100 where not masked: transformers' own masked
  cross-entropy), ``backward``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``.
  torch has no LAMB; the optimizer is ``torch.optim.AdamW`` (fused where torch supports
  it on CPU, its fastest form), with gradient clipping to norm 1 as in our step.

Precision ``float32`` runs as is; ``bfloat16`` runs under
``torch.autocast("cpu", dtype=torch.bfloat16)`` with float32 parameters and optimizer.
Without torch and transformers (the optional extra ``bench``) ``available()`` says why and
no number is made up.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

NOT_INSTALLED = 'not installed'


def _libs():
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  return torch, transformers


def available() -> Tuple[bool, str]:
  """(True, versions) when torch and transformers import, else (False, the reason)."""
  try:
    torch, transformers = _libs()
  except ImportError as e:
    return False, f'{NOT_INSTALLED} ({e.name}); pip install ".[bench]"'
  return True, f'torch {torch.__version__}, transformers {transformers.__version__}'


def versions() -> Dict[str, str]:
  ok, _ = available()
  if not ok:
    return {'torch': NOT_INSTALLED, 'transformers': NOT_INSTALLED}
  torch, transformers = _libs()
  return {'torch': torch.__version__, 'transformers': transformers.__version__}


def build_model(params, config, threads: Optional[int] = None):
  """``PerceiverForMaskedLM`` holding ``params`` (float32), in eval mode (no dropout)."""
  from perceiver.params import hf  # pylint: disable=import-outside-toplevel
  torch, transformers = _libs()
  if threads:
    torch.set_num_threads(threads)
  hf_config, _ = hf.hf_config_from(config)
  fields = {k: v for k, v in hf_config.items() if k not in ('architectures', 'model_type')}
  with torch.device('meta'):
    model = transformers.PerceiverForMaskedLM(transformers.PerceiverConfig(**fields))
  tensors = {k: torch.from_numpy(np.array(v, np.float32))
             for k, v in hf.params_to_hf(params, config).items()}
  model.load_state_dict(tensors, strict=True, assign=True)
  model.tie_weights()
  return model.eval()


def _autocast(torch, precision):
  if precision == 'bfloat16':
    return torch.autocast('cpu', dtype=torch.bfloat16)
  if precision == 'float32':
    return contextlib.nullcontext()
  raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")


def _tensors(torch, batch):
  ids = torch.from_numpy(np.asarray(batch['input_ids'], np.int64))
  mask = torch.from_numpy(np.asarray(batch['input_mask'], np.int64))
  labels = np.where(np.asarray(batch['weights']) > 0, np.asarray(batch['labels']), -100)
  return ids, mask, torch.from_numpy(labels.astype(np.int64))


def forward_fn(model, batch, precision) -> Callable[[], Any]:
  """A no-argument callable running one inference forward pass; returns the logits."""
  torch, _ = _libs()
  ids, mask, _ = _tensors(torch, batch)

  def run():
    with torch.inference_mode(), _autocast(torch, precision):
      return model(inputs=ids, attention_mask=mask).logits

  return run


def make_optimizer(model, learning_rate=1e-4, weight_decay=0.01):
  """AdamW, fused when this torch supports it on CPU; returns (optimizer, its name)."""
  torch, _ = _libs()
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
  groups = [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]
  try:
    return torch.optim.AdamW(groups, lr=learning_rate, eps=1e-6, fused=True), 'AdamW (fused)'
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.AdamW(groups, lr=learning_rate, eps=1e-6), 'AdamW (foreach)'


def train_step_fn(model, optimizer, batch, precision) -> Callable[[], Any]:
  """A no-argument callable running one train step; returns the loss (a float)."""
  torch, _ = _libs()
  ids, mask, labels = _tensors(torch, batch)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]

  def run():
    with _autocast(torch, precision):
      loss = model(inputs=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

  return run
