r"""The ONNX route: our checkpoint -> Hugging Face -> ``torch.onnx.export`` -> onnxruntime.

    python -m perceiver.onnx_route --checkpoint=checkpoints/released.npz --out=onnx/

JAX has no ONNX exporter of its own (jax2tf -> tf2onnx worked only with
``enable_xla=False``, now deprecated), but transformers' PyTorch ``PerceiverForMaskedLM``
exports: this module writes the checkpoint as a Hugging Face directory
(``perceiver.params.hf_io.export_hf``, as ``perceiver.convert --to=hf``), loads it in
transformers, and exports it with ``torch.onnx.export`` at the model's full window
(``max_seq_len``) and a symbolic batch. Inputs ``input_ids`` and ``attention_mask``
(int64 [batch, max_seq_len]), output ``logits`` [batch, max_seq_len, vocab].

What this route inherits from transformers (see README "Hugging Face checkpoints"): the
masked LM only (its classifier head is not the paper's), the text decoder fixed at 8
heads and qk 256 (other configs are refused, naming the field), and padded positions
decoded like real ones (compare logits only where ``attention_mask`` is 1). It uses
PyTorch's TorchScript exporter (``dynamo=False``): torch 2.13's default dynamo exporter
needs ``onnxscript``, which this project does not depend on. Needs the ``hf`` extra
(torch, transformers, onnx, onnxruntime). tests/test_export.py holds onnxruntime's logits
to ours (relative 1e-4, measured 1.2e-6 on ``configs.small()``); on the released
architecture at 2,048 bytes the route gave an 806 MB ``model.onnx`` within 7.3e-7 of our
logits (random weights, batch 1; checked once by hand, too slow for the tests).
"""

from __future__ import annotations

import os
import warnings


from perceiver.command import errors
from perceiver.params import hf_io
from perceiver.params import loading

ONNX_FILE = 'model.onnx'
OPSET = 17


def _libraries():
  try:
    import torch   # pylint: disable=import-outside-toplevel
    import transformers   # pylint: disable=import-outside-toplevel
    import onnx   # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise errors.UserError(f'the ONNX route needs the hf extra: pip install \'.[hf]\' '
                           f'({e})') from e
  return torch, transformers


def export_onnx(checkpoint_path: str, out: str, overwrite: bool = False) -> str:
  """Writes ``out/`` (the Hugging Face directory plus ``model.onnx``); returns the ONNX path.

  Raises:
    errors.UserError: the extra is missing; a checkpoint or config transformers cannot
      take (naming the file, tensor or field); ``out`` exists without ``overwrite``.
  """
  torch, transformers = _libraries()
  params, config, metadata = loading.load_any(checkpoint_path)
  if isinstance(metadata, dict) and metadata.get('num_outputs'):
    raise errors.ConfigError(f'--checkpoint={checkpoint_path}: a classifier; the ONNX '
                             'route exports transformers\' PerceiverForMaskedLM only')
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise errors.ConfigError(f'--out={out}: already exists (pass --overwrite to replace it)')
  hf_io.export_hf(params, config, out, overwrite=overwrite)
  model = transformers.PerceiverForMaskedLM.from_pretrained(out)
  model.eval()

  class Logits(torch.nn.Module):
    """The logits alone, from positional inputs (what the ONNX graph's signature takes)."""

    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, input_ids, attention_mask):
      return self.inner(inputs=input_ids, attention_mask=attention_mask).logits

  length = int(config.max_seq_len)
  example = torch.full((1, length), 6, dtype=torch.int64)
  path = os.path.join(out, ONNX_FILE)
  batch = {0: 'batch'}
  with warnings.catch_warnings():
    # The TorchScript exporter's deprecation and tracer warnings: the route is checked by
    # comparing logits, not by these.
    warnings.simplefilter('ignore')
    with torch.no_grad():
      torch.onnx.export(Logits(model), (example, torch.ones_like(example)), path,
                        dynamo=False, opset_version=OPSET,
                        input_names=['input_ids', 'attention_mask'],
                        output_names=['logits'],
                        dynamic_axes={'input_ids': batch, 'attention_mask': batch,
                                      'logits': batch})
  return path
