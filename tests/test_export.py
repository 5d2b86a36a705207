"""Deployable programs: ``perceiver.deploy.export`` writes, ``perceiver_load`` runs without this code.

The loaded artifact's outputs are held to the live model's (jitted ``apply``, float32),
in a process where ``haiku`` and ``perceiver`` cannot be imported; the program is
checked to be the original's formulation on GPUs and TPUs; the ONNX route (our
checkpoint -> Hugging Face -> ``torch.onnx.export`` -> onnxruntime) is held to our logits
where the ``hf`` extra is installed.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import lowering
from perceiver.params import params_file
from perceiver import configs
from perceiver.command import errors
from perceiver.deploy import export
from perceiver.params import hf
from perceiver.model import layers
from perceiver.deploy import onnx as onnx_route
from perceiver import transform
from tests import helpers

import perceiver_load

ROOT = pathlib.Path(__file__).resolve().parents[1]
_ONNX_SKIP = ("the ONNX route needs the optional extra: pip install '.[hf]' (torch, "
              'transformers, onnx, onnxruntime)')


def _relative(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _inputs(batch, length=64, seed=0):
  """Random bytes; row 1 (when there is one) padded after 20 bytes."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(6, 262, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  if batch > 1:
    mask[1, 20:] = 0
    ids[1, 20:] = 0
  return ids, mask


def _init(model, seed):
  """Random parameters of the model's tree (``helpers.params_like``: running ``init``
  would compile it, and the tests need only some weights, not the initialiser's)."""
  return helpers.params_like(model, jnp.zeros((1, 8), jnp.int32), seed=seed, scale=0.3)


@pytest.fixture(scope='module')
def mlm(tmp_path_factory):
  """A tiny masked LM's checkpoint and its float32 export (in a module-wide directory)."""
  root = tmp_path_factory.mktemp('mlm')
  config = configs.tiny()
  params = _init(transform.masked_lm(config), 1)
  path = str(root / 'mlm.npz')
  params_file.save(path, params, config)
  manifest = export.export(path, str(root / 'exported'))
  return {'config': config, 'params': params, 'checkpoint': path,
          'out': root / 'exported', 'manifest': manifest,
          'model': perceiver_load.load(root / 'exported')}


@pytest.fixture(scope='module')
def glue_classifier(tmp_path_factory):
  """A tiny 2-way classifier saved as eval.glue saves one (task, labels, num_outputs)."""
  root = tmp_path_factory.mktemp('cls')
  config = configs.tiny()
  params = _init(transform.classifier(config, 2), 2)
  path = str(root / 'ckpt_7.npz')
  params_file.save(path, params, config, task='rte', labels=['entailment', 'not_entailment'],
                  num_outputs=2, epoch=1)
  return {'config': config, 'params': params, 'checkpoint': path, 'root': root}


# --------------------------------------------------------------------------------------
# The artifact without this code.

_CHILD = textwrap.dedent('''
    import importlib.abc, json, sys
    import numpy as np

    class Blocked(importlib.abc.MetaPathFinder):
      """Makes this project's packages and Haiku unimportable in this process."""
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('haiku', 'perceiver', 'train', 'eval', 'bench'):
          raise ImportError(f'{name} is blocked: the export must run without it')
        return None

    sys.meta_path.insert(0, Blocked())
    for name in ('haiku', 'perceiver'):
      try:
        __import__(name)
        raise SystemExit(f'{name} imported despite the block')
      except ImportError:
        pass
    sys.path.insert(0, sys.argv[1])
    import load   # the loader the export wrote beside the files
    model = load.load(sys.argv[1])
    data = np.load(sys.argv[2])
    results = {}
    for batch in (1, 3):
      out = model(data[f'ids{batch}'], data[f'mask{batch}'])
      np.save(f'{sys.argv[3]}/out{batch}.npy', out)
    leaked = sorted(m for m in sys.modules
                    if m.split('.')[0] in ('haiku', 'perceiver', 'train', 'eval', 'bench'))
    print(json.dumps({'leaked': leaked, 'platforms': list(model.exported.platforms)}))
''')


@pytest.mark.slow
def test_artifact_runs_without_haiku_or_perceiver_and_equals_the_live_model(mlm, tmp_path):
  """One artifact, batch sizes 1 and 3, in a process that cannot import haiku or
  perceiver (nor find this checkout): float32 logits within 1e-6 of the live model's."""
  apply = jax.jit(transform.masked_lm(mlm['config']).apply)
  data, expected = {}, {}
  for batch in (1, 3):
    ids, mask = _inputs(batch, seed=batch)
    data[f'ids{batch}'], data[f'mask{batch}'] = ids, mask
    expected[batch] = np.asarray(apply(mlm['params'], None, ids, mask))
  np.savez(tmp_path / 'inputs.npz', **data)
  script = tmp_path / 'child.py'
  script.write_text(_CHILD)
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONSTARTUP')}
  env['JAX_PLATFORMS'] = 'cpu'
  # -I: no PYTHONPATH, no script directory, no user site; -B: no __pycache__ written
  # into the shared export directory by ``import load``.
  proc = subprocess.run([sys.executable, '-I', '-B', str(script), str(mlm['out']),
                         str(tmp_path / 'inputs.npz'), str(tmp_path)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['leaked'] == []
  assert set(report['platforms']) >= {'cpu', 'cuda', 'tpu'}
  for batch in (1, 3):
    out = np.load(tmp_path / f'out{batch}.npy')
    assert out.shape == (batch, 64, 262)
    rel = _relative(out, expected[batch])
    assert rel < 1e-6, (batch, rel)


def test_the_export_directory_holds_the_program_params_loader_and_manifest(mlm):
  assert sorted(os.listdir(mlm['out'])) == ['export.json', 'load.py', 'model.jaxexport',
                                            'params.safetensors']
  assert (mlm['out'] / 'load.py').read_text() == pathlib.Path(
      perceiver_load.__file__).read_text()
  manifest = json.loads((mlm['out'] / 'export.json').read_text())
  assert manifest['task'] == 'masked_lm' and manifest['labels'] is None
  assert manifest['max_seq_len'] == 64 and manifest['vocab_size'] == 262
  assert manifest['tokenizer']['byte_offset'] == 6 and manifest['tokenizer']['mask'] == 3
  assert manifest['jax_version'] == jax.__version__
  n = sum(v.size for leaves in mlm['params'].values() for v in leaves.values())
  assert manifest['num_parameters'] == n
  # The parameters file is the checkpoint's values under Haiku's names.
  stored = perceiver_load.read_params(mlm['out'] / 'params.safetensors')
  assert stored.keys() == export.flatten(mlm['params']).keys()
  for key, value in export.flatten(mlm['params']).items():
    np.testing.assert_array_equal(stored[key], value)


def test_shorter_inputs_use_the_same_artifact_with_the_live_models_logits(mlm):
  """The length is symbolic: a 20-byte batch runs through the same program."""
  model = mlm['model']
  ids, mask = _inputs(2, length=20, seed=5)
  live = jax.jit(transform.masked_lm(mlm['config']).apply)(mlm['params'], None, ids, mask)
  np.testing.assert_array_equal(model(ids, mask), np.asarray(live))


@pytest.mark.slow
def test_bfloat16_export_stores_bfloat16_weights_and_matches_mixed_precision(mlm, tmp_path):
  export.export(mlm['checkpoint'], str(tmp_path / 'bf16'), dtype='bfloat16')
  model = perceiver_load.load(tmp_path / 'bf16')
  dtypes = {k: v.dtype for k, v in model.params.items()}
  assert {k for k, d in dtypes.items() if d == jnp.bfloat16} == {
      k for k in dtypes if k.endswith('/w')}
  assert os.path.getsize(tmp_path / 'bf16' / 'params.safetensors') < 0.75 * os.path.getsize(
      mlm['out'] / 'params.safetensors')
  config = mlm['config'].copy_and_resolve_references()
  config.compute_dtype = 'bfloat16'
  ids, mask = _inputs(3)
  live = jax.jit(transform.masked_lm(config).apply)(
      transform.inference_params(mlm['params'], config), None, ids, mask)
  np.testing.assert_array_equal(model(ids, mask), np.asarray(live))


@pytest.mark.slow
def test_glue_classifier_exports_with_its_labels_and_task(glue_classifier, tmp_path, capsys):
  out = tmp_path / 'rte'
  manifest = export.export(glue_classifier['checkpoint'], str(out))   # task inferred
  assert manifest['task'] == 'classifier' and manifest['glue_task'] == 'rte'
  assert manifest['labels'] == ['entailment', 'not_entailment']
  model = perceiver_load.load(out)
  assert model.labels == ['entailment', 'not_entailment']
  ids, mask = _inputs(3, seed=4)
  live = jax.jit(transform.classifier(glue_classifier['config'], 2).apply)(
      glue_classifier['params'], None, ids, mask)
  logits = model(ids, mask)
  assert logits.shape == (3, 2)
  np.testing.assert_array_equal(logits, np.asarray(live))
  # The loader's command prints the label the model picks for each text.
  capsys.readouterr()
  assert perceiver_load.main([str(out), '--text=a', '--text=bc']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith(f'{out}: classifier') and len(lines) == 3
  assert set(lines[1:]) <= {'entailment', 'not_entailment'}


@pytest.mark.slow
def test_encoder_export_keeps_only_the_trunk(glue_classifier, tmp_path):
  export.export(glue_classifier['checkpoint'], str(tmp_path / 'enc'), task='encoder')
  model = perceiver_load.load(tmp_path / 'enc')
  assert not any(k.startswith('classification') for k in model.params)
  ids, mask = _inputs(2)
  live = jax.jit(transform.encoder(glue_classifier['config']).apply)(
      glue_classifier['params'], None, ids, mask)
  out = model(ids, mask)
  assert out.shape == (2, 8, 48)
  np.testing.assert_array_equal(out, np.asarray(live))


def test_encode_follows_the_byte_tokenizer_rule():
  ids, mask = perceiver_load.encode(['hé', b'\x00'], length=4)
  np.testing.assert_array_equal(ids, [[ord('h') + 6, 0xC3 + 6, 0xA9 + 6, 0], [6, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
  assert perceiver_load.decode(ids[0]) == 'hé'.encode()
  from perceiver.model import tokenizer   # pylint: disable=import-outside-toplevel
  batch = tokenizer.BytesTokenizer().encode_batch(['hé'], length=4)
  np.testing.assert_array_equal(batch.input_ids[0], ids[0])


# --------------------------------------------------------------------------------------
# What each platform runs.

def test_artifact_platforms_and_the_reference_program_on_gpu_and_tpu(mlm):
  """The one artifact names cpu, cuda and tpu; apart from JAX's platform switches it has
  no conditional and no optimization barrier; exported for cuda or tpu alone (what the
  switches resolve to), bench.lowering counts none."""
  model = mlm['model']
  assert set(model.exported.platforms) == {'cpu', 'cuda', 'tpu'}
  text = model.exported.mlir_module()
  counts = lowering.count_ops(text)
  switches, run_time = export.conditionals(text)
  assert counts['optimization_barriers'] == 0
  assert switches == counts['conditionals'] and switches > 0 and run_time == 0
  flat = export.flatten(mlm['params'])
  for platform in ('cuda', 'tpu'):
    alone = export.export_program(export.build('masked_lm', _reference(mlm['config'])),
                                  flat, 64, [platform]).mlir_module()
    counts = lowering.count_ops(alone)
    assert counts['conditionals'] == 0 and counts['optimization_barriers'] == 0, counts


def _reference(config):
  config = config.copy_and_resolve_references()
  config.kernels = 'reference'
  return config


def test_conditionals_tell_the_xla_cpu_kernels_from_platform_switches(mlm):
  """The check above can fail: the masked LM built for the CPU (XLA:CPU kernels, whose
  attention writes transposes through a run-time conditional) shows 4 of them."""
  model = transform.masked_lm(mlm['config'],
                              compute=layers.Compute.resolve(mlm['config'], 'cpu'))
  text = export.export_program(model, export.flatten(mlm['params']), 64).mlir_module()
  switches, run_time = export.conditionals(text)
  assert run_time == 4 and switches + run_time == lowering.count_ops(text)['conditionals']


def test_conditionals_reads_stablehlo_text():
  """Hand-written module text: a platform switch is a case on the platform index and a
  case on its result; a case on anything else (one with two results here) and an ``if``
  run at run time; a function without the platform index has no switches."""
  text = textwrap.dedent('''
      func.func public @main(%arg0: tensor<i32> {jax.global_constant = "_platform_index"}, %arg1: tensor<f32>) {
        %0 = "stablehlo.case"(%arg0) ({...}) : (tensor<i32>) -> tensor<i32>
        %1 = "stablehlo.case"(%0) ({...}) : (tensor<i32>) -> tensor<f32>
        %2:2 = "stablehlo.case"(%7) ({...}) : (tensor<i32>) -> (tensor<f32>, tensor<f32>)
        %3 = stablehlo.if %p ...
      }
      func.func private @f(%arg0: tensor<i32>, %arg1: tensor<f32>) {
        %0 = "stablehlo.case"(%arg0) ({...}) : (tensor<i32>) -> tensor<f32>
      }
  ''')
  assert export.conditionals(text) == (2, 3)
  assert lowering.count_ops(text)['conditionals'] == 5


# --------------------------------------------------------------------------------------
# Errors: one line each, naming the culprit.

def test_loader_command_errors_are_one_line(mlm, tmp_path, capsys):
  """``python load.py DIR --text=...``: a directory that is not an export, and a text
  longer than the window, are one ``error:`` line each and exit status 1."""
  (tmp_path / 'empty').mkdir()
  for argv, match in (([str(tmp_path / 'empty')], 'not an export (no export.json'),
                      ([str(mlm['out']), '--text=' + 'x' * 65],
                       'input_ids: shape (1, 65): batch must be at least 1 and length 1 to 64')):
    capsys.readouterr()
    assert perceiver_load.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and match in err[0], err


@pytest.mark.parametrize('ids, mask, match', [
    (np.zeros((2, 3, 4), np.int32), None, r'input_ids: shape \(2, 3, 4\), expected \[batch'),
    (np.zeros((2, 65), np.int32), None, r'length 1 to 64'),
    (np.zeros((2, 8), np.int32), np.ones((2, 9), np.int32), r'input_mask: shape \(2, 9\)'),
    (np.zeros((2, 8), np.float32), None, r'input_ids: dtype float32'),
    (np.full((1, 8), 262, np.int32), None, r'values from 262 to 262'),
])
def test_batches_of_the_wrong_shape_are_named(mlm, ids, mask, match):
  model = mlm['model']
  with pytest.raises(perceiver_load.ExportError, match=match):
    model(ids, mask)


def test_a_program_outside_the_installed_jax_window_is_named(mlm, monkeypatch):
  version = mlm['model'].exported.calling_convention_version
  monkeypatch.setattr(jax.export, 'minimum_supported_calling_convention_version',
                      version + 1)
  monkeypatch.setattr(jax.export, 'maximum_supported_calling_convention_version',
                      version + 2)
  with pytest.raises(perceiver_load.ExportError,
                     match=rf'model.jaxexport: written by jax {jax.__version__} with calling '
                     rf'convention {version}; the installed jax .* runs {version + 1} to '
                     rf'{version + 2} \(JAX runs a serialized program from a JAX up to 6 '
                     'months older'):
    perceiver_load.load(mlm['out'])


def test_a_program_for_other_platforms_is_named(mlm, tmp_path):
  export.export(mlm['checkpoint'], str(tmp_path / 'tpu'), platforms=['tpu'])
  with pytest.raises(perceiver_load.ExportError,
                     match='model.jaxexport: exported for tpu; this jax runs on cpu'):
    perceiver_load.load(tmp_path / 'tpu')


def test_damaged_exports_are_named(mlm, tmp_path):
  bad = tmp_path / 'bad'
  bad.mkdir()
  for name in ('export.json', 'model.jaxexport', 'params.safetensors'):
    (bad / name).write_bytes((mlm['out'] / name).read_bytes())
  (bad / 'model.jaxexport').write_bytes(b'\x00' * 64)
  with pytest.raises(perceiver_load.ExportError, match='model.jaxexport: not a serialized'):
    perceiver_load.load(bad)
  (bad / 'model.jaxexport').write_bytes((mlm['out'] / 'model.jaxexport').read_bytes())
  (bad / 'params.safetensors').write_bytes(b'garbage')
  with pytest.raises(perceiver_load.ExportError, match='params.safetensors: not a readable'):
    perceiver_load.load(bad)
  manifest = json.loads((mlm['out'] / 'export.json').read_text())
  (bad / 'export.json').write_text(json.dumps(dict(manifest, format='other/1')))
  with pytest.raises(perceiver_load.ExportError, match="export.json: format 'other/1'"):
    perceiver_load.load(bad)


def test_export_refusals_name_the_flag_or_tensors(mlm, glue_classifier, tmp_path):
  with pytest.raises(errors.ConfigError, match='--task=classifier: .* not a classifier'):
    export.export(mlm['checkpoint'], str(tmp_path / 'a'), task='classifier')
  with pytest.raises(params_file.CheckpointError, match='missing .*basic_decoder'):
    export.export(glue_classifier['checkpoint'], str(tmp_path / 'b'), task='masked_lm')
  with pytest.raises(errors.ConfigError, match='--out=.*already exists'):
    export.export(mlm['checkpoint'], str(mlm['out']))
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'keep.txt').write_text('mine')
  with pytest.raises(errors.ConfigError, match='not an export directory'):
    export.export(mlm['checkpoint'], str(tmp_path / 'notes'), overwrite=True)
  assert (tmp_path / 'notes' / 'keep.txt').read_text() == 'mine'
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_export_command_prints_one_error_line(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'perceiver.export',
                         f'--checkpoint={tmp_path / "missing.npz"}', f'--out={tmp_path / "o"}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1 and 'missing.npz' in lines[0], proc.stderr


# --------------------------------------------------------------------------------------
# The ONNX route: ours -> Hugging Face -> torch.onnx.export -> onnxruntime.

@pytest.mark.slow
def test_onnxruntime_logits_equal_ours_on_the_small_config(glue_classifier, tmp_path):
  """configs.small() (10M parameters, 512-byte window) with the text decoder transformers
  fixes, exported at the full window with a symbolic batch: onnxruntime's logits within
  1e-4 of ours at real positions (transformers decodes padded positions like real ones)."""
  for name in ('torch', 'transformers', 'onnx'):
    pytest.importorskip(name, reason=f'{name} is not installed: {_ONNX_SKIP}')
  ort = pytest.importorskip('onnxruntime', reason=f'onnxruntime is not installed: {_ONNX_SKIP}')
  config = configs.small()
  config.decoder.num_heads = hf.HF_DECODER_HEADS
  config.decoder.qk_channels = hf.HF_DECODER_QK_CHANNELS
  params = _init(transform.masked_lm(config), 3)
  params_file.save(tmp_path / 'small.npz', params, config)
  onnx_path = onnx_route.export_onnx(str(tmp_path / 'small.npz'), str(tmp_path / 'onnx'))
  session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
  apply = jax.jit(transform.masked_lm(config).apply)
  for batch in (1, 2):
    ids, mask = _inputs(batch, length=512, seed=batch)
    theirs = session.run(None, {'input_ids': ids.astype(np.int64),
                                'attention_mask': mask.astype(np.int64)})[0]
    ours = np.asarray(apply(params, None, ids, mask))
    real = mask.astype(bool)
    rel = _relative(theirs[real], ours[real])
    print(f'\nonnxruntime vs ours, batch {batch}: max relative logit difference {rel:.2e}')
    assert rel < 1e-4
  # transformers' PerceiverForMaskedLM is the route's only model: a classifier is refused.
  with pytest.raises(errors.ConfigError, match='a classifier; the ONNX route exports'):
    onnx_route.export_onnx(glue_classifier['checkpoint'], str(tmp_path / 'cls'))
