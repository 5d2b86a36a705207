"""Pure ``init``/``apply`` functions: what research code imports.

    import perceiver
    model = perceiver.transform.masked_lm(perceiver.configs.language_mlm())
    params = model.init(rng, input_ids, input_mask)
    logits = model.apply(params, rng, input_ids, input_mask)   # [B, T, 262]

Each function builds ``model.Perceiver`` from a config and wraps it in ``hk.transform``.
``is_training`` is a Python bool (mark it static under ``jax.jit``); ``rng`` may be None
unless ``is_training`` with dropout. Inputs may be shorter than ``max_seq_len``: positions
beyond the input are simply unused, which gives the same logits as padding to
``max_seq_len`` with ``input_mask`` zero there.

How the model computes (never what) follows the platform its program is compiled for,
``platform=`` ('cpu', 'cuda', 'rocm' or 'tpu'; ``perceiver.model.layers.platform()``
names this host's): under ``config.kernels='auto'`` a CPU program computes with XLA:CPU's
kernels, any other with the original's formulas. ``platform=None`` (the default: the
platform is not known, e.g. a model built on a CPU host and exported for a GPU) computes
with the original's formulas, in ``config.compute_dtype``, right on every platform. The
commands pass the platform of the devices they run on (the training library's run driver).
``compute=`` (a ``perceiver.model.layers.Compute`` resolved from the same config) is
accepted instead of ``platform``.

``inference_params`` prepares parameters for repeated bfloat16 inference.
"""

from __future__ import annotations

from typing import Optional

import haiku as hk
import jax.numpy as jnp

from perceiver import configs
from perceiver.model import layers
from perceiver.model import modules as model


# The token classifier's new modules (the trunk keeps the masked LM's names).
TOKEN_DECODER = 'token_classification_decoder'
TOKEN_HEAD = 'token_classification_head'


def _compute(config, compute: Optional[layers.Compute], platform: Optional[str]
             ) -> layers.Compute:
  """How a model of ``config`` computes: resolved for ``platform`` (see the module
  docstring), or ``compute`` if given, which must be what the config resolves to on some
  platform."""
  if compute is None:
    return layers.Compute.resolve(config, platform)
  if platform is not None:
    raise ValueError(f'give platform ({platform!r}) or compute ({compute}), not both')
  if not isinstance(compute, layers.Compute):
    raise TypeError(f'compute must be a perceiver.model.layers.Compute, got {compute!r}')
  if (compute.dtype != jnp.dtype(config.compute_dtype)
      or config.get('kernels', 'auto') not in ('auto', compute.kernels)):
    raise ValueError(f'compute {compute} was not resolved from this config '
                     f'(compute_dtype={config.compute_dtype!r}, '
                     f'kernels={config.get("kernels", "auto")!r})')
  return compute


def _input_mask(input_ids, input_mask):
  if input_ids.ndim != 2:
    raise ValueError(f'input_ids must be [batch, seq], got shape {input_ids.shape}')
  if input_mask is None:
    return jnp.ones(input_ids.shape, jnp.int32)
  if input_mask.shape != input_ids.shape:
    raise ValueError(f'input_mask shape {input_mask.shape} != input_ids shape '
                     f'{input_ids.shape}')
  return input_mask


def _trunk(config, compute: layers.Compute):
  """The byte preprocessor and the encoder: what every task shares."""
  # input_position_init[_scale]: this project's options (the input table's initialisation
  # only; a config without them gets the original's truncated normal at 0.02).
  preprocessor = model.TextPreprocessor(
      config.vocab_size, config.d_model, config.max_seq_len,
      position_init_scale=config.get('input_position_init_scale', 0.02),
      position_init=config.get('input_position_init', 'truncated_normal'))
  encoder = model.PerceiverEncoder(**config.encoder.to_dict(), compute=compute,
                                   remat=config.get('remat', 'none'))
  return preprocessor, encoder


def masked_lm(config, compute: Optional[layers.Compute] = None, *,
              platform: Optional[str] = None) -> hk.Transformed:
  """The byte-level masked language model: ids [B, T] -> logits [B, T, vocab].

  ``apply(params, rng, input_ids, input_mask=None, is_training=False,
  query_positions=None, query_mask=None)``: with ``query_positions`` [B, L] only those
  positions are decoded (logits [B, L, vocab]); each decoder query attends to the
  latents alone, so their logits equal the full decoder's at those positions.
  ``query_mask`` [B, L] marks valid queries (default: ``input_mask`` at those positions).
  Padded queries are masked in the decoder as in the original.
  """
  configs.validate(config)
  compute = _compute(config, compute, platform)

  def forward(input_ids, input_mask=None, is_training=False, query_positions=None,
              query_mask=None):
    input_mask = _input_mask(input_ids, input_mask)
    if query_positions is None:
      query_mask = input_mask if query_mask is None else query_mask
    elif query_mask is None:
      query_mask = jnp.take_along_axis(input_mask, query_positions, axis=1)
    preprocessor, encoder = _trunk(config, compute)
    perceiver = model.Perceiver(
        encoder=encoder,
        decoder=model.BasicDecoder(**config.decoder.to_dict(), compute=compute,
                                   remat=config.get('remat', 'none')),
        input_preprocessor=preprocessor,
        output_postprocessor=model.EmbeddingDecoder(compute=compute))
    if query_positions is None:
      query_positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    return perceiver(input_ids, is_training=is_training, input_mask=input_mask,
                     query_positions=query_positions, query_mask=query_mask)

  return hk.transform(forward)


def classifier(config, num_classes: int, compute: Optional[layers.Compute] = None, *,
               platform: Optional[str] = None) -> hk.Transformed:
  """Sequence classification/regression: ids [B, T] -> [B, num_classes].

  The embeddings and encoder have the masked LM's names, so an MLM checkpoint's
  subtrees initialise them (``perceiver.params.transfer``); ``classification_decoder`` and
  ``classification_head`` are new.
  """
  configs.validate(config)
  compute = _compute(config, compute, platform)
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  cls = config.classifier

  def forward(input_ids, input_mask=None, is_training=False):
    input_mask = _input_mask(input_ids, input_mask)
    preprocessor, encoder = _trunk(config, compute)
    perceiver = model.Perceiver(
        encoder=encoder,
        decoder=model.ClassificationDecoder(num_classes, compute=compute,
                                            remat=config.get('remat', 'none'),
                                            **cls.decoder.to_dict()),
        input_preprocessor=preprocessor,
        output_postprocessor=model.ClassificationHead(
            num_classes, hidden_size=cls.head_hidden_size,
            dropout_prob=cls.head_dropout_prob, compute=compute))
    return perceiver(input_ids, is_training=is_training, input_mask=input_mask)

  return hk.transform(forward)


def token_classifier(config, num_labels: int, compute: Optional[layers.Compute] = None, *,
                     platform: Optional[str] = None) -> hk.Transformed:
  """Token (byte) classification, e.g. NER or POS tags: ids [B, T] -> [B, T, num_labels].

  The trunk has the masked LM's names, so an MLM checkpoint initialises it
  (``perceiver.params.transfer``). The decoder is the MLM decoder's structure (``config.decoder``:
  one trainable query per byte position, cross-attending to the latents) under the new
  name ``token_classification_decoder``, and each decoded position goes through
  ``classification_head``'s 2-layer tanh MLP (``config.classifier``'s width and dropout)
  under the name ``token_classification_head``.

  ``apply(params, rng, input_ids, input_mask=None, is_training=False,
  query_positions=None, query_mask=None)``: as ``masked_lm``, ``query_positions`` [B, L]
  decodes only those positions (e.g. each word's first byte), with the logits the full
  decoder gives there, since each query attends to the latents alone.
  """
  configs.validate(config)
  compute = _compute(config, compute, platform)
  if num_labels < 1:
    raise ValueError(f'num_labels must be >= 1, got {num_labels}')
  cls = config.classifier

  def forward(input_ids, input_mask=None, is_training=False, query_positions=None,
              query_mask=None):
    input_mask = _input_mask(input_ids, input_mask)
    if query_positions is None:
      query_positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
      query_mask = input_mask if query_mask is None else query_mask
    elif query_mask is None:
      query_mask = jnp.take_along_axis(input_mask, query_positions, axis=1)
    preprocessor, encoder_module = _trunk(config, compute)
    perceiver = model.Perceiver(
        encoder=encoder_module,
        decoder=model.BasicDecoder(**config.decoder.to_dict(), compute=compute,
                                   remat=config.get('remat', 'none'), name=TOKEN_DECODER),
        input_preprocessor=preprocessor,
        output_postprocessor=model.ClassificationHead(
            num_labels, hidden_size=cls.head_hidden_size, dropout_prob=cls.head_dropout_prob,
            compute=compute, name=TOKEN_HEAD))
    return perceiver(input_ids, is_training=is_training, input_mask=input_mask,
                     query_positions=query_positions, query_mask=query_mask)

  return hk.transform(forward)


def encoder(config, compute: Optional[layers.Compute] = None, *,
            platform: Optional[str] = None) -> hk.Transformed:
  """Feature extraction: ids [B, T] -> final latents [B, z_index_dim, num_z_channels]."""
  configs.validate(config)
  compute = _compute(config, compute, platform)

  def forward(input_ids, input_mask=None, is_training=False):
    input_mask = _input_mask(input_ids, input_mask)
    preprocessor, encoder_module = _trunk(config, compute)
    perceiver = model.Perceiver(encoder=encoder_module, input_preprocessor=preprocessor)
    return perceiver(input_ids, is_training=is_training, input_mask=input_mask)

  return hk.transform(forward)


def inference_params(params, config):
  """``params`` with every dense weight (``.../w``) stored in the compute dtype.

  For inference with ``compute_dtype='bfloat16'``: the model casts each dense weight to
  bfloat16 before its product anyway, so casting once here, outside the jitted call,
  gives bit-identical outputs without re-reading the float32 weights on every call
  (figures: ``bench/RESULTS.md``). Everything else (embeddings, position tables, biases,
  layer norms) stays float32, as the model reads it. With float32 compute, ``params`` is
  returned as is. Not for training: the optimizer updates the float32 weights.
  """
  dtype = jnp.dtype(config.compute_dtype)
  if dtype == jnp.float32:
    return params
  return {module: {name: (value.astype(dtype) if name == 'w' else value)
                   for name, value in leaves.items()}
          for module, leaves in params.items()}
