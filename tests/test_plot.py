"""train.plot: a PNG of learning curves from a short run's metrics.jsonl."""

import io
import json
import struct
import subprocess
import sys
import types

import pytest

from tests import helpers
from train import mlm
from train import plot
from perceiver.training import writer as writer_lib


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG file'
  assert data[12:16] == b'IHDR'
  width, height = struct.unpack('>II', data[16:24])
  assert data[-8:-4] == b'IEND'
  return width, height


@pytest.mark.slow
def test_plot_writes_a_png_of_a_short_run(tmp_path):
  run = tmp_path / 'run'
  mlm.train(helpers.mlm_tiny_config(tmp_path, steps=4, log_every=1, eval_every=2), str(run))
  records = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if r['kind'] == 'eval'] == [2, 4]
  assert all(r['elapsed_s'] > 0 for r in records)
  evals = [r for r in records if r['kind'] == 'eval']
  assert evals[-1]['accuracy_gap'] == pytest.approx(
      evals[-1]['accuracy'] - evals[-1]['baseline_accuracy'])
  out = tmp_path / 'curves.png'
  done = subprocess.run([sys.executable, '-m', 'train.plot', f'--workdir={run}', str(run),
                         f'--out={out}'], cwd=helpers.ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert _png_size(out) == (1200, 800)
  bad = subprocess.run([sys.executable, '-m', 'train.plot', f'--workdir={tmp_path}/none'],
                       cwd=helpers.ROOT, capture_output=True, text=True)
  assert bad.returncode == 1
  assert 'error: --workdir' in bad.stderr and 'no metrics.jsonl' in bad.stderr


def test_resumed_runs_continue_the_time_axis(tmp_path):
  lines = [{'step': 1, 'kind': 'train', 'time': 0, 'elapsed_s': 10.0, 'loss': 3.0},
           {'step': 2, 'kind': 'train', 'time': 0, 'elapsed_s': 70.0, 'loss': 2.9},
           {'step': 3, 'kind': 'train', 'time': 0, 'elapsed_s': 5.0, 'loss': 2.8},   # resumed
           {'step': 3, 'kind': 'eval', 'time': 0, 'elapsed_s': 35.0, 'loss': 2.7}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  metrics = plot.read_metrics(str(tmp_path))
  assert [r['minutes'] for r in metrics['train']] == [10 / 60, 70 / 60, 75 / 60]
  assert metrics['eval'][0]['minutes'] == 105 / 60


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 1, "kind": "train", "time": 0, "loss": 1}\n')
  monkeypatch.setitem(sys.modules, 'matplotlib', None)
  with pytest.raises(plot.PlotError, match='needs matplotlib.*pip install matplotlib'):
    plot.plot([str(tmp_path)], str(tmp_path / 'x.png'))


def test_metrics_also_go_to_a_tensorboard_writer_when_one_is_installed(tmp_path, monkeypatch):
  """With a (stand-in) tensorboardX module importable, every logged number becomes a scalar
  named kind/metric; without one nothing is written and nothing fails."""
  calls = []

  class SummaryWriter:
    def __init__(self, logdir):
      calls.append(('open', logdir))

    def add_scalar(self, tag, value, step):
      calls.append((tag, value, step))

    def flush(self):
      pass

    def close(self):
      pass

  monkeypatch.setitem(sys.modules, 'tensorboardX',
                      types.SimpleNamespace(SummaryWriter=SummaryWriter))
  log = writer_lib.MetricWriter(str(tmp_path / 'tb'), total_steps=10, stream=io.StringIO())
  log.write(3, {'loss': 2.5, 'accuracy': 0.25}, kind='eval')
  assert calls == [('open', str(tmp_path / 'tb' / 'tensorboard')), ('eval/loss', 2.5, 3),
                   ('eval/accuracy', 0.25, 3)]
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)
  monkeypatch.setitem(sys.modules, 'clu', None)
  plain = writer_lib.MetricWriter(str(tmp_path / 'plain'), total_steps=10,
                                  stream=io.StringIO())
  plain.write(1, {'loss': 1.0})
  assert not (tmp_path / 'plain' / 'tensorboard').exists()
  assert json.loads((tmp_path / 'plain' / 'metrics.jsonl').read_text())['loss'] == 1.0
