"""Hugging Face interop: ``PerceiverForMaskedLM`` checkpoints to and from this project.

    config, notes = hf.config_from_hf(json.load(open('language-perceiver/config.json')))
    params = hf.hf_to_params(state_dict, config)      # and params_to_hf, hf_config_from

Reading and writing the files themselves is ``perceiver.params.hf_io``.

Tensor correspondence (transformers' name -> Haiku ``module/name``); every ``*.weight`` of
an ``nn.Linear`` is stored [out, in] by PyTorch and [in, out] by Haiku, so it is transposed:

- ``perceiver.input_preprocessor.embeddings.weight`` -> ``embed/embeddings``
- ``perceiver.input_preprocessor.position_embeddings.weight`` ->
  ``trainable_position_encoding/pos_embs``
- ``perceiver.embeddings.latents`` -> ``perceiver_encoder/~/trainable_position_encoding/pos_embs``
- ``perceiver.encoder.cross_attention.*`` -> ``perceiver_encoder/~/cross_attention/*``
- ``perceiver.encoder.self_attends.{i}.*`` -> ``perceiver_encoder/~/self_attention[_i]/*``
  (both share these layers across ``num_blocks``)
- ``perceiver.decoder.output_position_encodings.position_embeddings`` ->
  ``basic_decoder/~/trainable_position_encoding/pos_embs``
- ``perceiver.decoder.decoding_cross_attention.*`` -> ``basic_decoder/cross_attention/*``
- ``embedding_decoder.bias`` -> ``embedding_decoder/bias`` (the output embedding is the
  input embedding in both: tied, stored once).

Inside an attention block: ``attention.self.{query,key,value}`` and ``attention.output.dense``
are ``attention/linear{,_1,_2,_3}``; ``mlp.dense{1,2}`` are ``mlp/linear{,_1}``;
``attention.self.layernorm1`` (queries) is ``layer_norm``, ``attention.self.layernorm2``
(keys/values, cross-attention only) ``layer_norm_1``, and ``layernorm`` (before the MLP)
the block's last one (``layer_norm_2`` in a cross-attention, ``layer_norm_1`` in a
self-attention). LayerNorm ``weight``/``bias`` are Haiku's ``scale``/``offset``.

How transformers' port computes differently from the original (and so from this project):

- ``hidden_act="gelu"`` (its default, and the hub model's) is the exact erf GELU; the
  original uses ``jax.nn.gelu``, the tanh approximation (``"gelu_new"`` in transformers).
  The import keeps the original's function (and says so); the export writes ``gelu_new``.
- ``layer_norm_eps`` is not read by its Perceiver modules: they use ``nn.LayerNorm``'s
  default eps 1e-5, which is Haiku's. The export writes 1e-5 so the config says so.
- It does not mask padded decoder queries: their rows are computed like any other, where
  the original zeroes their attention output. Logits at real positions agree.
- Its ``PerceiverForMaskedLM`` text decoder is fixed: 8 heads, qk 256, v ``d_model``, one
  query per position up to ``max_position_embeddings``, no query residual, no final
  projection. The export refuses configs it cannot express, naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Tuple

import ml_collections
import numpy as np

from perceiver.params import params_file
from perceiver import configs
from perceiver.command import errors
from perceiver import transform

CheckpointError = params_file.CheckpointError

# PerceiverForMaskedLM's text decoder, fixed in transformers' code.
HF_DECODER_HEADS = 8
HF_DECODER_QK_CHANNELS = 256

# PerceiverConfig's defaults, for fields a config.json leaves out.
_HF_DEFAULTS = {
    'num_latents': 256, 'd_latents': 1280, 'd_model': 768, 'num_blocks': 1,
    'num_self_attends_per_block': 26, 'num_self_attention_heads': 8,
    'num_cross_attention_heads': 8, 'qk_channels': None, 'v_channels': None,
    'cross_attention_shape_for_attention': 'kv', 'self_attention_widening_factor': 1,
    'cross_attention_widening_factor': 1, 'hidden_act': 'gelu', 'layer_norm_eps': 1e-12,
    'use_query_residual': True, 'vocab_size': 262, 'max_position_embeddings': 2048,
}
# Activations that are the original's tanh-approximated GELU.
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')
_HAIKU_LAYER_NORM_EPS = 1e-5


class UnsupportedConfigError(errors.UserError, ValueError):
  """A configuration one side cannot express; the message names the field."""


def refuse_token_classifier(params, source='the parameters') -> None:
  """Refuses a token classifier (``transform.token_classifier``) for export.

  transformers has no Perceiver token-classification model (no
  ``PerceiverForTokenClassification``, as of 5.24), so no export of one would load as a
  tagger there; writing its trunk as a masked LM would silently drop the tag head.

  Raises:
    UnsupportedConfigError: naming ``source`` and the token classifier's modules.
  """
  modules = sorted({m.split('/')[0] for m in params
                    if m.startswith((transform.TOKEN_DECODER, transform.TOKEN_HEAD))})
  if modules:
    raise UnsupportedConfigError(
        f'{source} is a token classifier ({", ".join(modules)}): transformers has no '
        'Perceiver token-classification model (no PerceiverForTokenClassification), so '
        'nothing it loads would compute these tags; only masked LMs are exported. Use '
        'the checkpoint with this project (perceiver.transform.token_classifier)')


# --------------------------------------------------------------------------------------
# Configurations.

def _int_field(hf_config, field, source, allow_none=False):
  value = hf_config.get(field, _HF_DEFAULTS[field])
  if value is None and allow_none:
    return None
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise UnsupportedConfigError(f'{source}: {field}={value!r} must be a positive integer'
                                 + (' or null' if allow_none else ''))
  return value


def config_from_hf(hf_config: Mapping, source='config.json'
                   ) -> Tuple[ml_collections.ConfigDict, List[str]]:
  """This project's config for a transformers ``PerceiverForMaskedLM`` config.json.

  Args:
    hf_config: the parsed config.json.
    source: the file, for messages.

  Returns:
    (ConfigDict for ``transform.masked_lm``, notes on how the computation differs from
    transformers' with this config.json).

  Raises:
    UnsupportedConfigError: naming the field the original model cannot express.
  """
  notes = []
  model_type = hf_config.get('model_type', 'perceiver')
  if model_type != 'perceiver':
    raise UnsupportedConfigError(f"{source}: model_type={model_type!r}, expected 'perceiver'")
  architectures = hf_config.get('architectures') or ['PerceiverForMaskedLM']
  if 'PerceiverForMaskedLM' not in architectures:
    raise UnsupportedConfigError(f'{source}: architectures={architectures!r}; only '
                                 'PerceiverForMaskedLM checkpoints can be converted')
  ints = {f: _int_field(hf_config, f, source) for f in (
      'd_model', 'd_latents', 'num_latents', 'num_blocks', 'num_self_attends_per_block',
      'num_self_attention_heads', 'num_cross_attention_heads', 'vocab_size',
      'max_position_embeddings', 'self_attention_widening_factor',
      'cross_attention_widening_factor')}
  qk = _int_field(hf_config, 'qk_channels', source, allow_none=True)
  v = _int_field(hf_config, 'v_channels', source, allow_none=True)
  shape_for_attn = hf_config.get('cross_attention_shape_for_attention', 'kv')
  if shape_for_attn not in ('q', 'kv'):
    raise UnsupportedConfigError(f"{source}: cross_attention_shape_for_attention="
                                 f"{shape_for_attn!r} must be 'q' or 'kv'")
  query_residual = hf_config.get('use_query_residual', True)
  if not isinstance(query_residual, bool):
    raise UnsupportedConfigError(f'{source}: use_query_residual={query_residual!r} must be '
                                 'true or false')
  activation = hf_config.get('hidden_act', _HF_DEFAULTS['hidden_act'])
  if activation == 'gelu':
    notes.append(f'{source}: hidden_act="gelu" is the exact (erf) GELU in transformers; '
                 'the original model, and this conversion, use the tanh approximation '
                 '(jax.nn.gelu = transformers\' "gelu_new"). Logits differ from '
                 'transformers\' by ~1e-4 relative; they match the original.')
  elif activation not in _TANH_GELUS:
    raise UnsupportedConfigError(
        f'{source}: hidden_act={activation!r}; the original model\'s MLPs use GELU: '
        f'accepted are "gelu" and the tanh forms {", ".join(_TANH_GELUS)}')
  eps = hf_config.get('layer_norm_eps', _HF_DEFAULTS['layer_norm_eps'])
  if eps != _HAIKU_LAYER_NORM_EPS:
    notes.append(f'{source}: layer_norm_eps={eps} is not read by transformers\' Perceiver '
                 '(its LayerNorms use PyTorch\'s default eps 1e-5, which is Haiku\'s); '
                 'nothing to convert.')
  d_model = ints['d_model']
  if d_model % HF_DECODER_HEADS:
    raise UnsupportedConfigError(f'{source}: d_model={d_model} must be divisible by the '
                                 f'text decoder\'s {HF_DECODER_HEADS} heads')
  base = configs.language_mlm().to_dict()
  base.update(vocab_size=ints['vocab_size'], d_model=d_model,
              max_seq_len=ints['max_position_embeddings'])
  base['encoder'] = dict(
      num_self_attends_per_block=ints['num_self_attends_per_block'],
      num_blocks=ints['num_blocks'],
      z_index_dim=ints['num_latents'],
      num_z_channels=ints['d_latents'],
      num_self_attend_heads=ints['num_self_attention_heads'],
      num_cross_attend_heads=ints['num_cross_attention_heads'],
      qk_channels=qk,
      v_channels=v,
      use_query_residual=query_residual,
      cross_attend_widening_factor=ints['cross_attention_widening_factor'],
      self_attend_widening_factor=ints['self_attention_widening_factor'],
      cross_attention_shape_for_attn=shape_for_attn)
  text_decoder = dict(qk_channels=HF_DECODER_QK_CHANNELS, v_channels=d_model,
                      num_heads=HF_DECODER_HEADS,
                      trainable_position_encoding_kwargs=dict(num_channels=d_model))
  base['decoder'].update(text_decoder, output_num_channels=ints['d_latents'],
                         output_index_dims=ints['max_position_embeddings'],
                         num_z_channels=ints['d_latents'])
  base['classifier']['decoder'].update(text_decoder)
  base['classifier']['head_hidden_size'] = d_model
  config = ml_collections.ConfigDict(base)
  try:
    configs.validate(config)
  except ValueError as e:
    raise UnsupportedConfigError(f'{source}: {e}') from e
  return config, notes


def _effective_decoder_channels(config) -> Tuple[int, int]:
  """The decoder's (qk, v) channels as the model resolves them (kv-shaped default)."""
  dec = config.decoder
  qk = dec.get('qk_channels') or config.encoder.num_z_channels
  return qk, dec.get('v_channels') or qk


def hf_config_from(config) -> Tuple[dict, List[str]]:
  """The config.json of ``PerceiverForMaskedLM`` computing what ``config``'s model computes.

  Returns:
    (config.json dict, notes).

  Raises:
    UnsupportedConfigError: naming the field that transformers cannot express.
  """
  configs.validate(config)
  enc, dec = config.encoder, config.decoder
  notes = []

  def refuse(field, value, why):
    raise UnsupportedConfigError(f'config field {field}={value!r}: {why}; transformers\' '
                                 'PerceiverForMaskedLM cannot express it')

  fixed = 'its text decoder is fixed'
  qk, v = _effective_decoder_channels(config)
  if dec.get('position_encoding_type', 'trainable') != 'trainable':
    refuse('decoder.position_encoding_type', dec.position_encoding_type,
           'its decoder queries are trainable positions')
  if dec.get('num_heads', 1) != HF_DECODER_HEADS:
    refuse('decoder.num_heads', dec.get('num_heads', 1), f'{fixed} at {HF_DECODER_HEADS} heads')
  if qk != HF_DECODER_QK_CHANNELS:
    refuse('decoder.qk_channels', dec.get('qk_channels'),
           f'{fixed} at qk_channels={HF_DECODER_QK_CHANNELS}')
  if v != config.d_model:
    refuse('decoder.v_channels', dec.get('v_channels'), f'{fixed} at v_channels=d_model')
  for field, wanted in (('final_project', False), ('use_query_residual', False),
                        ('concat_preprocessed_input', False)):
    default = {'final_project': True}.get(field, False)
    if dec.get(field, default) != wanted:
      refuse(f'decoder.{field}', dec.get(field, default), f'{fixed} with {field}={wanted}')
  if dec.output_index_dims != config.max_seq_len:
    refuse('decoder.output_index_dims', dec.output_index_dims,
           f'{fixed} at one query per input position (max_seq_len={config.max_seq_len})')
  shape_for_attn = enc.get('cross_attention_shape_for_attn', 'kv')
  if config.get('compute_dtype', 'float32') != 'float32':
    notes.append(f'compute_dtype={config.compute_dtype!r}: the exported parameters are '
                 'float32 and transformers computes in its own dtype.')
  hf_config = {
      'architectures': ['PerceiverForMaskedLM'],
      'model_type': 'perceiver',
      'vocab_size': config.vocab_size,
      'd_model': config.d_model,
      'max_position_embeddings': config.max_seq_len,
      'num_latents': enc.z_index_dim,
      'd_latents': enc.num_z_channels,
      'num_blocks': enc.get('num_blocks', 8),
      'num_self_attends_per_block': enc.get('num_self_attends_per_block', 6),
      'num_self_attention_heads': enc.get('num_self_attend_heads', 8),
      'num_cross_attention_heads': enc.get('num_cross_attend_heads', 1),
      'qk_channels': enc.get('qk_channels'),
      'v_channels': enc.get('v_channels'),
      'cross_attention_shape_for_attention': shape_for_attn,
      'self_attention_widening_factor': enc.get('self_attend_widening_factor', 1),
      'cross_attention_widening_factor': enc.get('cross_attend_widening_factor', 1),
      'use_query_residual': bool(enc.get('use_query_residual', True)),
      'hidden_act': 'gelu_new',
      'layer_norm_eps': _HAIKU_LAYER_NORM_EPS,
      'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02,
  }
  return hf_config, notes


# --------------------------------------------------------------------------------------
# The tensor correspondence.

@dataclasses.dataclass(frozen=True)
class _Pair:
  hf: str          # transformers' state-dict name
  module: str      # Haiku module path
  name: str        # Haiku parameter name
  transpose: bool  # an nn.Linear weight: [out, in] in PyTorch, [in, out] in Haiku


_ATTENTION_LINEARS = (('attention.self.query', 'attention/linear'),
                      ('attention.self.key', 'attention/linear_1'),
                      ('attention.self.value', 'attention/linear_2'),
                      ('attention.output.dense', 'attention/linear_3'),
                      ('mlp.dense1', 'mlp/linear'),
                      ('mlp.dense2', 'mlp/linear_1'))
_CROSS_NORMS = (('attention.self.layernorm1', 'layer_norm'),
                ('attention.self.layernorm2', 'layer_norm_1'),
                ('layernorm', 'layer_norm_2'))
_SELF_NORMS = (('attention.self.layernorm1', 'layer_norm'),
               ('layernorm', 'layer_norm_1'))


def _block(hf_prefix, hk_prefix, cross) -> List[_Pair]:
  pairs = []
  for hf_name, hk_name in _ATTENTION_LINEARS:
    pairs.append(_Pair(f'{hf_prefix}.{hf_name}.weight', f'{hk_prefix}/{hk_name}', 'w', True))
    pairs.append(_Pair(f'{hf_prefix}.{hf_name}.bias', f'{hk_prefix}/{hk_name}', 'b', False))
  for hf_name, hk_name in (_CROSS_NORMS if cross else _SELF_NORMS):
    pairs.append(_Pair(f'{hf_prefix}.{hf_name}.weight', f'{hk_prefix}/{hk_name}', 'scale',
                       False))
    pairs.append(_Pair(f'{hf_prefix}.{hf_name}.bias', f'{hk_prefix}/{hk_name}', 'offset',
                       False))
  return pairs


def tensor_pairs(config) -> List[_Pair]:
  """Every (transformers tensor, Haiku parameter) pair of the masked LM, one to one."""
  pairs = [
      _Pair('perceiver.input_preprocessor.embeddings.weight', 'embed', 'embeddings', False),
      _Pair('perceiver.input_preprocessor.position_embeddings.weight',
            'trainable_position_encoding', 'pos_embs', False),
      _Pair('perceiver.embeddings.latents', 'perceiver_encoder/~/trainable_position_encoding',
            'pos_embs', False),
      _Pair('perceiver.decoder.output_position_encodings.position_embeddings',
            'basic_decoder/~/trainable_position_encoding', 'pos_embs', False),
      _Pair('embedding_decoder.bias', 'embedding_decoder', 'bias', False),
  ]
  pairs += _block('perceiver.encoder.cross_attention', 'perceiver_encoder/~/cross_attention',
                  cross=True)
  for i in range(config.encoder.num_self_attends_per_block):
    suffix = '' if i == 0 else f'_{i}'
    pairs += _block(f'perceiver.encoder.self_attends.{i}',
                    f'perceiver_encoder/~/self_attention{suffix}', cross=False)
  pairs += _block('perceiver.decoder.decoding_cross_attention', 'basic_decoder/cross_attention',
                  cross=True)
  hf_names = [p.hf for p in pairs]
  hk_names = [(p.module, p.name) for p in pairs]
  assert len(set(hf_names)) == len(pairs) and len(set(hk_names)) == len(pairs), 'not 1:1'
  return pairs


def _expected(config):
  return params_file.expected_shapes(transform.masked_lm(config), config)


def _format_problems(source, missing, extra, wrong) -> str:
  problems = []
  if missing:
    problems.append(f'missing {len(missing)}: ' + ', '.join(missing[:20]))
  if extra:
    problems.append(f'unexpected {len(extra)}: ' + ', '.join(extra[:20]))
  if wrong:
    problems.append(f'mis-shaped {len(wrong)}: ' + ', '.join(wrong[:20]))
  return f'{source} does not match the model: ' + '; '.join(problems)


def expected_hf_shapes(config) -> Dict[str, tuple]:
  """{transformers tensor name: shape} of ``PerceiverForMaskedLM`` for this config."""
  expected = _expected(config)
  shapes = {}
  for pair in tensor_pairs(config):
    shape = tuple(expected[pair.module][pair.name])
    shapes[pair.hf] = shape[::-1] if pair.transpose else shape
  return shapes


def hf_to_params(tensors: Mapping[str, np.ndarray], config, source='state dict') -> dict:
  """Maps a ``PerceiverForMaskedLM`` state dict onto the masked LM's Haiku parameters.

  Every tensor must be used exactly once and every parameter filled.

  Args:
    tensors: {transformers name: array}.
    config: this project's config (e.g. from ``config_from_hf``).
    source: the file, for messages.

  Returns:
    {module: {name: float32 np.ndarray}}, checked against the model's shapes.

  Raises:
    CheckpointError: naming every missing, unexpected and mis-shaped tensor.
  """
  expected = _expected(config)
  pairs = tensor_pairs(config)
  missing, wrong = [], []
  params: dict = {}
  for pair in pairs:
    want = tuple(expected[pair.module][pair.name])
    want_hf = want[::-1] if pair.transpose else want
    if pair.hf not in tensors:
      missing.append(pair.hf)
      continue
    value = np.asarray(tensors[pair.hf])
    if value.shape != want_hf:
      wrong.append(f'{pair.hf} {list(value.shape)} (expected {list(want_hf)})')
      continue
    value = value.T if pair.transpose else value
    params.setdefault(pair.module, {})[pair.name] = np.ascontiguousarray(value, np.float32)
  extra = sorted(set(tensors) - {p.hf for p in pairs})
  if missing or extra or wrong:
    raise CheckpointError(_format_problems(source, missing, extra, wrong))
  params_file.check_params(params, expected, source=source)
  return params


def params_to_hf(params, config) -> Dict[str, np.ndarray]:
  """The inverse of ``hf_to_params``: {transformers name: float32 array}.

  Raises:
    CheckpointError: naming the missing, unexpected or mis-shaped Haiku parameters.
  """
  params_file.check_params(params, _expected(config), source='parameters')
  tensors = {}
  for pair in tensor_pairs(config):
    value = np.asarray(params[pair.module][pair.name], np.float32)
    tensors[pair.hf] = np.ascontiguousarray(value.T if pair.transpose else value)
  return tensors
