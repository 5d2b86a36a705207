"""Model configurations as plain data (``ml_collections.ConfigDict``).

``encoder`` and ``decoder`` hold the keyword arguments of the original
``PerceiverEncoder`` and ``BasicDecoder``, exactly as DeepMind's masked language
modelling colab passes them; changing one changes the model as that keyword changes
the original. The remaining fields are this project's:

- ``classifier``: the sequence-classification decoder (one trainable query) and its
  2-layer tanh MLP head, used by ``perceiver.transform.classifier`` (GLUE).
- ``compute_dtype``: 'float32' (the original's arithmetic) or 'bfloat16' (bfloat16 matmul
  inputs, float32 accumulation, float32 parameters, norms, softmax and residuals).
- ``kernels``: 'auto' (the default: XLA:CPU's kernels where the program is lowered for
  the CPU, the original's formulas elsewhere), 'reference' or 'xla_cpu'; see
  ``perceiver.model.layers``. It changes speed, never parameters, and values only by float
  rounding.
- ``remat``: rematerialisation of each attention block in the backward pass, a name in
  ``perceiver.model.modules.REMAT_POLICIES``: 'none' (the default: every activation kept),
  'block' (only each block's inputs kept, the block recomputed) or 'block_save_dots'
  (the products with weights kept too). It trades memory for time, never changes a
  parameter, and values only by float rounding.
"""

from __future__ import annotations

import ml_collections

from perceiver.model import tokenizer


def language(d_model, d_latents, num_latents, num_self_attends, max_seq_len, qk_channels,
             num_heads) -> ml_collections.ConfigDict:
  """A language Perceiver IO of the released model's structure with other widths/depth.

  The tied decoder needs its queries (and so its output) ``d_model`` wide; the other
  widths follow the released configuration's pattern (v = latent width in the encoder,
  d_model in the decoder).
  """
  return ml_collections.ConfigDict(dict(
      vocab_size=tokenizer.VOCAB_SIZE,
      d_model=d_model,
      max_seq_len=max_seq_len,
      encoder=dict(
          num_self_attends_per_block=num_self_attends,
          num_blocks=1,
          z_index_dim=num_latents,
          num_z_channels=d_latents,
          num_self_attend_heads=num_heads,
          num_cross_attend_heads=num_heads,
          qk_channels=qk_channels,
          v_channels=d_latents,
          use_query_residual=True,
          cross_attend_widening_factor=1,
          self_attend_widening_factor=1),
      decoder=dict(
          output_num_channels=d_latents,
          position_encoding_type='trainable',
          output_index_dims=max_seq_len,
          num_z_channels=d_latents,
          qk_channels=qk_channels,
          v_channels=d_model,
          num_heads=num_heads,
          final_project=False,
          use_query_residual=False,
          trainable_position_encoding_kwargs=dict(num_channels=d_model)),
      classifier=dict(
          # The paper's single-task GLUE model: the MLM decoder replaced by one trainable
          # query attending to the latents (same widths as the MLM decoder), then a
          # 2-layer MLP (hidden d_model, tanh). Chosen here to mirror the MLM decoder.
          decoder=dict(
              position_encoding_type='trainable',
              qk_channels=qk_channels,
              v_channels=d_model,
              num_heads=num_heads,
              final_project=False,
              use_query_residual=False,
              trainable_position_encoding_kwargs=dict(num_channels=d_model)),
          head_hidden_size=d_model,
          head_dropout_prob=0.0),
      compute_dtype='float32',
      kernels='auto',
      remat='none',
  ))


def language_mlm() -> ml_collections.ConfigDict:
  """DeepMind's released model: the paper's 201M-parameter 'Perceiver IO' on UTF-8 bytes.

  2048 bytes of d_model 768 -> 256 latents of 1280 channels, 26 latent self-attends.
  This is the configuration of ``language_perceiver_io_bytes.pickle``.
  """
  return language(d_model=768, d_latents=1280, num_latents=256, num_self_attends=26,
                   max_seq_len=2048, qk_channels=8 * 32, num_heads=8)


def language_mlm_plusplus() -> ml_collections.ConfigDict:
  """The paper's larger 'Perceiver IO++' (GLUE 81.8): 40 latent self-attends of 1536 channels.

  The paper gives its depth (40), latent width (1536) and size (425M); the other widths
  (256 latents, qk 256, 8 heads, d_model 768) are taken from the released model, which
  gives 425M parameters (``count_params`` in the tests). No checkpoint was released.
  """
  return language(d_model=768, d_latents=1536, num_latents=256, num_self_attends=40,
                   max_seq_len=2048, qk_channels=8 * 32, num_heads=8)


def tiny(max_seq_len=64) -> ml_collections.ConfigDict:
  """A small model of the same structure, for tests and smoke runs on a CPU."""
  return language(d_model=32, d_latents=48, num_latents=8, num_self_attends=2,
                   max_seq_len=max_seq_len, qk_channels=16, num_heads=4)


def small(max_seq_len=512) -> ml_collections.ConfigDict:
  """A ~10M-parameter model for short CPU experiments."""
  return language(d_model=256, d_latents=384, num_latents=64, num_self_attends=6,
                   max_seq_len=max_seq_len, qk_channels=128, num_heads=8)


def cpu_sized(max_seq_len=64) -> ml_collections.ConfigDict:
  """The model of the CPU training presets (``smoke``, ``cpu``): bytes in 64 channels,
  32 latents of 128 channels, 2 latent self-attends, 4 heads (325k parameters at 64
  bytes). It learns to use context within minutes on a laptop CPU (train/LEARNING.md)."""
  return language(d_model=64, d_latents=128, num_latents=32, num_self_attends=2,
                  max_seq_len=max_seq_len, qk_channels=64, num_heads=4)


POSITION_INITS = ('truncated_normal', 'sinusoid')


def with_position_init(config, init: str = 'truncated_normal', scale: float = 0.02):
  """``config`` with the initialisation of its three learned position tables set
  (initialisation only: no parameter name or shape changes).

  The tables are the inputs' positions (``input_position_init[_scale]``, this project's
  fields: the original's colab builds that table with the default), the latents
  (the encoder's ``z_pos_enc_init_scale``, the original's keyword argument, and
  ``z_pos_enc_init``) and the decoder's queries (its
  ``trainable_position_encoding_kwargs``: ``init_scale``, the original's, and ``init``).
  ``init``: 'truncated_normal' with stddev ``scale`` (the original's, at 0.02) or
  'sinusoid', ``scale`` x sines and cosines of the position
  (``perceiver.model.position_encoding.sinusoid_init``). A config without these fields gets
  the original's initialisation.
  """
  if init not in POSITION_INITS:
    raise ValueError(f'position init must be one of {", ".join(POSITION_INITS)}; '
                     f'got {init!r}')
  config.input_position_init = init
  config.input_position_init_scale = float(scale)
  config.encoder.z_pos_enc_init = init
  config.encoder.z_pos_enc_init_scale = float(scale)
  config.decoder.trainable_position_encoding_kwargs.init = init
  config.decoder.trainable_position_encoding_kwargs.init_scale = float(scale)
  return config


PRESETS = {
    'language_mlm': language_mlm,
    'language_mlm_plusplus': language_mlm_plusplus,
    'small': small,
    'tiny': tiny,
}


def get(name: str) -> ml_collections.ConfigDict:
  """A preset by name; the error lists the known ones."""
  return from_presets(PRESETS, name, 'unknown model preset {name!r}')


def from_presets(presets, name: str, unknown: str) -> ml_collections.ConfigDict:
  """``presets[name]()``; else a ValueError: ``unknown`` (formatted with ``name``), then
  the known names. Shared by the model, training and GLUE config files."""
  if name not in presets:
    raise ValueError(unknown.format(name=name) + f'; known: {", ".join(sorted(presets))}')
  return presets[name]()


def validate(config) -> None:
  """Raises ValueError naming the field when a config cannot build a working model."""
  dec = config.decoder
  if dec.get('position_encoding_type', 'trainable') == 'trainable':
    rows = dec.output_index_dims
    if not isinstance(rows, int) or rows < config.max_seq_len:
      raise ValueError(f'decoder.output_index_dims ({rows!r}) must be an int >= max_seq_len '
                       f'({config.max_seq_len}): one query per input position.')
  if dec.get('final_project', True):
    width, source = dec.output_num_channels, 'decoder.output_num_channels'
  else:
    width = dec.trainable_position_encoding_kwargs.num_channels
    source = 'decoder.trainable_position_encoding_kwargs.num_channels'
    if dec.get('concat_preprocessed_input', False):
      width, source = width + config.d_model, source + ' + d_model'
  if width != config.d_model:
    raise ValueError(f'the decoder outputs {source} = {width} channels, but the tied '
                     f'embedding decoder needs d_model = {config.d_model}.')
  _check_heads(config)
  if config.compute_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got "
                     f'{config.compute_dtype!r}')
  if config.get('kernels', 'auto') not in KERNELS:
    raise ValueError(f'kernels must be one of {", ".join(KERNELS)}; got {config.kernels!r}')
  # Imported here: the policies are JAX's, and this module stays light without them.
  from perceiver.model import modules  # pylint: disable=import-outside-toplevel
  if config.get('remat', 'none') not in modules.REMAT_POLICIES:
    raise ValueError(f'remat must be one of {", ".join(modules.REMAT_POLICIES)}; got '
                     f'{config.remat!r}')


def _check_heads(config) -> None:
  """Every attention's query/key and value widths must split evenly over its heads (the
  original's rule, checked here before anything is traced, naming the fields)."""
  enc, dec = config.encoder, config.decoder
  latents = enc.num_z_channels
  queries = dec.get('trainable_position_encoding_kwargs', {}).get('num_channels')
  attentions = [('encoder.num_self_attend_heads', enc.num_self_attend_heads, 'encoder', latents),
                ('encoder.num_cross_attend_heads', enc.num_cross_attend_heads, 'encoder',
                 latents),
                ('decoder.num_heads', dec.get('num_heads', 1), 'decoder', queries)]
  for heads_field, heads, block, default in attentions:
    if not isinstance(heads, int) or heads < 1:
      raise ValueError(f'{heads_field} ({heads!r}) must be an integer >= 1.')
    qk = config[block].get('qk_channels') or default
    widths = [(f'{block}.qk_channels' if config[block].get('qk_channels') else
               f'{block}\'s query width', qk),
              (f'{block}.v_channels', config[block].get('v_channels') or qk)]
    if heads_field != 'decoder.num_heads':
      widths.insert(0, ('encoder.num_z_channels', latents))
    for field, width in widths:
      if width is not None and width % heads:
        raise ValueError(f'{field} ({width}) must be divisible by {heads_field} ({heads}).')


# Fields that choose how the model computes, not what it computes: a run may change them
# on resume, and a checkpoint's value is only a default.
COMPUTE_FIELDS = ('compute_dtype', 'kernels', 'remat')
KERNELS = ('auto', 'reference', 'xla_cpu')


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A model config read from an older checkpoint, in today's fields.

  Checkpoints written before ``kernels`` existed carry ``fusion_barrier`` ('auto', 'on'
  or 'off'), which only ever chose XLA:CPU speed work: it becomes ``kernels='auto'``.
  Checkpoints written before ``remat`` existed trained without it: ``remat='none'``.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if 'fusion_barrier' in config:
    del config['fusion_barrier']
  if 'kernels' not in config:
    config.kernels = 'auto'
  if 'remat' not in config:
    config.remat = 'none'
  return config
