"""Hugging Face interop: transformers' PerceiverForMaskedLM <-> this project's masked LM.

Tests marked by the ``hf`` fixture need the optional extra (``pip install '.[hf]'``:
torch and transformers) and are skipped, with that message, without it. The others
(safetensors with numpy, the tensor map, config refusals, the convert command from a
DeepMind pickle) need neither.

Logits are compared at real (unpadded) positions only: transformers does not mask padded
decoder queries, where the original (and this project) zeroes their attention output.
"""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from perceiver.params import params_file
from perceiver import configs
from perceiver import fill_mask
from perceiver.params import hf
from perceiver.params import hf_io
from perceiver.params import loading
from perceiver import transform
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SKIP = "the Hugging Face interop tests need the optional extra: pip install '.[hf]'"

# A tiny PerceiverForMaskedLM: 2 blocks of 2 shared self-attends, as the original's config.
TINY_HF = dict(num_latents=8, d_latents=48, d_model=32, num_blocks=2,
               num_self_attends_per_block=2, num_self_attention_heads=4,
               num_cross_attention_heads=4, qk_channels=16, v_channels=48,
               max_position_embeddings=64, layer_norm_eps=1e-5,
               attention_probs_dropout_prob=0.0)
TOLERANCE = 1e-5   # relative, at real positions


@pytest.fixture(scope='module')
def hf_libs():
  torch = pytest.importorskip('torch', reason=f'torch is not installed: {_SKIP}')
  transformers = pytest.importorskip('transformers',
                                     reason=f'transformers is not installed: {_SKIP}')
  return torch, transformers


def _tiny_exportable(num_blocks=2) -> 'configs.ml_collections.ConfigDict':
  """configs.tiny() with the text decoder transformers fixes (8 heads, qk 256)."""
  config = configs.tiny()
  config.encoder.num_blocks = num_blocks
  config.decoder.num_heads = hf.HF_DECODER_HEADS
  config.decoder.qk_channels = hf.HF_DECODER_QK_CHANNELS
  return config


def _init(config, seed=0):
  params = jax.jit(transform.masked_lm(config).init)(jax.random.PRNGKey(seed),
                                                     jnp.zeros((1, 8), jnp.int32))
  return jax.tree.map(np.asarray, params)


def _inputs(length=64, seed=0):
  """Two rows; the second padded after 20 bytes (padded ids are 0)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(6, 262, (2, length)).astype(np.int64)
  mask = np.ones((2, length), np.int64)
  mask[1, 20:] = 0
  ids[mask == 0] = 0
  return ids, mask


def _ours(params, config, ids, mask):
  logits = transform.masked_lm(config).apply(params, None, jnp.asarray(ids, jnp.int32),
                                             jnp.asarray(mask, jnp.int32))
  return np.asarray(logits)


def _theirs(torch, model, ids, mask):
  with torch.no_grad():
    out = model(inputs=torch.tensor(ids), attention_mask=torch.tensor(mask))
  return out.logits.numpy()[:, :ids.shape[1]]


def _relative(ours, theirs, mask):
  real = mask.astype(bool)
  return float(np.abs(ours - theirs)[real].max() / np.abs(theirs[real]).max())


def _random_hf_model(libs, hidden_act='gelu_new', seed=0, **overrides):
  """A tiny PerceiverForMaskedLM with weights at fan-in scale.

  transformers' own init (std 0.02) leaves activations so small that the GELU variants
  would be indistinguishable; at this scale the MLPs see O(1) inputs, as trained ones do.
  """
  torch, transformers = libs
  config = transformers.PerceiverConfig(**{**TINY_HF, 'hidden_act': hidden_act, **overrides})
  torch.manual_seed(seed)
  model = transformers.PerceiverForMaskedLM(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim == 2 and ('embeddings' in name or 'latents' in name):
        p.copy_(0.5 * noise)
      elif p.ndim == 2:
        p.copy_(noise / p.shape[1] ** 0.5)
      elif 'layernorm' in name and name.endswith('weight'):
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return model


@pytest.fixture(scope='module')
def hf_dirs(hf_libs, tmp_path_factory):
  """{hidden_act: (model, directory saved by save_pretrained)}."""
  out = {}
  for act in ('gelu_new', 'gelu'):
    model = _random_hf_model(hf_libs, act)
    directory = tmp_path_factory.mktemp(f'hf_{act}')
    model.save_pretrained(directory)
    out[act] = (model, directory)
  return out


# --------------------------------------------------------------------------------------
# Import: transformers -> Haiku.

@pytest.mark.slow
def test_import_matches_transformers_logits(hf_libs, hf_dirs):
  torch, _ = hf_libs
  model, directory = hf_dirs['gelu_new']
  assert (directory / hf_io.SAFETENSORS_FILE).exists()
  params, config = hf_io.load_hf_checkpoint(directory)
  assert config.encoder.num_blocks == 2 and config.max_seq_len == 64
  ids, mask = _inputs()
  rel = _relative(_ours(params, config, ids, mask), _theirs(torch, model, ids, mask), mask)
  print(f'\nimport, hidden_act=gelu_new: max relative logit difference {rel:.2e}')
  assert rel < TOLERANCE


def test_import_from_pytorch_bin_equals_safetensors(hf_libs, hf_dirs, tmp_path):
  torch, _ = hf_libs
  model, directory = hf_dirs['gelu_new']
  (tmp_path / hf_io.CONFIG_FILE).write_text((directory / hf_io.CONFIG_FILE).read_text())
  torch.save(model.state_dict(), tmp_path / hf_io.BIN_FILE)
  from_bin, _ = hf_io.load_hf_checkpoint(tmp_path)
  from_safetensors, _ = hf_io.load_hf_checkpoint(directory)
  assert jax.tree.all(jax.tree.map(np.array_equal, from_bin, from_safetensors))


def test_bin_is_loaded_weights_only(hf_libs, tmp_path):
  torch, _ = hf_libs
  marker = tmp_path / 'ran'
  (tmp_path / hf_io.CONFIG_FILE).write_text(json.dumps({**TINY_HF, 'hidden_act': 'gelu_new'}))
  torch.save({'x': _RunsCommand(f'touch {marker}')}, tmp_path / hf_io.BIN_FILE)
  with pytest.raises(params_file.CheckpointError, match=r'pytorch_model\.bin.*weights-only'):
    hf_io.load_hf_checkpoint(tmp_path)
  assert not marker.exists()


class _RunsCommand:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_released_model_tensor_names_and_shapes_match_transformers(hf_libs):
  """The map covers transformers' full-size model (built on the meta device: no memory)."""
  torch, transformers = hf_libs
  released = transformers.PerceiverConfig(qk_channels=256, v_channels=1280)
  with torch.device('meta'):
    model = transformers.PerceiverForMaskedLM(released)
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  config, notes = hf.config_from_hf(released.to_dict())
  assert theirs == hf.expected_hf_shapes(config)
  assert len(theirs) == 457
  assert any('hidden_act="gelu"' in n for n in notes)
  reference = set(helpers.released_param_shapes())
  ours = params_file.expected_shapes(transform.masked_lm(config), config)
  assert {f'{m}/{n}' for m, d in ours.items() for n in d} == reference


# --------------------------------------------------------------------------------------
# Export: Haiku -> transformers.

@pytest.mark.slow
def test_export_loads_in_transformers_with_equal_logits(hf_libs, tmp_path):
  torch, transformers = hf_libs
  config = _tiny_exportable()
  params = _init(config, seed=3)
  notes = hf_io.export_hf(params, config, tmp_path / 'exported')
  assert notes == []
  assert sorted(os.listdir(tmp_path / 'exported')) == ['config.json', 'model.safetensors']
  model, info = transformers.PerceiverForMaskedLM.from_pretrained(
      tmp_path / 'exported', output_loading_info=True)
  model.eval()
  assert not any(info.get(k) for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
  assert model.config.hidden_act == 'gelu_new' and model.config.layer_norm_eps == 1e-5
  ids, mask = _inputs()
  rel = _relative(_ours(params, config, ids, mask), _theirs(torch, model, ids, mask), mask)
  print(f'\nexport: max relative logit difference {rel:.2e}')
  assert rel < TOLERANCE
  # And back: the same parameters, bit for bit.
  again, again_config = hf_io.load_hf_checkpoint(tmp_path / 'exported')
  assert jax.tree.all(jax.tree.map(np.array_equal, again, params))
  assert again_config.encoder.num_blocks == 2


# --------------------------------------------------------------------------------------
# Measured differences of transformers' port (printed for the record; run with -s).

@pytest.mark.slow
def test_measured_differences_gelu_eps_and_padded_rows(hf_libs, hf_dirs):
  torch, transformers = hf_libs
  ids, mask = _inputs()
  rel, pad_diff = {}, {}
  for act, (model, directory) in hf_dirs.items():
    params, config = hf_io.load_hf_checkpoint(directory)
    ours = _ours(params, config, ids, mask)
    theirs = _theirs(torch, model, ids, mask)
    rel[act] = _relative(ours, theirs, mask)
    padded = ~mask.astype(bool)
    pad_diff[act] = float(np.abs(ours - theirs)[padded].max())
  print(f'\nrelative logit difference vs transformers: gelu_new {rel["gelu_new"]:.2e}, '
        f'gelu (exact erf) {rel["gelu"]:.2e}')
  assert rel['gelu_new'] < TOLERANCE
  assert 2e-5 < rel['gelu'] < 2e-3
  # layer_norm_eps is not read by transformers' Perceiver: 1e-12 computes the same.
  model, directory = hf_dirs['gelu_new']
  eps12 = transformers.PerceiverForMaskedLM.from_pretrained(directory,
                                                            layer_norm_eps=1e-12).eval()
  eps_diff = float(np.abs(_theirs(torch, eps12, ids, mask) -
                          _theirs(torch, model, ids, mask)).max())
  print(f'layer_norm_eps 1e-12 vs 1e-5 in transformers: max |logit difference| {eps_diff}')
  assert eps_diff == 0.0
  # Padded query rows: transformers decodes them as real positions, we zero their attention.
  print(f'padded positions: max |logit difference| {max(pad_diff.values()):.3g} '
        '(not compared)')
  assert all(diff > 1e-2 for diff in pad_diff.values()), pad_diff


# --------------------------------------------------------------------------------------
# Errors that name the tensor or the field (no torch needed).

def test_missing_extra_and_misshaped_tensors_are_named():
  config = _tiny_exportable(num_blocks=1)
  tensors = hf.params_to_hf(_init(config), config)
  del tensors['perceiver.encoder.self_attends.1.mlp.dense2.bias']
  tensors['perceiver.encoder.self_attends.2.mlp.dense2.bias'] = np.zeros(48, np.float32)
  tensors['perceiver.decoder.decoding_cross_attention.attention.self.query.weight'] = (
      np.zeros((32, 256), np.float32))   # transposed: [in, out]
  with pytest.raises(params_file.CheckpointError) as info:
    hf.hf_to_params(tensors, config, source='model.safetensors')
  message = str(info.value)
  assert 'model.safetensors' in message
  assert 'missing 1: perceiver.encoder.self_attends.1.mlp.dense2.bias' in message
  assert 'unexpected 1: perceiver.encoder.self_attends.2.mlp.dense2.bias' in message
  assert ('mis-shaped 1: perceiver.decoder.decoding_cross_attention.attention.self.query.'
          'weight [32, 256] (expected [256, 32])') in message


def test_export_refuses_missing_params_and_names_them(tmp_path):
  config = _tiny_exportable()
  params = _init(config)
  del params['embedding_decoder']
  with pytest.raises(params_file.CheckpointError, match='missing 1: embedding_decoder/bias'):
    hf_io.export_hf(params, config, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('field,value', [
    ('decoder.num_heads', 4), ('decoder.qk_channels', 128), ('decoder.v_channels', 48),
    ('decoder.final_project', True), ('decoder.use_query_residual', True),
    ('decoder.output_index_dims', 128)])
def test_export_refuses_configs_transformers_cannot_express(field, value, tmp_path):
  config = _tiny_exportable()
  section, key = field.split('.')
  config[section][key] = value
  if key == 'final_project':
    config.decoder.output_num_channels = config.d_model
  with pytest.raises(hf.UnsupportedConfigError, match=field.replace('.', r'\.')):
    hf_io.export_hf({}, config, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_export_refuses_the_tiny_preset_naming_the_field(tmp_path):
  with pytest.raises(hf.UnsupportedConfigError, match=r'decoder\.num_heads=4'):
    hf_io.export_hf({}, configs.tiny(), tmp_path / 'out')


def test_export_does_not_clobber_without_overwrite(tmp_path):
  config = _tiny_exportable(num_blocks=1)
  params = _init(config)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not empty'):
    hf_io.export_hf(params, config, out)
  assert (out / 'keep.txt').read_text() == 'mine'
  hf_io.export_hf(params, config, out, overwrite=True)
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  assert [p.name for p in tmp_path.iterdir()] == ['out']   # no temporaries left


@pytest.mark.parametrize('field,value,match', [
    ('hidden_act', 'relu', "hidden_act='relu'"),
    ('architectures', ['PerceiverForSequenceClassification'], 'architectures='),
    ('model_type', 'bert', "model_type='bert'"),
    ('num_latents', 0, 'num_latents=0'),
    ('cross_attention_shape_for_attention', 'x', 'cross_attention_shape_for_attention'),
    ('d_model', 36, 'd_model=36')])
def test_import_refuses_configs_naming_the_field(field, value, match):
  hf_config = {**TINY_HF, 'hidden_act': 'gelu_new', field: value}
  with pytest.raises(hf.UnsupportedConfigError, match=match):
    hf.config_from_hf(hf_config, source='some/config.json')


def test_import_notes_exact_gelu_and_keeps_the_originals_function():
  _, notes = hf.config_from_hf({**TINY_HF, 'hidden_act': 'gelu'})
  assert len(notes) == 1 and 'tanh approximation' in notes[0]
  _, notes = hf.config_from_hf({**TINY_HF, 'hidden_act': 'gelu_new'})
  assert notes == []


def test_config_round_trips_through_hf_config():
  config = _tiny_exportable()
  hf_config, _ = hf.hf_config_from(config)
  back, _ = hf.config_from_hf(hf_config)
  for key in ('vocab_size', 'd_model', 'max_seq_len'):
    assert back[key] == config[key]
  for key, value in config.encoder.items():
    assert back.encoder[key] == value, key
  for key in ('num_heads', 'qk_channels', 'v_channels', 'output_index_dims', 'final_project',
              'use_query_residual'):
    assert back.decoder[key] == config.decoder[key], key


def test_tensor_map_is_one_to_one_over_the_released_tree():
  pairs = hf.tensor_pairs(configs.language_mlm())
  reference = set(helpers.released_param_shapes())
  assert len(pairs) == len(reference) == 457
  assert {f'{p.module}/{p.name}' for p in pairs} == reference
  assert len({p.hf for p in pairs}) == 457


# --------------------------------------------------------------------------------------
# Safetensors with numpy.

def test_safetensors_round_trip_all_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      'f32': rng.normal(size=(3, 5)).astype(np.float32),
      'f16': rng.normal(size=(4,)).astype(np.float16),
      'f64': rng.normal(size=(2, 2)).astype(np.float64),
      'i64': np.arange(6, dtype=np.int64).reshape(2, 3),
      'i32': np.arange(5, dtype=np.int32),
      'u8': np.arange(7, dtype=np.uint8),
      'flag': np.array([True, False]),
      'scalar': np.float32(2.5),
      'empty': np.zeros((0, 3), np.float32),
      'big_endian': np.arange(3, dtype='>f4'),
  }
  bf16 = rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16)
  path = hf_io.write_safetensors(tmp_path / 'x.safetensors', {**tensors, 'bf16': bf16},
                              {'format': 'pt'})
  raw = open(path, 'rb').read()
  header_len = int.from_bytes(raw[:8], 'little')
  assert header_len % 8 == 0
  loaded, metadata = hf_io.read_safetensors(path)
  assert metadata == {'format': 'pt'}
  for name, value in tensors.items():
    assert loaded[name].shape == np.shape(value), name
    np.testing.assert_array_equal(loaded[name], value)
  assert loaded['bf16'].dtype == np.float32
  np.testing.assert_array_equal(loaded['bf16'], bf16.astype(np.float32))


def test_safetensors_agree_with_the_reference_library(tmp_path):
  from safetensors import numpy as safetensors_numpy   # a core dependency
  rng = np.random.default_rng(1)
  tensors = {'a': rng.normal(size=(3, 4)).astype(np.float32),
             'b': np.arange(5, dtype=np.int64), 'c': rng.normal(size=7).astype(np.float16)}
  hf_io.write_safetensors(tmp_path / 'ours.safetensors', tensors)
  theirs = safetensors_numpy.load_file(str(tmp_path / 'ours.safetensors'))
  safetensors_numpy.save_file(tensors, str(tmp_path / 'theirs.safetensors'))
  ours, _ = hf_io.read_safetensors(tmp_path / 'theirs.safetensors')
  for name, value in tensors.items():
    np.testing.assert_array_equal(theirs[name], value)
    np.testing.assert_array_equal(ours[name], value)


def _corrupt(path, offset, data):
  raw = bytearray(open(path, 'rb').read())
  raw[offset:offset + len(data)] = data
  open(path, 'wb').write(bytes(raw))


def test_corrupt_safetensors_errors_name_the_file(tmp_path):
  good = tmp_path / 'good.safetensors'
  hf_io.write_safetensors(good, {'a': np.ones((4, 4), np.float32), 'b': np.zeros(3, np.int32)})
  raw = open(good, 'rb').read()

  bad = tmp_path / 'huge_header.safetensors'
  bad.write_bytes((10**12).to_bytes(8, 'little') + raw[8:])
  with pytest.raises(params_file.CheckpointError,
                     match=r'huge_header\.safetensors: .*header too large'):
    hf_io.read_safetensors(bad)

  bad = tmp_path / 'not_json.safetensors'
  bad.write_bytes(raw[:8] + b'#' + raw[9:])
  with pytest.raises(params_file.CheckpointError,
                     match=r'not_json\.safetensors: .*invalid JSON in header'):
    hf_io.read_safetensors(bad)

  bad = tmp_path / 'truncated.safetensors'
  bad.write_bytes(raw[:-4])
  with pytest.raises(params_file.CheckpointError,
                     match=r'truncated\.safetensors: .*file not fully covered'):
    hf_io.read_safetensors(bad)

  bad = tmp_path / 'short.safetensors'
  bad.write_bytes(raw[:5])
  with pytest.raises(params_file.CheckpointError, match=r'short\.safetensors: .*too small'):
    hf_io.read_safetensors(bad)

  header_len = int.from_bytes(raw[:8], 'little')
  header = json.loads(raw[8:8 + header_len])
  header['a']['data_offsets'] = [0, 60]   # 64 bytes of data declared as 60
  encoded = json.dumps(header).encode()
  bad = tmp_path / 'wrong_size.safetensors'
  bad.write_bytes(len(encoded).to_bytes(8, 'little') + encoded + raw[8 + header_len:])
  with pytest.raises(params_file.CheckpointError,
                     match=r'wrong_size\.safetensors: .*invalid shape, data type, or offset'):
    hf_io.read_safetensors(bad)


@pytest.mark.slow
def test_safetensors_checkpoint_loads_without_torch(tmp_path):
  """Import from model.safetensors with torch and transformers made unimportable; without
  the safetensors package the error says what to install."""
  config = _tiny_exportable(num_blocks=1)
  params = _init(config)
  hf_io.export_hf(params, config, tmp_path / 'exported')
  params_file.save(tmp_path / 'expected.npz', params, config)
  exported = str(tmp_path / 'exported')
  script = (
      "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
      'import jax, numpy as np\n'
      'from perceiver.params import params_file, hf_io\n'
      f'params, config = hf_io.load_hf_checkpoint({exported!r})\n'
      f'want, _, _ = params_file.load({str(tmp_path / "expected.npz")!r})\n'
      'assert jax.tree.all(jax.tree.map(np.array_equal, params, want))\n'
      'try:\n'
      '  hf_io.read_torch_bin("pytorch_model.bin")\n'
      'except params_file.CheckpointError as e:\n'
      "  assert \"pip install '.[hf]'\" in str(e), e\n"
      "sys.modules['safetensors'] = None\n"
      'try:\n'
      f'  hf_io.load_hf_checkpoint({exported!r})\n'
      'except params_file.CheckpointError as e:\n'
      "  assert 'needs the safetensors package' in str(e), e\n"
      "print('ok')\n")
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'


# --------------------------------------------------------------------------------------
# load_any, fill_mask and the convert command.

def test_load_any_reads_hf_directories_and_weights_files(hf_libs, hf_dirs, tmp_path):
  torch, _ = hf_libs
  model, directory = hf_dirs['gelu_new']
  params, config, metadata = loading.load_any(directory)
  assert metadata['source'] == 'huggingface'
  from_file, _, _ = loading.load_any(directory / hf_io.SAFETENSORS_FILE)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, from_file))
  (tmp_path / hf_io.CONFIG_FILE).write_text((directory / hf_io.CONFIG_FILE).read_text())
  torch.save(model.state_dict(), tmp_path / hf_io.BIN_FILE)   # a zip, like our own format
  from_bin, _, _ = loading.load_any(tmp_path / hf_io.BIN_FILE)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, from_bin))
  _, per_span, _ = fill_mask.fill(params, config, b'hello world', [(6, 11)])
  assert per_span[0].shape == (5,)


def _convert(*args):
  return subprocess.run([sys.executable, '-m', 'perceiver.convert', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_convert_command_from_hf_and_back(hf_libs, hf_dirs, tmp_path):
  torch, transformers = hf_libs
  model, directory = hf_dirs['gelu']
  result = _convert('--from=hf', f'--src={directory}', f'--dst={tmp_path / "p.npz"}')
  assert result.returncode == 0, result.stderr
  assert '73 tensors' in result.stdout and 'hidden_act="gelu"' in result.stdout
  result = _convert('--from=project', f'--src={tmp_path / "p.npz"}', '--to=hf',
                    f'--dst={tmp_path / "hf"}')
  assert result.returncode == 0, result.stderr
  exported = transformers.PerceiverForMaskedLM.from_pretrained(tmp_path / 'hf').eval()
  assert exported.config.hidden_act == 'gelu_new'
  # The exported model computes the original's function: it equals ours, and differs
  # from the erf-GELU source model as measured above.
  params, config, _ = params_file.load(tmp_path / 'p.npz')
  ids, mask = _inputs()
  ours = _ours(params, config, ids, mask)
  assert _relative(ours, _theirs(torch, exported, ids, mask), mask) < TOLERANCE
  assert _relative(ours, _theirs(torch, model, ids, mask), mask) > 2e-5


@pytest.mark.slow
def test_convert_command_from_deepmind_pickle(tmp_path):
  config = _tiny_exportable(num_blocks=1)
  params = _init(config, seed=5)
  with open(tmp_path / 'tiny.pickle', 'wb') as f:
    pickle.dump({m: dict(d) for m, d in params.items()}, f)
  (tmp_path / 'config.json').write_text(json.dumps(config.to_dict()))
  result = _convert('--from=deepmind', f'--src={tmp_path / "tiny.pickle"}',
                    f'--config={tmp_path / "config.json"}', '--to=hf',
                    f'--dst={tmp_path / "hf"}')
  assert result.returncode == 0, result.stderr
  loaded, _ = hf_io.load_hf_checkpoint(tmp_path / 'hf')
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
  # Errors name the flag or the field; nothing is clobbered.
  result = _convert('--from=deepmind', f'--src={tmp_path / "tiny.pickle"}',
                    f'--config={tmp_path / "config.json"}', '--to=hf',
                    f'--dst={tmp_path / "hf"}')
  assert result.returncode == 1 and '--dst=' in result.stderr and '--overwrite' in result.stderr
  result = _convert('--from=deepmind', f'--src={tmp_path / "tiny.pickle"}', '--config=tiny',
                    '--to=hf', f'--dst={tmp_path / "hf2"}')
  assert result.returncode == 1
  assert 'decoder.num_heads=4' in result.stderr   # the tiny preset's decoder: 4 heads
  assert not (tmp_path / 'hf2').exists()
