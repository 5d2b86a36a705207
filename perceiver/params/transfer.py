"""Starting a classifier from a pretrained masked LM (the paper's GLUE setup).

``transform.classifier`` has the masked LM's byte embeddings, input positions and encoder
under the same names (the trunk); its decoder (one trainable query) and MLP head are new.
``load_trunk`` reads any checkpoint (DeepMind's pickle, this project's, Hugging Face's)
and keeps its trunk; ``classifier_params`` makes fresh parameters with that trunk copied
in exactly. The token classifier (``transform.token_classifier``) starts the same way;
``load_trunk(..., mlm_decoder=True)`` also keeps the masked LM's decoder, renamed to the
token classifier's decoder (the same structure: one query per byte position).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perceiver.params import params_file
from perceiver.params import loading
from perceiver import transform

HEAD_MODULES = ('classification_decoder', 'classification_head',
                transform.TOKEN_DECODER, transform.TOKEN_HEAD)
# The masked LM's decoder, which the token classifier's decoder may start from.
MLM_DECODER = 'basic_decoder'


@dataclasses.dataclass
class Trunk:
  """The model config and the trunk parameters a classifier starts from.

  Attributes:
    model_config: the classifier's config (with the run's dropout).
    params: {module: {name: array}} of the embeddings and encoder, or None (scratch).
    source: where they came from, for logs and metadata ('scratch' or the path).
    unused: the checkpoint's modules the classifier does not use (the MLM decoder).
  """
  model_config: ml_collections.ConfigDict
  params: Optional[Dict[str, Dict[str, np.ndarray]]]
  source: str
  unused: List[str]


def is_head_module(module: str) -> bool:
  """Whether a parameter module is the classifier's new decoder or head (not the trunk)."""
  return module.startswith(HEAD_MODULES)


def with_dropout(model_config, encoder: float, head: float) -> ml_collections.ConfigDict:
  """A copy of ``model_config`` with the fine-tuning dropout rates.

  Raises:
    ValueError: the config has no ``classifier`` block (``configs.language`` adds one).
  """
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  if 'classifier' not in model_config:
    raise ValueError('the model config has no "classifier" block (the decoder and head '
                     'settings perceiver.configs.language() adds)')
  model_config.encoder.dropout_prob = float(encoder)
  model_config.classifier.head_dropout_prob = float(head)
  return model_config


def trunk_shapes(model_config) -> Dict[str, Dict[str, tuple]]:
  """The {module: {name: shape}} of the classifier's trunk (embeddings and encoder)."""
  expected = params_file.expected_shapes(transform.classifier(model_config, 1), model_config)
  return {m: s for m, s in expected.items() if not is_head_module(m)}


def mlm_decoder_as_token_decoder(params, model_config, source: str):
  """The masked LM's decoder modules of ``params`` under the token classifier's decoder
  names (``basic_decoder/...`` -> ``token_classification_decoder/...``), shape-checked.

  Raises:
    CheckpointError: naming ``source``, when the decoder is missing or mis-shaped.
  """
  expected = params_file.expected_shapes(transform.token_classifier(model_config, 1),
                                        model_config)
  want = {m: s for m, s in expected.items() if m.startswith(transform.TOKEN_DECODER)}
  renamed = {transform.TOKEN_DECODER + m[len(MLM_DECODER):]: dict(leaves)
             for m, leaves in params.items()
             if m == MLM_DECODER or m.startswith(MLM_DECODER + '/')}
  params_file.check_params(renamed, want, source=f'{source} (its MLM decoder, renamed '
                          f'{MLM_DECODER} -> {transform.TOKEN_DECODER})')
  return renamed


def load_trunk(path: Optional[str], default_config, *, encoder_dropout: float,
               head_dropout: float, note: Callable[[str], None] = print,
               mlm_decoder: bool = False) -> Trunk:
  """The trunk of the checkpoint at ``path`` (with its model config), or, without a path,
  ``default_config`` and no parameters (training from scratch). ``mlm_decoder``: also
  its masked-LM decoder, as the token classifier's decoder.

  Raises:
    CheckpointError: naming the file, when it is unreadable, holds non-finite values, or
      its trunk parameters are missing or mis-shaped.
  """
  if not path:
    note('no --init_checkpoint: the model starts from scratch (every parameter randomly '
         'initialised; model config from the config file)')
    return Trunk(with_dropout(default_config, encoder_dropout, head_dropout), None,
                 'scratch', [])
  params, model_config, meta = loading.load_any(path)
  try:
    model_config = with_dropout(model_config, encoder_dropout, head_dropout)
  except ValueError as e:
    raise params_file.CheckpointError(f'{path}: {e}') from None
  want = trunk_shapes(model_config)
  trunk = {m: dict(params[m]) for m in params if m in want}
  params_file.check_params(trunk, want, source=f'{path} (the classifier trunk)')
  if mlm_decoder:
    trunk.update(mlm_decoder_as_token_decoder(params, model_config, path))
    want = dict(want, **{m: None for m in params if m.startswith(MLM_DECODER)})
  unused = sorted(m for m in params if m not in want)
  kind = meta.get('source', 'project') if isinstance(meta, dict) else 'project'
  note(f'init checkpoint {path} ({kind} format): model config from it (the config '
       'file\'s "model" is not used)')
  return Trunk(model_config, trunk, path, unused)


def _count(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def classifier_params(model, trunk: Trunk, seed: int, length: int,
                      note: Optional[Callable[[str], None]] = None):
  """Fresh parameters of ``model`` (a ``transform.classifier`` or ``token_classifier``)
  for inputs of ``length`` bytes, with the trunk replaced by ``trunk.params`` (exact
  copies, cast to the fresh parameters' dtypes)."""
  ids = jnp.zeros((1, length), jnp.int32)
  # Jitted: one compilation instead of one per initialiser op.
  params = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(seed), ids,
                                              jnp.ones_like(ids)))
  params = {m: dict(leaves) for m, leaves in params.items()}
  if trunk.params is not None:
    for module, leaves in trunk.params.items():
      params[module] = {name: np.asarray(value, dtype=params[module][name].dtype)
                        for name, value in leaves.items()}
  if note is not None:
    copied = trunk.params or {}
    head = {m: v for m, v in params.items() if is_head_module(m) and m not in copied}
    body = {m: v for m, v in params.items() if m not in head}
    modules = sorted({m.split('/')[0] for m in body})
    heads = sorted({m.split('/')[0] for m in head})
    where = 'randomly initialised' if trunk.params is None else f'copied from {trunk.source}'
    note(f'  parameters: trunk ({", ".join(modules)}; {_count(body):,} values) {where}; '
         f'{" and ".join(heads)} ({_count(head):,} values) newly initialised '
         f'(seed {seed})')
    if trunk.unused:
      note(f'  not used from the checkpoint: {", ".join(trunk.unused)}')
  return params
