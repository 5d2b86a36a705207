"""Pure ``init``/``apply`` functions: what research code imports.

    import perceiver
    model = perceiver.transform.masked_lm(perceiver.configs.language_mlm())
    params = model.init(rng, input_ids, input_mask)
    logits = model.apply(params, rng, input_ids, input_mask)   # [B, T, 262]

Each function returns an ``hk.Transformed``; ``is_training`` is a Python bool (mark it
static under ``jax.jit``). ``rng`` may be None unless ``is_training`` with dropout.
Inputs may be shorter than ``max_seq_len``: positions beyond the input are simply unused,
which gives the same logits as padding to ``max_seq_len`` with ``input_mask`` zero there.
``inference_params`` prepares parameters for repeated bfloat16 inference.
"""

from __future__ import annotations

import haiku as hk
import jax.numpy as jnp

from perceiver import configs
from perceiver import model


def _dtype(config):
  return jnp.dtype(config.compute_dtype)


def _default_mask(input_ids, input_mask):
  if input_mask is None:
    return jnp.ones(input_ids.shape, jnp.int32)
  if input_mask.shape != input_ids.shape:
    raise ValueError(f'input_mask shape {input_mask.shape} != input_ids shape '
                     f'{input_ids.shape}')
  return input_mask


class _Trunk:
  """The shared trunk's modules: bytes -> embeddings -> latents.

  Called as ``inputs()``, ``latents()``, then ``encode()``; decoders make their queries
  before ``encode()``, the order of the original's ``Perceiver.__call__``.
  """

  def __init__(self, config, input_ids, input_mask):
    if input_ids.ndim != 2:
      raise ValueError(f'input_ids must be [batch, seq], got shape {input_ids.shape}')
    self.input_ids = input_ids
    self.input_mask = _default_mask(input_ids, input_mask)
    # input_position_init_scale: this project's option (initialisation only; absent from
    # a config means the original's 0.02).
    self.preprocessor = model.TextPreprocessor(
        config.vocab_size, config.d_model, config.max_seq_len,
        position_init_scale=config.get('input_position_init_scale', 0.02),
        position_init=config.get('input_position_init', 'truncated_normal'))
    self.encoder = model.PerceiverEncoder(**config.encoder.to_dict(),
                                          compute_dtype=_dtype(config),
                                          fusion_barrier=config.fusion_barrier)

  def inputs(self):
    """([B, T, D] embedded inputs with positions, [V, D] embedding table, [B, T, D] without)."""
    return self.preprocessor(self.input_ids)

  def latents(self):
    return self.encoder.latents(self.input_ids.shape[0])

  def encode(self, inputs, latents, is_training):
    return self.encoder(inputs, latents, is_training=is_training, input_mask=self.input_mask)


def masked_lm(config) -> hk.Transformed:
  """The byte-level masked language model: ids [B, T] -> logits [B, T, vocab].

  ``apply(params, rng, input_ids, input_mask=None, is_training=False,
  query_positions=None, query_mask=None)``: with ``query_positions`` [B, L] only those
  positions are decoded (logits [B, L, vocab]); each decoder query attends to the
  latents alone, so their logits equal the full decoder's at those positions.
  ``query_mask`` [B, L] marks valid queries (default: ``input_mask`` at those positions).
  Padded queries are masked in the decoder as in the original.
  """
  configs.validate(config)

  def forward(input_ids, input_mask=None, is_training=False, query_positions=None,
              query_mask=None):
    trunk = _Trunk(config, input_ids, input_mask)
    inputs, embedding_matrix, inputs_without_pos = trunk.inputs()
    latents = trunk.latents()
    input_mask = trunk.input_mask
    if query_positions is None:
      query_positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
      query_mask = input_mask if query_mask is None else query_mask
    else:
      if query_mask is None:
        query_mask = jnp.take_along_axis(input_mask, query_positions, axis=1)
      inputs_without_pos = jnp.take_along_axis(
          inputs_without_pos, query_positions[..., None], axis=1)
    decoder = model.BasicDecoder(**config.decoder.to_dict(), compute_dtype=_dtype(config))
    query = decoder.decoder_query(input_ids.shape[0], positions=query_positions,
                                  inputs_without_pos=inputs_without_pos)
    z = trunk.encode(inputs, latents, is_training)
    output = decoder(query, z, is_training=is_training, query_mask=query_mask)
    return model.EmbeddingDecoder(embedding_matrix, compute_dtype=_dtype(config))(output)

  return hk.transform(forward)


def classifier(config, num_classes: int) -> hk.Transformed:
  """Sequence classification/regression: ids [B, T] -> [B, num_classes].

  The embeddings and encoder have the masked LM's names, so an MLM checkpoint's
  subtrees initialise them; ``classification_decoder`` and ``classification_head`` are new.
  """
  configs.validate(config)
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  cls = config.classifier

  def forward(input_ids, input_mask=None, is_training=False):
    trunk = _Trunk(config, input_ids, input_mask)
    inputs, _, _ = trunk.inputs()
    z = trunk.encode(inputs, trunk.latents(), is_training)
    decoded = model.ClassificationDecoder(
        num_classes, compute_dtype=_dtype(config), **cls.decoder.to_dict())(
            z, is_training=is_training)
    return model.ClassificationHead(
        num_classes, hidden_size=cls.head_hidden_size, dropout_prob=cls.head_dropout_prob,
        compute_dtype=_dtype(config))(decoded, is_training=is_training)

  return hk.transform(forward)


def encoder(config) -> hk.Transformed:
  """Feature extraction: ids [B, T] -> final latents [B, z_index_dim, num_z_channels]."""
  configs.validate(config)

  def forward(input_ids, input_mask=None, is_training=False):
    trunk = _Trunk(config, input_ids, input_mask)
    inputs, _, _ = trunk.inputs()
    return trunk.encode(inputs, trunk.latents(), is_training)

  return hk.transform(forward)


def inference_params(params, config):
  """``params`` with every dense weight (``.../w``) stored in the compute dtype.

  For inference with ``compute_dtype='bfloat16'``: the model casts each dense weight to
  bfloat16 before its product anyway, so casting once here, outside the jitted call, gives
  bit-identical outputs without re-reading 804 MB of float32 weights per call (63 ms of a
  230 ms batch-1 forward pass on the benchmark's CPU). Everything else (embeddings,
  position tables, biases, layer norms) stays float32, as the model reads it. With
  float32 compute, ``params`` is returned as is. Not for training: the optimizer updates
  the float32 weights.
  """
  dtype = _dtype(config)
  if dtype == jnp.float32:
    return params
  return {module: {name: (value.astype(dtype) if name == 'w' else value)
                   for name, value in leaves.items()}
          for module, leaves in params.items()}
