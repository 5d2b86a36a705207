r"""Exports a checkpoint as a program that runs without this code: ``jax.export``.

    python -m perceiver.export --checkpoint=checkpoints/language_perceiver_io_bytes.pickle \
        --task=masked_lm --out=exported/
    python -m perceiver.export --checkpoint=runs/glue/rte/checkpoint/ckpt_000000780 \
        --task=classifier --out=exported-rte/ --dtype=bfloat16

The directory written (read by ``perceiver_load.load``, which needs only the packages
of ``perceiver_load.REQUIRES``: ``jax``, ``safetensors`` and ``flatbuffers``; a copy of that
loader is written beside the files as ``load.py``):

- ``model.jaxexport``: one serialized ``jax.export.Exported`` for every platform of
  ``--platforms`` (cpu, cuda, tpu), taking ``(params, input_ids, input_mask)`` with a
  symbolic batch size and a symbolic length of at most the model's window.
- ``params.safetensors``: the parameters, ``module/name`` as Haiku names them; with
  ``--dtype=bfloat16`` the dense weights are stored in bfloat16 and the program computes
  in mixed precision (``transform.inference_params``: bfloat16 matmul inputs, float32
  accumulation), half the bytes to store and read.
- ``export.json``: the task, GLUE task and label names (a classifier from ``eval.glue``),
  the window, vocabulary, dtypes, platforms, the JAX version that wrote it, the loader's
  requirements, and the SHA-256 of the program and of every tensor, which the loader
  verifies (with the manifest against the program: see ``perceiver_load``).

Parameters holding NaN or infinity are refused, naming them, before anything is written
(``loading.load_any`` checks every checkpoint it reads).

One multi-platform artifact, not one per platform: one file serves a CPU, a GPU and a
TPU host alike, and JAX picks the platform's program when it compiles. It is the
original's formulation (``kernels='reference'``) on every platform, so what runs on a
GPU or TPU holds no XLA:CPU kernel, conditional or optimization barrier; the only
conditionals in the module are JAX's switches on the platform index, which the compiler
resolves (tests/test_export.py checks both). A CPU gives up ``perceiver.model.xla_cpu``'s
kernels, which mostly speed up the backward pass; of the forward pass they saved 7-8% in
mixed precision, through the attention kernel (bench/RESULTS.md, "Why the XLA:CPU
kernels").

``--task``: ``masked_lm`` (logits [B, T, vocab]), ``classifier`` (logits [B, classes];
the checkpoint must be a classifier, e.g. ``eval.glue``'s, whose label names and task
the export keeps) or ``encoder`` (the final latents, from any checkpoint: only the
embeddings and the encoder are kept). Default: ``classifier`` for a classifier
checkpoint, else ``masked_lm``. Checkpoints are read by ``perceiver.params.loading.load_any``
(this project's, DeepMind's pickle, a Hugging Face directory).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional, Sequence

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from perceiver.params import params_file
from perceiver.command import errors
from perceiver.params import hf_io
from perceiver.params import loading
from perceiver.model import tokenizer
from perceiver import transform

import perceiver_load

TASKS = ('masked_lm', 'classifier', 'encoder')
DTYPES = ('float32', 'bfloat16')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


def build(task: str, config, num_outputs: Optional[int] = None):
  """The ``hk.Transformed`` for ``task``, built for no platform (the original's formulas)."""
  if task == 'masked_lm':
    return transform.masked_lm(config)
  if task == 'classifier':
    return transform.classifier(config, num_outputs)
  return transform.encoder(config)


def _nest(flat):
  """{'module/name': array} -> {module: {name: array}} (Haiku's parameter tree)."""
  params = {}
  for key, value in flat.items():
    module, name = key.rsplit('/', 1)
    params.setdefault(module, {})[name] = value
  return params


def flatten(params):
  """{module: {name: array}} -> {'module/name': array}: the safetensors names."""
  return {f'{m}/{n}': v for m, leaves in params.items() for n, v in leaves.items()}


def export_program(model, flat_params, max_seq_len: int,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax_export.Exported:
  """``model.apply`` as a ``jax.export.Exported`` of ``(params, input_ids, input_mask)``.

  ``params`` is the flat {'module/name': array} dict (only shapes and dtypes are used);
  the batch size is symbolic, and so is the length, constrained to ``max_seq_len`` at
  most (the model slices its position tables to the input's length).
  """
  def forward(flat, input_ids, input_mask):
    return model.apply(_nest(flat), None, input_ids, input_mask)

  batch, length = jax_export.symbolic_shape(
      'batch, length', constraints=(f'length <= {max_seq_len}',))
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  specs = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in flat_params.items()}
  return jax_export.export(jax.jit(forward), platforms=tuple(platforms))(specs, ids, ids)


def conditionals(mlir_text: str):
  """(platform switches, run-time conditionals) in a StableHLO module's text.

  A multi-platform module selects each platform-dependent lowering with a
  ``stablehlo.case`` on the platform index (every function's ``%arg0``, marked
  ``_platform_index``) and a second ``case`` on that result; the compiler resolves both
  for its platform. Any other ``case`` or ``if`` branches at run time: the XLA:CPU
  kernels' ``perceiver.model.xla_cpu.opaque`` is one. Together they are ``bench.lowering``'s
  conditionals.
  """
  switches = run_time = 0
  for body in re.split(r'\n\s*func\.func ', mlir_text)[1:]:
    header = body.split('\n', 1)[0]
    indexed = re.search(r'%arg0: tensor<i32> \{jax\.global_constant = "_platform_index"\}',
                        header) is not None
    selectors = set()
    for result, operand in re.findall(
        r'(%[\w#]+)(?::\d+)? = "stablehlo\.case"\((%[\w#]+)\)', body):
      if (indexed and operand == '%arg0') or operand in selectors:
        selectors.add(result)
    # Every case not keyed on the platform index (whatever its form) runs at run time.
    run_time += len(re.findall(r'\bstablehlo\.case\b', body)) - len(selectors)
    switches += len(selectors)
    run_time += len(re.findall(r'\bstablehlo\.if\b', body))
  return switches, run_time


def _select(task, params, config, metadata, checkpoint_path):
  """(the task's model, the parameters it uses, its number of outputs or None), or an
  error naming what does not fit."""
  num_outputs = metadata.get('num_outputs') if isinstance(metadata, dict) else None
  if task == 'classifier' and not num_outputs:
    raise errors.ConfigError(
        f'--task=classifier: {checkpoint_path} is not a classifier checkpoint (its '
        'metadata has no num_outputs; eval.glue writes classifier checkpoints)')
  model = build(task, config, int(num_outputs) if task == 'classifier' else None)
  expected = params_file.expected_shapes(model, config)
  # The encoder keeps only the trunk; a masked LM needs its decoder, which a classifier
  # checkpoint has not: check_params names what is missing.
  if task == 'encoder':
    params = {m: {n: v for n, v in leaves.items() if n in expected.get(m, {})}
              for m, leaves in params.items() if m in expected}
  params_file.check_params(params, expected, source=f'--checkpoint={checkpoint_path}')
  return model, params, (int(num_outputs) if task == 'classifier' else None)


def _check_flags(out, task, dtype, platforms, overwrite) -> str:
  """``out`` made absolute, or a ConfigError naming the flag that is wrong."""
  if task is not None and task not in TASKS:
    raise errors.ConfigError(f'--task={task!r}: expected one of {", ".join(TASKS)}')
  if dtype not in DTYPES:
    raise errors.ConfigError(f'--dtype={dtype!r}: expected one of {", ".join(DTYPES)}')
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise errors.ConfigError(f'--platforms={",".join(platforms)}: expected some of '
                             f'{", ".join(PLATFORMS)}')
  if not out:
    raise errors.ConfigError('--out: required')
  out = os.path.abspath(out)
  if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    if not overwrite:
      raise errors.ConfigError(f'--out={out}: already exists (pass --overwrite to replace it)')
    if not os.path.isdir(out) or not os.path.isfile(os.path.join(out, perceiver_load.MANIFEST)):
      raise errors.ConfigError(f'--out={out}: exists and is not an export directory; '
                               '--overwrite replaces only an earlier export')
  return out


def export(checkpoint_path: str, out: str, task: Optional[str] = None,
           dtype: str = 'float32', platforms: Sequence[str] = DEFAULT_PLATFORMS,
           overwrite: bool = False) -> dict:
  """Writes the export directory ``out`` (see the module docstring); returns its manifest.

  Raises:
    errors.UserError: a bad flag (ConfigError, naming it) or checkpoint (CheckpointError,
      naming the file and tensors); ``out`` is left as it was.
  """
  out = _check_flags(out, task, dtype, platforms, overwrite)
  params, config, metadata = loading.load_any(checkpoint_path)
  metadata = metadata if isinstance(metadata, dict) else {}
  if task is None:
    task = 'classifier' if metadata.get('num_outputs') else 'masked_lm'
  config = config.copy_and_resolve_references()
  # The original's formulas on every platform (see the module docstring), whatever the
  # checkpoint's run chose; compute in the requested precision.
  config.kernels = 'reference'
  config.compute_dtype = dtype
  model, params, num_outputs = _select(task, params, config, metadata, checkpoint_path)
  params = jax.tree.map(np.asarray, transform.inference_params(params, config))
  flat = flatten(params)
  exported = export_program(model, flat, config.max_seq_len, platforms)
  program = exported.serialize()

  manifest = _manifest(task, metadata, num_outputs, config, dtype, exported, program, flat,
                       checkpoint_path)
  _write(out, program, flat, manifest)
  return manifest


def _manifest(task, metadata, num_outputs, config, dtype, exported, program, flat,
              checkpoint_path) -> dict:
  """export.json: what the program is, and the checksums the loader verifies."""
  return {
      'format': perceiver_load.FORMAT,
      'task': task,
      'glue_task': metadata.get('task') if task == 'classifier' else None,
      'labels': list(metadata.get('labels') or []) if task == 'classifier' else None,
      'num_outputs': num_outputs,
      'max_seq_len': int(config.max_seq_len),
      'vocab_size': int(config.vocab_size),
      'tokenizer': {'pad': tokenizer.PAD_ID, 'bos': tokenizer.BOS_ID,
                    'eos': tokenizer.EOS_ID, 'mask': tokenizer.MASK_ID,
                    'cls': tokenizer.CLS_ID, 'sep': tokenizer.SEP_ID,
                    'byte_offset': tokenizer.NUM_SPECIAL},
      'inputs': 'input_ids, input_mask: int32 [batch, length], 1 <= length <= max_seq_len',
      'param_dtype': dtype,
      'compute_dtype': dtype,
      'platforms': list(exported.platforms),
      'calling_convention_version': exported.calling_convention_version,
      'jax_version': jax.__version__,
      'num_parameters': int(sum(v.size for v in flat.values())),
      'source': os.path.abspath(checkpoint_path),
      'model_config': json.loads(config.to_json()),
      'loader_requires': sorted(perceiver_load.REQUIRES),
      'sha256': {perceiver_load.PROGRAM: perceiver_load.sha256(program),
                 'tensors': {name: perceiver_load.sha256(np.ascontiguousarray(v).tobytes())
                             for name, v in flat.items()}},
  }


def _write(out, program: bytes, flat, manifest):
  """Assembles the directory under a temporary name beside ``out``, then renames it in."""
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.', suffix='.tmp', dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)   # mkdtemp's 0700 -> a plain directory's mode
  try:
    with open(os.path.join(tmp, perceiver_load.PROGRAM), 'wb') as f:
      f.write(program)
    hf_io.write_safetensors(os.path.join(tmp, perceiver_load.PARAMS), flat,
                            {'format': perceiver_load.FORMAT})
    shutil.copyfile(perceiver_load.__file__, os.path.join(tmp, 'load.py'))
    with open(os.path.join(tmp, perceiver_load.MANIFEST), 'w', encoding='utf-8') as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
      f.write('\n')
    hf_io._replace_directory(tmp, out)  # pylint: disable=protected-access
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
