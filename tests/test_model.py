"""The Haiku model against facts: the released parameter list, hand-computed attention,
an independent numpy forward pass, masking and weight-sharing semantics."""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests import numpy_reference
from perceiver import configs
from perceiver.model import layers
from perceiver.model import modules as model
from perceiver import transform

def _shapes(transformed, length):
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  tree = jax.eval_shape(lambda i: transformed.init(jax.random.PRNGKey(0), i), ids)
  return {f'{m}/{n}': tuple(v.shape) for m, d in tree.items() for n, v in d.items()}


def _tiny_inputs(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  t = config.max_seq_len
  ids = rng.integers(6, 262, (batch, t)).astype(np.int32)
  mask = np.ones((batch, t), np.int32)
  mask[-1, t // 3:] = 0
  ids[mask == 0] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.fixture(scope='module')
def tiny():
  config = configs.tiny()
  mlm = transform.masked_lm(config)
  ids, mask = _tiny_inputs(config)
  params = jax.jit(mlm.init)(jax.random.PRNGKey(42), ids, mask)
  return config, mlm, params, ids, mask


def test_parameter_tree_is_the_released_models():
  reference = helpers.released_param_shapes()
  assert len(reference) == 457
  assert sum(math.prod(s) for s in reference.values()) == 201_108_230
  ours = _shapes(transform.masked_lm(configs.language_mlm()), 2048)
  assert ours == reference
  assert sum(math.prod(s) for s in ours.values()) == 201_108_230


def test_shipped_parameter_list_is_the_shared_reference():
  """tests/data holds ../shared's list of the released parameters unchanged."""
  shared = helpers.shared_path('reference', 'language_perceiver_io_bytes.params.txt')
  assert helpers.RELEASED_PARAMETERS.read_bytes() == shared.read_bytes()


def test_config_passes_the_colabs_keyword_arguments():
  config = configs.language_mlm()
  assert (config.vocab_size, config.d_model, config.max_seq_len) == (262, 768, 2048)
  assert config.encoder.to_dict() == dict(
      num_self_attends_per_block=26, num_blocks=1, z_index_dim=256, num_z_channels=1280,
      num_self_attend_heads=8, num_cross_attend_heads=8, qk_channels=256, v_channels=1280,
      use_query_residual=True, cross_attend_widening_factor=1, self_attend_widening_factor=1)
  assert config.decoder.to_dict() == dict(
      output_num_channels=1280, position_encoding_type='trainable', output_index_dims=2048,
      num_z_channels=1280, qk_channels=256, v_channels=768, num_heads=8, final_project=False,
      use_query_residual=False, trainable_position_encoding_kwargs=dict(num_channels=768))


def test_changing_a_kwarg_changes_the_model_as_in_the_original():
  config = configs.tiny()
  config.encoder.self_attend_widening_factor = 4   # MLP hidden = 4 x 48
  config.decoder.final_project = True               # adds basic_decoder/output
  config.decoder.output_num_channels = config.d_model
  shapes = _shapes(transform.masked_lm(config), 8)
  assert shapes['perceiver_encoder/~/self_attention/mlp/linear/w'] == (48, 192)
  assert shapes['basic_decoder/output/w'] == (32, 32)
  config.encoder.qk_channels = None   # qk defaults to the kv input's width (32) in cross-attend
  shapes = _shapes(transform.masked_lm(config), 8)
  assert shapes['perceiver_encoder/~/cross_attention/attention/linear/w'] == (48, 32)
  assert shapes['perceiver_encoder/~/self_attention/attention/linear/w'] == (48, 48)


def test_plusplus_has_the_papers_size():
  shapes = _shapes(transform.masked_lm(configs.language_mlm_plusplus()), 2048)
  total = sum(math.prod(s) for s in shapes.values())
  assert 'perceiver_encoder/~/self_attention_39/mlp/linear/w' in shapes
  assert shapes['perceiver_encoder/~/self_attention_39/mlp/linear/w'] == (1536, 1536)
  assert abs(total - 425e6) / 425e6 < 0.01, total


def test_attention_of_two_queries_and_two_keys_by_hand():
  q = jnp.array([[1.0, 0.0], [0.0, 2.0]]).reshape(1, 2, 1, 2)
  k = jnp.array([[1.0, 1.0], [2.0, 0.0]]).reshape(1, 2, 1, 2)
  v = jnp.array([[10.0], [20.0]]).reshape(1, 2, 1, 1)
  out = hk.transform(lambda: layers.attend(q, k, v)).apply({}, None)
  # Query 0: logits (1, 2)/sqrt(2); query 1: (2, 0)/sqrt(2).
  w0 = 1 / (1 + math.exp(1 / math.sqrt(2)))
  w1 = 1 / (1 + math.exp(-2 / math.sqrt(2)))
  expected = [[w0 * 10 + (1 - w0) * 20], [w1 * 10 + (1 - w1) * 20]]
  np.testing.assert_allclose(out[0], expected, rtol=1e-6)
  # Mask key 1 for query 0 and both keys for query 1.
  mask = jnp.array([[[1, 0], [0, 0]]])
  out = hk.transform(lambda: layers.attend(q, k, v, attention_mask=mask)).apply({}, None)
  np.testing.assert_allclose(out[0], [[10.0], [0.0]], rtol=1e-6)


def _random_params(params, seed=0):
  """``params``'s tree with every parameter drawn anew from a seeded normal: weights,
  embeddings and position tables with std 0.1, biases and layer-norm offsets with std
  0.5, layer-norm scales 1 + N(0, 0.5^2). At initialisation every bias and offset is 0
  and every scale 1, so a dropped bias or offset, a scale not applied, or one layer
  norm's parameters used in another's place would leave the logits as they are; here
  each changes them, as does a scale and offset swapped."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape)
    if name == 'scale':
      return (1 + 0.5 * noise).astype(leaf.dtype)
    std = 0.5 if name in ('b', 'bias', 'offset') else 0.1
    return (std * noise).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, params)


def test_logits_equal_an_independent_numpy_implementation(tiny):
  """The model (float32) against the numpy reference (float64) with random parameters,
  on a full row and a padded one."""
  config, mlm, params, ids, mask = tiny
  params = _random_params(params)
  logits = np.asarray(mlm.apply(params, None, ids, mask))
  for b in range(ids.shape[0]):
    expected = numpy_reference.masked_lm_logits(params, config, np.asarray(ids[b]),
                                                np.asarray(mask[b]))
    assert expected.std() > 0.1   # logits that differ, not a constant row
    np.testing.assert_allclose(logits[b], expected, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_jit_vmap_and_a_jit_over_a_mesh_give_the_eager_logits(tiny):
  _, mlm, params, ids, mask = tiny
  eager = mlm.apply(params, None, ids, mask)
  jitted = jax.jit(mlm.apply)(params, None, ids, mask)
  mapped = jax.vmap(lambda i, m: mlm.apply(params, None, i[None], m[None])[0])(ids, mask)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  on_mesh = jax.jit(lambda i, m: mlm.apply(params, None, i, m), in_shardings=(rows, rows),
                    out_shardings=rows)(ids, mask)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mapped, eager, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(on_mesh, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_appended_padding_leaves_real_positions_unchanged(tiny):
  config, mlm, params, ids, _ = tiny
  n = 20
  short = mlm.apply(params, None, ids[:1, :n], jnp.ones((1, n), jnp.int32))
  garbage = np.array(ids[:1])
  garbage[0, n:] = np.random.default_rng(3).integers(0, 262, config.max_seq_len - n)
  pad_mask = (np.arange(config.max_seq_len) < n).astype(np.int32)[None]
  padded = mlm.apply(params, None, jnp.asarray(garbage), jnp.asarray(pad_mask))
  np.testing.assert_allclose(padded[:, :n], short, rtol=1e-5, atol=1e-5)


def test_padded_decoder_queries_attend_to_nothing(tiny):
  """A masked query's attention output is zero, so its output is MLP(LN(0)) alone."""
  config, mlm, params, ids, mask = tiny
  logits = mlm.apply(params, None, ids, mask)
  pad = np.argwhere(np.asarray(mask) == 0)
  assert len(pad) > 1
  rows = np.asarray(logits)[pad[:, 0], pad[:, 1]]
  # Every padded row is the same vector: it depends on no input or position.
  np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), atol=1e-5)
  prefix = 'basic_decoder/cross_attention'
  ln = params[prefix + '/layer_norm_2']
  mlp_in = np.zeros(config.d_model) * ln['scale'] + ln['offset']  # LN(0) = offset
  hidden = numpy_reference._gelu(mlp_in @ params[prefix + '/mlp/linear']['w']
                                 + params[prefix + '/mlp/linear']['b'])
  out = hidden @ params[prefix + '/mlp/linear_1']['w'] + params[prefix + '/mlp/linear_1']['b']
  expected = out @ np.asarray(params['embed']['embeddings']).T + params['embedding_decoder']['bias']
  np.testing.assert_allclose(rows[0], expected, rtol=1e-4, atol=1e-4)


def test_blocks_share_self_attention_weights():
  config = configs.tiny()
  config.encoder.num_blocks = 2
  shared = transform.masked_lm(config)
  ids, mask = _tiny_inputs(config)
  params = jax.jit(shared.init)(jax.random.PRNGKey(0), ids, mask)
  assert set(params) == set(jax.eval_shape(transform.masked_lm(configs.tiny()).init,
                                           jax.random.PRNGKey(0), ids, mask))
  # Two blocks of (sa, sa_1) equal one block of four layers (sa, sa_1, sa, sa_1).
  unrolled_config = configs.tiny()
  unrolled_config.encoder.num_self_attends_per_block = 4
  unrolled = dict(params)
  for i, source in ((2, ''), (3, '_1')):
    for name, value in params.items():
      if name.startswith('perceiver_encoder/~/self_attention' + source + '/'):
        suffix = name[len('perceiver_encoder/~/self_attention' + source):]
        unrolled[f'perceiver_encoder/~/self_attention_{i}{suffix}'] = value
  expected = transform.masked_lm(unrolled_config).apply(unrolled, None, ids, mask)
  np.testing.assert_allclose(shared.apply(params, None, ids, mask), expected, rtol=1e-5,
                             atol=1e-5)


def test_dropout_applies_only_when_training(tiny):
  config, _, params, ids, mask = tiny
  config = config.copy_and_resolve_references()
  config.encoder.dropout_prob = 0.5
  mlm = transform.masked_lm(config)
  plain = transform.masked_lm(configs.tiny()).apply(params, None, ids, mask)
  np.testing.assert_allclose(mlm.apply(params, None, ids, mask), plain, rtol=1e-6)
  train_a = mlm.apply(params, jax.random.PRNGKey(1), ids, mask, is_training=True)
  train_b = mlm.apply(params, jax.random.PRNGKey(2), ids, mask, is_training=True)
  assert not np.allclose(train_a, plain, atol=1e-3)
  assert not np.allclose(train_a, train_b, atol=1e-3)


@pytest.mark.slow
def test_initialisers_follow_the_original():
  params = transform.masked_lm(configs.small()).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  # Position encodings: truncated normal, stddev 0.02 (truncated at 2 sigma).
  pos = np.asarray(params['trainable_position_encoding']['pos_embs'])
  assert np.abs(pos).max() <= 0.04 + 1e-6
  assert abs(pos.std() - 0.02 * 0.8796) < 0.001   # std of a 2-sigma truncated normal
  # Linear weights: VarianceScaling(1.0), fan-in, truncated normal -> var = 1 / fan_in.
  w = np.asarray(params['perceiver_encoder/~/self_attention/mlp/linear']['w'])
  assert abs(w.var() * w.shape[0] - 1.0) < 0.05
  assert not np.any(params['perceiver_encoder/~/self_attention/mlp/linear']['b'])
  # Embeddings: Haiku's default truncated normal with stddev 1.
  emb = np.asarray(params['embed']['embeddings'])
  assert abs(emb.std() - 0.8796) < 0.03 and np.abs(emb).max() <= 2.0 + 1e-6
  ln = params['perceiver_encoder/~/self_attention/layer_norm']
  assert np.all(ln['scale'] == 1) and not np.any(ln['offset'])
  assert not np.any(params['embedding_decoder']['bias'])


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(tiny):
  config, mlm, params, ids, mask = tiny
  cfg = config.copy_and_resolve_references()
  cfg.compute_dtype = 'bfloat16'
  low = transform.masked_lm(cfg)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(jax.eval_shape(
      low.init, jax.random.PRNGKey(0), ids, mask)))
  out = low.apply(params, None, ids, mask)
  ref = mlm.apply(params, None, ids, mask)
  assert out.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 2e-2, rel


@pytest.mark.slow
def test_inference_params_give_identical_bfloat16_logits(tiny):
  config = configs.tiny()
  config.compute_dtype = 'bfloat16'
  model = transform.masked_lm(config)
  ids = jnp.asarray(np.random.default_rng(1).integers(6, 262, (2, 40)), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids)
  cast = transform.inference_params(params, config)
  dtypes = {f'{m}/{n}': v.dtype for m, leaves in cast.items() for n, v in leaves.items()}
  assert {k for k, d in dtypes.items() if d == jnp.bfloat16} == {
      k for k in dtypes if k.endswith('/w')} and len(dtypes) == len(jax.tree.leaves(params))
  assert dtypes['embed/embeddings'] == jnp.float32
  np.testing.assert_array_equal(jax.jit(model.apply)(cast, None, ids, None),
                                jax.jit(model.apply)(params, None, ids, None))
  assert transform.inference_params(params, configs.tiny()) is params   # float32: as is


def test_decoding_chosen_positions_equals_the_full_decoder(tiny):
  _, mlm, params, ids, mask = tiny
  full = mlm.apply(params, None, ids, mask)
  positions = jnp.array([[0, 5, 7], [1, 2, 40]])
  part = mlm.apply(params, None, ids, mask, query_positions=positions)
  np.testing.assert_allclose(part, jnp.take_along_axis(full, positions[..., None], axis=1),
                             rtol=1e-5, atol=1e-5)


def test_classifier_and_encoder_share_the_trunk_names(tiny):
  config, _, params, ids, mask = tiny
  clf = transform.classifier(config, num_classes=3)
  clf_params = helpers.params_like(clf, ids, mask)   # its tree; values do not matter here
  trunk = {k for k in params if not k.startswith(('basic_decoder', 'embedding_decoder'))}
  assert trunk <= set(clf_params)
  assert {k for k in clf_params if k not in trunk} == {
      'classification_decoder/~/basic_decoder/~/trainable_position_encoding',
      'classification_decoder/~/basic_decoder/cross_attention/attention/linear',
      'classification_decoder/~/basic_decoder/cross_attention/attention/linear_1',
      'classification_decoder/~/basic_decoder/cross_attention/attention/linear_2',
      'classification_decoder/~/basic_decoder/cross_attention/attention/linear_3',
      'classification_decoder/~/basic_decoder/cross_attention/layer_norm',
      'classification_decoder/~/basic_decoder/cross_attention/layer_norm_1',
      'classification_decoder/~/basic_decoder/cross_attention/layer_norm_2',
      'classification_decoder/~/basic_decoder/cross_attention/mlp/linear',
      'classification_decoder/~/basic_decoder/cross_attention/mlp/linear_1',
      'classification_head/linear', 'classification_head/linear_1'}
  assert clf_params['classification_head/linear_1']['w'].shape == (config.d_model, 3)
  assert jax.jit(clf.apply)(clf_params, None, ids, mask).shape == (2, 3)
  latents = jax.jit(transform.encoder(config).apply)(params, None, ids, mask)
  assert latents.shape == (2, config.encoder.z_index_dim, config.encoder.num_z_channels)


def test_bad_inputs_and_configs_are_named():
  config = configs.tiny()
  mlm = transform.masked_lm(config)
  with pytest.raises(ValueError, match='exceeds max_seq_len=64'):
    mlm.init(jax.random.PRNGKey(0), jnp.zeros((1, 65), jnp.int32))
  with pytest.raises(ValueError, match=r'input_ids must be \[batch, seq\]'):
    mlm.init(jax.random.PRNGKey(0), jnp.zeros((65,), jnp.int32))
  config.decoder.output_index_dims = 10
  with pytest.raises(ValueError, match='decoder.output_index_dims'):
    transform.masked_lm(config)
  config = configs.tiny()
  config.decoder.trainable_position_encoding_kwargs.num_channels = 16
  with pytest.raises(ValueError, match='num_channels = 16'):
    transform.masked_lm(config)
  with pytest.raises(ValueError, match='num_z_channels'):
    hk.transform(lambda: model.PerceiverEncoder(num_z_channels=10, num_self_attend_heads=4)
                ).init(None)
  with pytest.raises(ValueError, match='unknown model preset'):
    configs.get('nope')
