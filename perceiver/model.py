"""The Perceiver IO language model's modules: preprocessor, encoder, decoders, heads.

Constructor keyword arguments are the original's (``PerceiverEncoder``, ``BasicDecoder``,
``ClassificationDecoder``), so a config written for DeepMind's code builds the same model
here, with the same parameter names. Two keywords are this project's own and change no
value: ``compute_dtype`` (see ``layers``) and ``fusion_barrier`` (see
``layers.fusion_barrier``).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver import layers
from perceiver import position_encoding


def use_fusion_barrier(setting) -> bool:
  """Resolves a ``fusion_barrier`` setting: 'on', 'off' or 'auto' (on for XLA:CPU only).

  On GPU/TPU the barrier's ``lax.cond`` would cost a device-host sync per layer in the
  backward pass and buys nothing, since their fusion heuristics don't show the problem.
  """
  if setting == 'auto':
    return jax.default_backend() == 'cpu'
  if setting in ('on', 'off'):
    return setting == 'on'
  raise ValueError(f"fusion_barrier must be 'on', 'off' or 'auto', got {setting!r}")


class TextPreprocessor(hk.Module):
  """Byte embedding plus trainable input positions.

  Its ``__call__`` is transparent: the parameters live at the top level as ``embed`` and
  ``trainable_position_encoding``, where the original's colab creates them.
  """

  def __init__(self, vocab_size, d_model, max_seq_len, position_init_scale=0.02,
               position_init='truncated_normal', name='text_preprocessor'):
    super().__init__(name=name)
    self.vocab_size = vocab_size
    self.d_model = d_model
    self.max_seq_len = max_seq_len
    # The original's colab builds the table with TrainablePositionEncoding's default, 0.02.
    self.position_init_scale = position_init_scale
    self.position_init = position_init

  @hk.transparent
  def __call__(self, input_ids):
    """[B, T] int ids -> ([B, T, D] embeddings + positions, [V, D] table, [B, T, D] without positions)."""
    seq_len = input_ids.shape[1]
    if seq_len > self.max_seq_len:
      raise ValueError(f'input length {seq_len} exceeds max_seq_len={self.max_seq_len}')
    embed = hk.Embed(vocab_size=self.vocab_size, embed_dim=self.d_model, name='embed')
    embedded = embed(input_ids)
    positions = position_encoding.TrainablePositionEncoding(
        index_dim=self.max_seq_len, num_channels=self.d_model,
        init_scale=self.position_init_scale, init=self.position_init,
        name='trainable_position_encoding')()
    return embedded + positions[None, :seq_len], embed.embeddings, embedded


class EmbeddingDecoder(hk.Module):
  """Logits from the (tied) input embedding: ``x @ E^T + bias``."""

  def __init__(self, embedding_matrix, compute_dtype=jnp.float32, name='embedding_decoder'):
    super().__init__(name=name)
    self.embedding_matrix = embedding_matrix
    self.compute_dtype = compute_dtype

  def __call__(self, x):
    """[B, N, D] -> [B, N, V]."""
    vocab_size = self.embedding_matrix.shape[0]
    table = self.embedding_matrix
    low = layers.low_precision_dtype(self.compute_dtype)
    if low is not None:
      x, table = x.astype(low), table.astype(low)
    logits = jnp.einsum('bnd,vd->bnv', x, table, preferred_element_type=jnp.float32)
    bias = hk.get_parameter('bias', [vocab_size], jnp.float32, init=jnp.zeros)
    return logits + layers.broadcast_rows(bias, logits.shape)


class PerceiverEncoder(hk.Module):
  """Cross-attends the inputs into trainable latents, then self-attends the latents.

  There are ``num_self_attends_per_block * num_blocks`` self-attends; the
  ``num_self_attends_per_block`` layers' weights are shared by every block.
  """

  def __init__(self, num_self_attends_per_block=6, num_blocks=8, z_index_dim=512,
               num_z_channels=1024, qk_channels=None, v_channels=None,
               num_cross_attend_heads=1, num_self_attend_heads=8,
               cross_attend_widening_factor=1, self_attend_widening_factor=1,
               dropout_prob=0.0, z_pos_enc_init_scale=0.02,
               cross_attention_shape_for_attn='kv', use_query_residual=True,
               compute_dtype=jnp.float32, fusion_barrier='auto',
               z_pos_enc_init='truncated_normal', name='perceiver_encoder'):
    super().__init__(name=name)
    for heads_name, heads in (('num_self_attend_heads', num_self_attend_heads),
                              ('num_cross_attend_heads', num_cross_attend_heads)):
      if num_z_channels % heads:
        raise ValueError(f'num_z_channels ({num_z_channels}) must be divisible by '
                         f'{heads_name} ({heads}).')
    self.num_blocks = num_blocks
    self.fusion_barrier = use_fusion_barrier(fusion_barrier)
    self.z_pos_enc = position_encoding.TrainablePositionEncoding(
        index_dim=z_index_dim, num_channels=num_z_channels, init_scale=z_pos_enc_init_scale,
        init=z_pos_enc_init)
    self.cross_attend = layers.CrossAttention(
        dropout_prob=dropout_prob, num_heads=num_cross_attend_heads,
        widening_factor=cross_attend_widening_factor,
        shape_for_attn=cross_attention_shape_for_attn, qk_channels=qk_channels,
        v_channels=v_channels, use_query_residual=use_query_residual,
        compute_dtype=compute_dtype)
    self.self_attends = [
        layers.SelfAttention(
            num_heads=num_self_attend_heads, dropout_prob=dropout_prob,
            qk_channels=qk_channels, v_channels=v_channels,
            widening_factor=self_attend_widening_factor, compute_dtype=compute_dtype)
        for _ in range(num_self_attends_per_block)]

  def latents(self, batch_size):
    """The initial latent array, [B, z_index_dim, num_z_channels]."""
    return self.z_pos_enc(batch_size=batch_size)

  def __call__(self, inputs, z, *, is_training, input_mask=None):
    """[B, M, C] inputs, [B, N, Z] latents, optional [B, M] mask -> [B, N, Z]."""
    attention_mask = None
    if input_mask is not None:
      attention_mask = layers.cross_attention_mask(
          jnp.ones(z.shape[:2], jnp.int32), input_mask.astype(jnp.int32))
    z = self.cross_attend(z, inputs, is_training=is_training, attention_mask=attention_mask)
    for _ in range(self.num_blocks):
      for self_attend in self.self_attends:
        if self.fusion_barrier:
          z = layers.fusion_barrier(z)
        z = self_attend(z, is_training=is_training)
    return z


class BasicDecoder(hk.Module):
  """Cross-attends queries (trainable output positions) into the latents.

  The keyword arguments are the original's. ``num_z_channels`` and
  ``subsampled_index_dims`` are accepted and unused, as there; to decode a subset of
  positions, pass ``positions`` to ``decoder_query``.
  """

  def __init__(self, output_num_channels, position_encoding_type='trainable',
               output_index_dims=None, subsampled_index_dims=None, num_z_channels=1024,
               qk_channels=None, v_channels=None, use_query_residual=False,
               output_w_init=None, concat_preprocessed_input=False, num_heads=1,
               name='basic_decoder', final_project=True, compute_dtype=jnp.float32,
               **position_encoding_kwargs):
    super().__init__(name=name)
    del subsampled_index_dims, num_z_channels  # Unused, as in the original.
    self.output_pos_enc = None
    if position_encoding_type != 'none':
      self.output_pos_enc = position_encoding.build_position_encoding(
          position_encoding_type, index_dims=output_index_dims, **position_encoding_kwargs)
    self.output_num_channels = output_num_channels
    self.output_w_init = output_w_init
    self.use_query_residual = use_query_residual
    self.qk_channels = qk_channels
    self.v_channels = v_channels
    self.final_project = final_project
    self.num_heads = num_heads
    self.concat_preprocessed_input = concat_preprocessed_input
    self.compute_dtype = compute_dtype

  def decoder_query(self, batch_size, positions=None, inputs_without_pos=None):
    """Output-position queries.

    Args:
      batch_size: B.
      positions: optional [B, L] int indices of the output positions to decode
        (default: all ``output_index_dims``).
      inputs_without_pos: [B, L, C] preprocessed inputs, required when
        ``concat_preprocessed_input`` (concatenated before the positions).

    Returns:
      [B, L, Cq] queries.
    """
    if self.output_pos_enc is None:
      raise ValueError("position_encoding_type='none': pass your own queries to __call__.")
    query = self.output_pos_enc(batch_size=batch_size, positions=positions)
    if self.concat_preprocessed_input:
      if inputs_without_pos is None:
        raise ValueError('concat_preprocessed_input=True needs inputs_without_pos.')
      query = jnp.concatenate([inputs_without_pos, query], axis=-1)
    return query

  def __call__(self, query, z, *, is_training, query_mask=None):
    """[B, L, Cq] queries, [B, N, Z] latents, optional [B, L] mask -> [B, L, C]."""
    attention_mask = None
    if query_mask is not None:
      attention_mask = layers.cross_attention_mask(
          query_mask.astype(jnp.int32), jnp.ones(z.shape[:2], jnp.int32))
    output = layers.CrossAttention(
        dropout_prob=0.0, num_heads=self.num_heads, widening_factor=1, shape_for_attn='kv',
        qk_channels=self.qk_channels, v_channels=self.v_channels,
        use_query_residual=self.use_query_residual, compute_dtype=self.compute_dtype)(
            query, z, is_training=is_training, attention_mask=attention_mask)
    if self.final_project:
      output = layers.Linear(self.output_num_channels, w_init=self.output_w_init,
                             compute_dtype=self.compute_dtype, name='output')(output)
    return output


class ClassificationDecoder(hk.Module):
  """A ``BasicDecoder`` with one trainable query: [B, N, Z] latents -> [B, C]."""

  def __init__(self, num_classes, name='classification_decoder', **decoder_kwargs):
    super().__init__(name=name)
    self.decoder = BasicDecoder(output_index_dims=(1,), output_num_channels=num_classes,
                                **decoder_kwargs)

  def __call__(self, z, *, is_training):
    query = self.decoder.decoder_query(batch_size=z.shape[0])
    return self.decoder(query, z, is_training=is_training)[:, 0, :]


class ClassificationHead(hk.Module):
  """Two-layer MLP on the decoded query: Linear(hidden), tanh, Linear(num_outputs)."""

  def __init__(self, num_outputs, hidden_size=768, dropout_prob=0.0,
               compute_dtype=jnp.float32, name='classification_head'):
    super().__init__(name=name)
    self.num_outputs = num_outputs
    self.hidden_size = hidden_size
    self.dropout_prob = dropout_prob
    self.compute_dtype = compute_dtype

  def __call__(self, x, *, is_training):
    """[B, C] -> [B, num_outputs]."""
    x = layers.dropout(x, self.dropout_prob, is_training)
    x = jnp.tanh(layers.Linear(self.hidden_size, compute_dtype=self.compute_dtype)(x))
    x = layers.dropout(x, self.dropout_prob, is_training)
    return layers.Linear(self.num_outputs, compute_dtype=self.compute_dtype)(x)
