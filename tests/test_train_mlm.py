"""MLM training: exact resume, device-count invariance, signals, non-finite stops, flags."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perceiver.params import loading
from perceiver.params import run_checkpoint
from perceiver.command import errors
from train import masking
from train import mlm
from perceiver.training import optim
from train.configs import mlm as mlm_configs
from tests import helpers

ROOT = helpers.ROOT


def _params(path):
  return loading.load_any(path)[0]


def _fingerprints(path):
  """Every saved array's shape, dtype and fingerprint (a position-weighted sum of its
  bits): equal for two checkpoints whose parameters, optimizer state, RNG key and step are
  bit-identical."""
  return run_checkpoint.read_meta(path)['arrays']


_records = helpers.records


@pytest.mark.slow
def test_resume_after_k_steps_is_bit_identical_to_a_straight_run(tmp_path):
  straight = tmp_path / 'straight'
  split = tmp_path / 'split'
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=6), str(straight))
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=3), str(split))
  assert [r['step'] for r in _records(split)] == [1, 2, 3]
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=6), str(split))   # resumes at step 3
  a, b = _params(straight / 'ckpt_000000006'), _params(split / 'ckpt_000000006')
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
  losses_straight = [r['loss'] for r in _records(straight)]
  losses_split = [r['loss'] for r in _records(split)]
  assert losses_split == losses_straight
  fa, fb = _fingerprints(straight / 'ckpt_000000006'), _fingerprints(split / 'ckpt_000000006')
  assert set(fa) == {'params', 'train'} and any('opt_state' in k for k in fa['train'])
  assert fa == fb


_HELD_SAVE = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from orbax.checkpoint._src.path import async_path
    from tests import helpers
    from train import mlm

    renamed = async_path.rename

    async def held(src, dst):
      # The commit of step 4's checkpoint (orbax renames its temporary directory when
      # every array is written): say so, and never get there. SIGKILL comes here.
      if str(dst).endswith('ckpt_000000004'):
        open({marker!r}, 'w').close()
        await asyncio.sleep(3600)
      return await renamed(src, dst)

    async_path.rename = held
    mlm.train(helpers.mlm_tiny_config({tmp!r}, steps=6, checkpoint_every=2), {workdir!r})
""")


@pytest.mark.slow
def test_kill_9_during_an_async_save_then_resume_is_bit_identical(tmp_path, capsys):
  """SIGKILL while step 4's checkpoint is being written in the background (its arrays on
  disk, its commit not done; the steps after it running): the next run removes the
  leftover, resumes from step 2, and ends with the checkpoint of an uninterrupted run."""
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=6, checkpoint_every=2), str(straight))
  marker = tmp_path / 'held'
  child = subprocess.Popen(
      [sys.executable, '-c', _HELD_SAVE.format(root=str(ROOT), marker=str(marker),
                                              tmp=str(tmp_path), workdir=str(killed))],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  while not marker.exists() and time.monotonic() < deadline:
    assert child.poll() is None, child.stderr.read()[-3000:]
    time.sleep(0.05)
  assert marker.exists(), 'the save of step 4 was never held'
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert child.returncode == -signal.SIGKILL
  left = sorted(p.name for p in killed.glob('ckpt_*'))
  assert left[0] == 'ckpt_000000002' and len(left) == 2 and left[1].startswith(
      'ckpt_000000004.orbax-checkpoint-tmp'), left
  capsys.readouterr()
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=6, checkpoint_every=2), str(killed))
  assert f'resuming from {killed}/ckpt_000000002 at step 2' in capsys.readouterr().out
  assert sorted(p.name for p in killed.glob('ckpt_*')) == [
      'ckpt_000000002', 'ckpt_000000004', 'ckpt_000000006']   # the leftover is gone
  assert _fingerprints(straight / 'ckpt_000000006') == _fingerprints(killed / 'ckpt_000000006')
  a, b = _params(straight / 'ckpt_000000006'), _params(killed / 'ckpt_000000006')
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.mark.slow
def test_training_lowers_the_masked_byte_loss(tmp_path):
  config = helpers.mlm_tiny_config(tmp_path, steps=60, log_every=20, checkpoint_every=60)
  mlm.train(config, str(tmp_path / 'run'))
  losses = [r['loss'] for r in _records(tmp_path / 'run')]
  assert losses[-1] < 0.6 * losses[0], losses


_TWO_DEVICE_SCRIPT = textwrap.dedent('''
    import json, pathlib, sys
    sys.path.insert(0, {root!r})
    import jax
    from tests import helpers
    from train import mlm
    assert jax.local_device_count() == {devices}, jax.devices()
    tmp = pathlib.Path({tmp!r})
    mlm.train(helpers.mlm_tiny_config(tmp, steps=3, grad_accum_steps={accum}),
              str(tmp / 'run{devices}{accum}'))
''')


@pytest.mark.slow
@pytest.mark.parametrize('devices,accum', [(2, 1), (1, 2)])
def test_two_devices_or_accumulation_give_the_one_device_losses(tmp_path, devices, accum):
  reference = tmp_path / 'one'
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=3), str(reference))
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  script = _TWO_DEVICE_SCRIPT.format(root=str(ROOT), devices=devices,
                                     tmp=str(tmp_path), accum=accum)
  subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, check=True)
  other = tmp_path / f'run{devices}{accum}'
  want = [r['loss'] for r in _records(reference)]
  got = [r['loss'] for r in _records(other)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  a, b = _params(reference / 'ckpt_000000003'), _params(other / 'ckpt_000000003')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


_MESH_SCRIPT = textwrap.dedent('''
    import pathlib, sys
    sys.path.insert(0, {root!r})
    import jax
    from tests import helpers
    from train import mlm
    assert jax.device_count() == {devices}, jax.devices()
    config = helpers.mlm_tiny_config(pathlib.Path({tmp!r}), steps={steps}, batch_size=8)
    config.unlock()
    config.mesh.data, config.mesh.fsdp = {data}, {fsdp}
    mlm.train(config, {workdir!r})
''')


@pytest.mark.slow
def test_a_checkpoint_resumes_on_any_mesh(tmp_path):
  """3 steps FSDP over 8 devices, 3 more replicated on 4, 3 more on 1 (each resuming the
  checkpoint the last wrote): the losses and parameters of 9 straight steps on one."""
  straight = tmp_path / 'straight'
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=9, batch_size=8), str(straight))
  moved = tmp_path / 'moved'
  for devices, steps, data, fsdp in ((8, 3, 1, -1), (4, 6, -1, 1)):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    script = _MESH_SCRIPT.format(root=str(ROOT), devices=devices, tmp=str(tmp_path),
                                 steps=steps, data=data, fsdp=fsdp, workdir=str(moved))
    subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, check=True)
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=9, batch_size=8), str(moved))
  records = _records(moved)
  assert [r['step'] for r in records] == list(range(1, 10))
  np.testing.assert_allclose([r['loss'] for r in records],
                             [r['loss'] for r in _records(straight)], rtol=1e-5)
  a, b = _params(straight / 'ckpt_000000009'), _params(moved / 'ckpt_000000009')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_zero_then_resumes(tmp_path):
  workdir = tmp_path / 'run'
  config_args = ['--config.train.steps=100000', '--config.train.log_every=1',
                 '--config.train.checkpoint_every=100000', '--config.train.eval_every=0']
  proc = subprocess.Popen(
      [sys.executable, '-m', 'train.mlm', f'--workdir={workdir}', *config_args],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and
                                        len(metrics.read_text().splitlines()) >= 3):
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'stopped by SIGTERM' in out
  steps = sorted(int(p.name[5:14]) for p in workdir.glob('ckpt_*[0-9]'))
  assert len(steps) == 1 and steps[0] >= 3
  # Resuming continues from that step.
  done = subprocess.run(
      [sys.executable, '-m', 'train.mlm', f'--workdir={workdir}',
       f'--config.train.steps={steps[0] + 2}', '--config.train.eval_every=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert f'resuming from {workdir}/ckpt_{steps[0]:09d}' in done.stdout


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real_make = optim.make

  def poisoned(config, platform=None):
    def nan_at_step_4(updates, state, params=None):
      del params
      count = state + 1
      updates = jax.tree.map(lambda u: jnp.where(count == 4, jnp.nan, u), updates)
      return updates, count
    return optax.chain(real_make(config, platform), optax.GradientTransformation(
        lambda params: jnp.zeros([], jnp.int32), nan_at_step_4))

  monkeypatch.setattr(optim, 'make', poisoned)
  workdir = tmp_path / 'run'
  with pytest.raises(mlm.TrainingError, match='non-finite') as info:
    mlm.train(helpers.mlm_tiny_config(tmp_path, steps=8, checkpoint_every=1), str(workdir))
  assert 'ckpt_000000003' in str(info.value)
  steps = sorted(p.name for p in workdir.glob('ckpt_*[0-9]'))
  assert steps[-1] == 'ckpt_000000003'
  params = _params(workdir / steps[-1])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_decoding_only_masked_positions_gives_the_same_loss(tmp_path):
  config = helpers.mlm_tiny_config(tmp_path)
  from perceiver import transform
  model = transform.masked_lm(config.model)
  ids = np.random.default_rng(0).integers(6, 262, (3, 64)).astype(np.int32)
  ids[:, ::5] = ord(' ') + 6
  masker = masking.WordMasker(0.3, max_predictions=40)
  batch = masker(ids, np.ones_like(ids), np.random.default_rng(1))
  params = model.init(jax.random.PRNGKey(0), ids)
  full_loss, full_m = mlm.make_loss_fn(model, False)(params, None, batch, True)
  part_loss, part_m = mlm.make_loss_fn(model, True)(params, None, batch, True)
  np.testing.assert_allclose(part_loss, full_loss, rtol=1e-5)
  np.testing.assert_allclose(part_m['correct'], full_m['correct'])
  assert mlm.count_fn(batch) == batch['weights'].sum() > 0


@pytest.mark.slow
def test_config_typos_and_bad_batch_sizes_are_named(tmp_path):
  typo = subprocess.run([sys.executable, '-m', 'train.mlm', f'--workdir={tmp_path}',
                         '--config.train.stepz=3'], cwd=ROOT, capture_output=True, text=True)
  assert typo.returncode != 0 and 'stepz' in typo.stderr
  bad = subprocess.run([sys.executable, '-m', 'train.mlm', f'--workdir={tmp_path}',
                        '--config=train/configs/mlm.py:nope'], cwd=ROOT, capture_output=True,
                       text=True)
  assert bad.returncode != 0 and "unknown preset 'nope'" in bad.stderr
  with pytest.raises(errors.ConfigError, match=r'train.batch_size=5 must be a positive '
                     r'multiple of devices \(1\) x train.grad_accum_steps \(2\)'):
    config = helpers.mlm_tiny_config(tmp_path, batch_size=5, grad_accum_steps=2)
    mlm.train(config, str(tmp_path / 'r'))
  missing = helpers.mlm_tiny_config(tmp_path)
  missing.data.sources.gen.paths = str(tmp_path / 'nothing-*.jsonl')
  with pytest.raises(mlm.data_lib.DataError, match=r'data.sources.gen.paths: no file'):
    mlm.train(missing, str(tmp_path / 'm'))


@pytest.mark.slow
def test_resuming_with_another_model_config_is_refused(tmp_path):
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=3), str(tmp_path / 'run'))
  other = helpers.mlm_tiny_config(tmp_path, steps=6)
  other.model.encoder.num_self_attends_per_block = 3
  with pytest.raises(mlm.TrainingError, match='encoder'):
    mlm.train(other, str(tmp_path / 'run'))


def test_paper_preset_has_the_papers_hyperparameters():
  c = mlm_configs.get_config('paper')
  helpers.assert_released_architecture(c.model)   # Table 11
  assert c.model.encoder.dropout_prob == 0.0
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.warmup_steps,
          c.optimizer.decay, c.optimizer.decay_steps, c.optimizer.weight_decay) == (
              'lamb', 0.00125, 1000, 'cosine', 500_000, 0.01)
  assert (c.train.steps, c.train.batch_size, c.masking.mask_prob) == (500_000, 2048, 0.15)
  assert {k: v.weight for k, v in c.data.sources.items()} == {'c4': 0.7, 'wikipedia': 0.3}
  assert c.data.docs_per_example == 10 and c.model.max_seq_len == 2048
  lr = optim.schedule(c.optimizer)
  np.testing.assert_allclose([lr(0), lr(500), lr(1000), lr(500_000)],
                             [0.0, 0.000625, 0.00125, 0.0], atol=1e-9)
