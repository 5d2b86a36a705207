"""The benchmark's smoke suite runs and reports sane figures (never speed assertions)."""

import json
import pathlib
import subprocess
import sys

import pytest

from bench import ours
from perceiver import flops

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'smoke.json'
  done = subprocess.run([sys.executable, '-m', 'bench.run', '--suite=smoke', f'--out={out}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(out.read_text()), done.stdout


def _peer_ok(row):
  peer = row['peer']
  if isinstance(peer, str):
    assert peer.startswith('not installed') or peer.startswith('off'), peer
    return False
  assert peer['median_s'] > 0 and all(t > 0 for t in peer['times_s'])
  assert row['speedup'] == pytest.approx(peer['median_s'] / row['ours']['median_s'])
  return True


def test_smoke_has_every_part(smoke):
  results, stdout = smoke
  assert {'meta', 'config', 'peak', 'forward', 'fwd_bwd', 'train', 'memory', 'data',
          'targets'} <= set(results)
  meta = results['meta']
  assert meta['cores'] >= 1 and meta['cpu_model'] and meta['versions']['jax']
  assert {'torch', 'transformers'} <= set(meta['versions'])
  assert 'Targets:' in stdout and 'Train step' in stdout   # the table is printed last


def test_peak_and_times_are_positive(smoke):
  results, _ = smoke
  for precision in ('float32', 'bfloat16'):
    assert results['peak'][precision]['flops_per_s'] > 0
  for section in ('forward', 'fwd_bwd', 'train'):
    rows = results[section]
    assert {(r['precision'], r['batch']) for r in rows} == {('float32', 1), ('bfloat16', 1)}
    for row in rows:
      side = row['ours']
      assert side['median_s'] > 0 and side['min_s'] <= side['median_s'] <= side['max_s']
      assert side['bytes_per_s'] > 0 and side['flops_per_s'] > 0 and side['mfu'] > 0
      if section != 'fwd_bwd':
        _peer_ok(row)
  assert results['train'][0]['ours']['optimizer'].startswith('LAMB')


def test_flops_are_the_analytic_count_and_xla_agrees(smoke):
  results, _ = smoke
  config = ours.model_config('tiny_hf', 'float32')
  forward = flops.masked_lm_forward(config, 64)
  assert results['config']['analytic_forward_flops'] == forward
  for section, expected, tolerance in (('forward', forward, 0.25),
                                       ('fwd_bwd', 3 * forward, 0.25),
                                       ('train', 3 * forward, 0.6)):
    for row in results[section]:
      side = row['ours']
      assert side['analytic_flops'] == expected * row['batch']
      # XLA also counts layer norms, softmax, GELU (and the optimizer in a train step).
      assert 1.0 <= side['xla_over_analytic'] <= 1.0 + tolerance, (section, side)


def test_memory_points_and_data_rate(smoke):
  results, _ = smoke
  points = results['memory']
  assert {p['kind'] for p in points} == {'forward', 'train'}
  for point in points:
    assert 'error' not in point, point
    assert point['xla']['peak'] > 0 and point['xla']['temp'] >= 0
    assert point['process_peak_bytes'] > point['state_bytes'] > 0
  train = [p for p in points if p['kind'] == 'train'][0]
  assert train['state_bytes'] == 3 * train['param_bytes']
  rate = results['data']['rates'][0]
  assert rate['batches_per_s'] > 0 and rate['batch'] == 1
  assert results['data']['needs'][0]['headroom'] > 0


def test_targets_are_judged(smoke):
  results, _ = smoke
  names = [t['target'] for t in results['targets']]
  assert any(n.startswith('train step float32 b1') for n in names)
  assert any(n.startswith('forward+backward') for n in names)
  for target in results['targets']:
    assert target['met'] in (True, False, None)
