"""The Perceiver IO language model's modules: preprocessor, encoder, decoders, heads.

Constructor keyword arguments are the original's (``PerceiverEncoder``, ``BasicDecoder``,
``ClassificationDecoder``), so a config written for DeepMind's code builds the same model
here, with the same parameter names. One keyword is this project's own and changes no
parameter: ``compute``, a ``perceiver.model.layers.Compute`` (the matmul dtype and the kernels,
resolved for a platform). Without it a module computes as the original, in float32 with
the reference formulas (``layers.REFERENCE``). The encoder and decoders take one more,
``remat`` (a name in ``REMAT_POLICIES``): which of each attention block's activations the
backward pass keeps and which it recomputes. It changes memory and time, never a
parameter, and values only by float rounding.

Traced under a mesh (``jax.sharding.use_abstract_mesh``, as the train step does), the
activations between blocks are laid out with their batch split over every axis of the
mesh (``batch_layout``), as the step splits its batch.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from perceiver.model import layers
from perceiver.model import position_encoding
from perceiver.model import xla_cpu


# Rematerialisation of each attention block (the encoder's cross-attend, every latent
# self-attend, the decoder's cross-attend), by name: which of a block's activations the
# backward pass keeps (None: no rematerialisation, everything is kept).
REMAT_POLICIES = {
    'none': None,
    # Only each block's inputs are kept; the block is recomputed in the backward pass.
    'block': jax.checkpoint_policies.nothing_saveable,
    # The products with weights are kept; attention scores, softmax, norms and GELUs
    # (the products over the batch's own positions) are recomputed.
    'block_save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rematerialised(block, remat: str):
  """``block`` (a function of arrays) under the rematerialisation policy named ``remat``.

  ``hk.remat`` keeps Haiku's names and random keys: the parameters are the same, and a
  recomputed dropout draws the same mask. Its ``prevent_cse`` puts one optimization
  barrier before each recomputed block, so that XLA cannot merge the recomputation back
  into the forward pass (GPU and TPU compilers keep it; XLA:CPU drops it first unless
  told not to, see ``bench.scale``, and so keeps every activation anyway).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat must be one of {", ".join(REMAT_POLICIES)}; got {remat!r}')
  if remat == 'none':
    return block
  return hk.remat(block, policy=REMAT_POLICIES[remat])


def batch_layout(x):
  """``x`` [B, ...] constrained to have its batch split over every axis of the mesh the
  program is traced under (the step's batch layout); ``x`` itself without one.

  With only the parameters' and the batch's layouts given, XLA's partitioner may split an
  attention over its heads and gather whole weights to get there, keeping them for the
  backward pass; fixed batch layouts between blocks keep each weight split until the
  block that uses it gathers it.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, P(tuple(mesh.axis_names)))


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
    """[B, T] int ids -> ([B, T, D] embeddings + positions, [B, T, D] without positions,
    [V, D] embedding table)."""
    seq_len = input_ids.shape[1]
    if seq_len > self.max_seq_len:
      raise ValueError(f'input length {seq_len} exceeds max_seq_len={self.max_seq_len}')
    embed = hk.Embed(vocab_size=self.vocab_size, embed_dim=self.d_model, name='embed')
    embedded = embed(input_ids)
    positions = position_encoding.TrainablePositionEncoding(
        index_dim=self.max_seq_len, num_channels=self.d_model,
        init_scale=self.position_init_scale, init=self.position_init,
        name='trainable_position_encoding')()
    return embedded + positions[None, :seq_len], embedded, embed.embeddings


class EmbeddingDecoder(hk.Module):
  """Logits from the (tied) input embedding: ``x @ E^T + bias``."""

  def __init__(self, compute=layers.REFERENCE, name='embedding_decoder'):
    super().__init__(name=name)
    self.compute = compute

  def __call__(self, x, *, embedding_matrix, is_training=False):
    """[B, N, D] outputs, [V, D] embedding table -> [B, N, V] logits."""
    del is_training
    vocab_size = embedding_matrix.shape[0]
    table = embedding_matrix
    low = self.compute.low_precision
    if low is not None:
      x, table = x.astype(low), table.astype(low)
    logits = jnp.einsum('bnd,vd->bnv', x, table, preferred_element_type=jnp.float32)
    bias = hk.get_parameter('bias', [vocab_size], jnp.float32, init=jnp.zeros)
    return self.compute.select(jnp.add, xla_cpu.add_bias)(logits, bias)


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
               compute=layers.REFERENCE, z_pos_enc_init='truncated_normal',
               remat='none', name='perceiver_encoder'):
    super().__init__(name=name)
    for heads_name, heads in (('num_self_attend_heads', num_self_attend_heads),
                              ('num_cross_attend_heads', num_cross_attend_heads)):
      if num_z_channels % heads:
        raise ValueError(f'num_z_channels ({num_z_channels}) must be divisible by '
                         f'{heads_name} ({heads}).')
    self.num_blocks = num_blocks
    self.compute = compute
    self.remat = remat
    self.z_pos_enc = position_encoding.TrainablePositionEncoding(
        index_dim=z_index_dim, num_channels=num_z_channels, init_scale=z_pos_enc_init_scale,
        init=z_pos_enc_init)
    self.cross_attend = layers.CrossAttention(
        dropout_prob=dropout_prob, num_heads=num_cross_attend_heads,
        widening_factor=cross_attend_widening_factor,
        shape_for_attn=cross_attention_shape_for_attn, qk_channels=qk_channels,
        v_channels=v_channels, use_query_residual=use_query_residual,
        compute=compute)
    self.self_attends = [
        layers.SelfAttention(
            num_heads=num_self_attend_heads, dropout_prob=dropout_prob,
            qk_channels=qk_channels, v_channels=v_channels,
            widening_factor=self_attend_widening_factor, compute=compute)
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
    cross_attend = lambda z, inputs: self.cross_attend(
        z, inputs, is_training=is_training, attention_mask=attention_mask)
    z = batch_layout(rematerialised(cross_attend, self.remat)(z, inputs))
    for _ in range(self.num_blocks):
      for self_attend in self.self_attends:
        block = lambda z, self_attend=self_attend: self_attend(
            layers.residual_boundary(z, self.compute), is_training=is_training)
        z = batch_layout(rematerialised(block, self.remat)(z))
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
               name='basic_decoder', final_project=True, compute=layers.REFERENCE,
               remat='none', **position_encoding_kwargs):
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
    self.compute = compute
    self.remat = remat

  def decoder_query(self, batch_size, positions=None, inputs_without_pos=None):
    """Output-position queries.

    Args:
      batch_size: B.
      positions: optional [B, L] int indices of the output positions to decode
        (default: all ``output_index_dims``).
      inputs_without_pos: [B, T, C] preprocessed inputs, required when
        ``concat_preprocessed_input`` (those at ``positions`` are concatenated before
        the position encodings).

    Returns:
      [B, L, Cq] queries.
    """
    if self.output_pos_enc is None:
      raise ValueError("position_encoding_type='none': pass your own queries to __call__.")
    query = self.output_pos_enc(batch_size=batch_size, positions=positions)
    if self.concat_preprocessed_input:
      if inputs_without_pos is None:
        raise ValueError('concat_preprocessed_input=True needs inputs_without_pos.')
      if positions is not None:
        inputs_without_pos = jnp.take_along_axis(inputs_without_pos, positions[..., None],
                                                 axis=1)
      query = jnp.concatenate([inputs_without_pos, query], axis=-1)
    return query

  def __call__(self, query, z, *, is_training, query_mask=None):
    """[B, L, Cq] queries, [B, N, Z] latents, optional [B, L] mask -> [B, L, C]."""
    attention_mask = None
    if query_mask is not None:
      attention_mask = layers.cross_attention_mask(
          query_mask.astype(jnp.int32), jnp.ones(z.shape[:2], jnp.int32))
    cross_attend = layers.CrossAttention(
        dropout_prob=0.0, num_heads=self.num_heads, widening_factor=1, shape_for_attn='kv',
        qk_channels=self.qk_channels, v_channels=self.v_channels,
        use_query_residual=self.use_query_residual, compute=self.compute)
    block = lambda query, z: cross_attend(query, z, is_training=is_training,
                                          attention_mask=attention_mask)
    output = batch_layout(rematerialised(block, self.remat)(query, z))
    if self.final_project:
      output = layers.Linear(self.output_num_channels, w_init=self.output_w_init,
                             compute=self.compute, name='output')(output)
    return output


class ClassificationDecoder(hk.Module):
  """A ``BasicDecoder`` with one trainable query: [B, N, Z] latents -> [B, C]."""

  def __init__(self, num_classes, name='classification_decoder', **decoder_kwargs):
    super().__init__(name=name)
    self.decoder = BasicDecoder(output_index_dims=(1,), output_num_channels=num_classes,
                                **decoder_kwargs)

  def decoder_query(self, batch_size, positions=None, inputs_without_pos=None):
    """The one trainable query, [B, 1, C]."""
    del positions, inputs_without_pos
    return self.decoder.decoder_query(batch_size=batch_size)

  def __call__(self, query, z, *, is_training, query_mask=None):
    """[B, 1, C] query, [B, N, Z] latents -> [B, C]."""
    del query_mask
    return self.decoder(query, z, is_training=is_training)[:, 0, :]


class ClassificationHead(hk.Module):
  """Two-layer MLP on the decoded query: Linear(hidden), tanh, Linear(num_outputs).

  Applied to each decoded position alike, it is also the token classifier's head.
  """

  def __init__(self, num_outputs, hidden_size=768, dropout_prob=0.0,
               compute=layers.REFERENCE, name='classification_head'):
    super().__init__(name=name)
    self.num_outputs = num_outputs
    self.hidden_size = hidden_size
    self.dropout_prob = dropout_prob
    self.compute = compute

  def __call__(self, x, *, is_training, embedding_matrix=None):
    """[B, C] -> [B, num_outputs], or per position: [B, L, C] -> [B, L, num_outputs]."""
    del embedding_matrix
    dense = lambda size: layers.Linear(size, compute=self.compute)
    x = layers.dropout(x, self.dropout_prob, is_training)
    x = jnp.tanh(dense(self.hidden_size)(x))
    x = layers.dropout(x, self.dropout_prob, is_training)
    return dense(self.num_outputs)(x)


class Perceiver(hk.Module):
  """Perceiver IO, wired as the original's ``Perceiver`` (the paper's Figure 1).

  The input preprocessor embeds the inputs; the encoder cross-attends them into its
  latent array and processes the latents; the decoder's queries cross-attend to the
  processed latents; the output postprocessor maps the decoder's outputs to the task's
  (for the masked LM, logits from the tied byte embedding). The modules are built by the
  caller, so their parameters carry the original's top-level names; without a decoder
  the result is the processed latents.
  """

  def __init__(self, encoder, decoder=None, input_preprocessor=None,
               output_postprocessor=None, name='perceiver'):
    super().__init__(name=name)
    self.encoder = encoder
    self.decoder = decoder
    self.input_preprocessor = input_preprocessor
    self.output_postprocessor = output_postprocessor

  @hk.transparent
  def __call__(self, inputs, *, is_training, input_mask=None, query_positions=None,
               query_mask=None):
    """[B, T] inputs -> the postprocessed outputs (or [B, N, Z] latents, decoder None).

    ``query_positions`` [B, L] picks the decoder's queries (default: all of them);
    ``query_mask`` [B, L] marks the valid ones.
    """
    embedding_matrix, inputs_without_pos = None, None
    if self.input_preprocessor is not None:
      inputs, inputs_without_pos, embedding_matrix = self.input_preprocessor(inputs)
      inputs, inputs_without_pos = batch_layout(inputs), batch_layout(inputs_without_pos)
    batch_size = inputs.shape[0]
    # The queries of both cross-attends first, then the network, as the original orders
    # them (the order of parameter creation is part of the released names).
    encoder_query = batch_layout(self.encoder.latents(batch_size))
    decoder_query = None
    if self.decoder is not None:
      decoder_query = batch_layout(self.decoder.decoder_query(
          batch_size, positions=query_positions, inputs_without_pos=inputs_without_pos))
    z = self.encoder(inputs, encoder_query, is_training=is_training, input_mask=input_mask)
    if self.decoder is None:
      return z
    outputs = self.decoder(decoder_query, z, is_training=is_training, query_mask=query_mask)
    if self.output_postprocessor is not None:
      outputs = batch_layout(self.output_postprocessor(
          outputs, is_training=is_training, embedding_matrix=embedding_matrix))
    return outputs
