r"""Benchmarks of the released model against transformers' PyTorch port, in one process.

    python -m bench.run --suite=full --out=bench/results.json

Suites:
- ``smoke``: everything below on the tiny config, in seconds (run by the tests);
- ``full``: matmul peak, forward, forward+backward, train step, memory, data pipeline;
- ``forward``, ``train``, ``memory``, ``peak``: one part (``train`` includes the
  forward+backward rows), for iterating on one figure;
- ``data``: the input pipeline on real-format shards at 1 and 2 worker processes, beside
  what 1 and 8 H100-class devices need, and where its time goes (``bench.data_rate``);
- ``accelerator``: the train step alone on whatever device JAX runs on (a GPU or TPU),
  at per-device batch 8, 32 and 64, with MFU against the device's published peak
  (``bench.accelerator``); no peer;
- ``scale``: the step over a device mesh on simulated CPU devices: data-parallel against
  FSDP on 8 (time, per-device state bytes), and the compiled per-device memory of the
  released model, IO++ and a ~1B configuration at fsdp 1, 8 and 64, compiled at 2, 4 and
  6 latent self-attention layers and extended to each model's depth (``bench.scale``).

Ours and the peer (``PerceiverForMaskedLM`` with the same config and weights) are timed
alternately, round by round, after warm-up; medians are reported, with each side's
spread. Peer rows say "not installed" without torch and transformers (extra ``bench``).
The tables are printed last; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shlex
import sys
import time
from typing import Dict, List, Optional

from absl import app
from absl import flags

from perceiver.training import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_enum('suite', 'full', ['smoke', 'full', 'forward', 'train', 'memory', 'data',
                                    'peak', 'accelerator', 'scale'], 'What to run.')
flags.DEFINE_string('out', None, 'Write the results as JSON to this file.')
flags.DEFINE_list('batch_sizes', None, 'Batch sizes (default: 1,4; smoke: 1).')
flags.DEFINE_list('precisions', ['float32', 'bfloat16'], 'float32 and/or bfloat16 (mixed).')
flags.DEFINE_integer('warmup', None, 'Untimed runs of each callable (default 2; smoke 1).')
flags.DEFINE_integer('repeats', None, 'Timed runs of each callable (default 5; smoke 2).')
flags.DEFINE_enum('peer', 'auto', ['auto', 'off'], "'off' skips transformers.")
flags.DEFINE_integer('threads', 0, 'torch intra-op threads (0: one per core).')
flags.DEFINE_list('memory_lengths', None,
                  'Input lengths for the memory sweep (default 512,1024,2048).')
flags.DEFINE_integer('long_seq_len', 16384,
                     'Also measure memory with max_seq_len and input this long (0: skip).')
flags.DEFINE_enum('kernels', 'auto', ['auto', 'reference', 'xla_cpu'],
                  "The model's kernels setting (perceiver.model.layers); the memory sweep always "
                  "uses 'auto'.")
flags.DEFINE_enum('lamb', 'auto', ['auto', 'fused', 'optax'],
                  "The train step's LAMB implementation (perceiver.training.optim.make).")
flags.DEFINE_string('preset', None, 'Model preset (default: language_mlm; smoke: a tiny '
                    'model).')
flags.DEFINE_bool('scale_compile', True, 'scale suite: also compile the released model, '
                  'IO++ and ~1B steps (at 2, 4 and 6 layers) over 1, 8 and 64 simulated '
                  'devices for XLA\'s memory analysis (about a minute each on a small CPU).')
flags.DEFINE_float('peak_flops', 0.0, 'accelerator suite: the per-device peak FLOP/s for '
                   'MFU, instead of the table of known devices.')


def _suite_settings(suite: str) -> Dict:
  if suite == 'smoke':
    return dict(preset='tiny_hf', seq_len=64, batch_sizes=[1], warmup=1, repeats=2,
                peak_shapes=((256, 256, 256),), peak_model_shapes=(),
                memory_lengths=[64], long_seq_len=0, fresh_memory_process=False,
                data_min_seconds=0.2, data_block_size=32)
  if suite == 'accelerator':
    return dict(preset='language_mlm', seq_len=2048, batch_sizes=[8, 32, 64], warmup=2,
                repeats=5)
  return dict(preset='language_mlm', seq_len=2048, batch_sizes=[1, 4], warmup=2, repeats=5,
              peak_shapes=None, peak_model_shapes=None, memory_lengths=[512, 1024, 2048],
              long_seq_len=16384, fresh_memory_process=True, data_min_seconds=3.0,
              data_block_size=None)


def _parts(suite: str) -> List[str]:
  if suite in ('smoke', 'full'):
    return ['peak', 'forward', 'train', 'memory', 'data']
  return {'forward': ['peak', 'forward'], 'train': ['peak', 'train'], 'memory': ['memory'],
          'data': ['data_suite'], 'peak': ['peak'], 'accelerator': ['accelerator'],
          'scale': ['scale']}[suite]


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _loadavg() -> Optional[str]:
  try:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return None


def _other_python_processes() -> List[str]:
  """Command lines of Python processes not started by this one (a noisy machine)."""
  mine = {os.getpid(), os.getppid()}
  found = []
  try:
    pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]
  except OSError:
    return found
  for pid in pids:
    if pid in mine:
      continue
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        argv = f.read().split(b'\0')
      with open(f'/proc/{pid}/stat') as f:
        parent = int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    if parent in mine or not argv or b'python' not in os.path.basename(argv[0]):
      continue
    found.append(' '.join(a.decode(errors='replace') for a in argv if a)[:120])
  return found


def _versions() -> Dict[str, str]:
  import haiku  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import numpy  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from bench import peer  # pylint: disable=import-outside-toplevel
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'dm-haiku': haiku.__version__,
          'optax': optax.__version__, 'numpy': numpy.__version__, **peer.versions()}


def _side(summary: Dict, *, seq_len: int, batch: int, flops: float, xla_flops=None,
          peak: Optional[float] = None) -> Dict:
  median = summary['median_s']
  out = dict(summary, bytes_per_s=batch * seq_len / median, analytic_flops=flops,
             flops_per_s=flops / median)
  if xla_flops is not None:
    out['xla_flops'] = xla_flops
    out['xla_over_analytic'] = xla_flops / flops if flops else None
  if peak:
    out['mfu'] = flops / median / peak
  return out


class Runner:
  """Holds the model, its parameters and the peer across the parts of one run."""

  def __init__(self, settings: Dict, precisions: List[str], batch_sizes: List[int],
               use_peer: bool):
    from bench import ours  # pylint: disable=import-outside-toplevel
    from bench import peer  # pylint: disable=import-outside-toplevel
    self.ours, self.peer_lib = ours, peer
    self.settings = settings
    self.precisions, self.batch_sizes = precisions, batch_sizes
    self.seq_len = settings['seq_len']
    self.base_config = ours.model_config(settings['preset'], 'float32',
                                         kernels=FLAGS.kernels)
    self.params = ours.init_params(self.base_config, self.seq_len)
    self.peak: Dict[str, float] = {}
    available, why = peer.available() if use_peer else (False, 'off (--peer=off)')
    self.peer_status = why
    self.peer_model = None
    self.peer_optimizer = None
    if available:
      import jax  # pylint: disable=import-outside-toplevel
      self.peer_model = peer.build_model(jax.device_get(self.params), self.base_config,
                                         threads=FLAGS.threads or os.cpu_count())

  def config(self, precision):
    return self.ours.model_config(self.settings['preset'], precision, kernels=FLAGS.kernels)

  def measure_peak(self) -> Dict:
    from bench import peak  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    kwargs = {}
    if self.settings['peak_shapes']:
      kwargs = dict(shapes=self.settings['peak_shapes'],
                    model_shapes=self.settings['peak_model_shapes'])
    out = {}
    for precision in self.precisions:
      out[precision] = peak.measure(jnp.dtype(precision), warmup=self.settings['warmup'],
                                    repeats=self.settings['repeats'], **kwargs)
      self.peak[precision] = out[precision]['flops_per_s']
    return out

  def _timed(self, ours_fn, peer_fn):
    from bench import timing  # pylint: disable=import-outside-toplevel
    fns = {'ours': ours_fn}
    if peer_fn is not None:
      fns['peer'] = peer_fn
    times = timing.interleaved(fns, warmup=self.settings['warmup'],
                               repeats=self.settings['repeats'])
    return {k: timing.summary(v) for k, v in times.items()}

  def _row(self, kind, precision, batch, compiled, peer_fn, peer_extra=None):
    measured = self._timed(compiled.run, peer_fn)
    config = self.config(precision)
    flops = self.ours.analytic_flops(config, self.seq_len, batch, kind)
    row = {'precision': precision, 'batch': batch,
           'ours': _side(measured['ours'], seq_len=self.seq_len, batch=batch, flops=flops,
                         xla_flops=compiled.xla_flops, peak=self.peak.get(precision)),
           'xla_memory': compiled.memory}
    if 'peer' in measured:
      row['peer'] = dict(_side(measured['peer'], seq_len=self.seq_len, batch=batch,
                               flops=flops, peak=self.peak.get(precision)),
                         **(peer_extra or {}))
      row['speedup'] = row['peer']['median_s'] / row['ours']['median_s']
    else:
      row['peer'] = self.peer_status
    return row

  def _sweep(self, kind, build, peer_fn=None, peer_extra=None, ours_extra=None):
    """One row per (batch, precision): ``build(config, params, batch)`` (compiled) timed
    against ``peer_fn(batch, precision)``; without ``peer_fn`` the row has ours alone."""
    rows = []
    for batch in self.batch_sizes:
      data = self.ours.example_batch(batch, self.seq_len)
      for precision in self.precisions:
        compiled = build(self.config(precision), self.params, data)
        peer = (peer_fn(data, precision)
                if peer_fn is not None and self.peer_model is not None else None)
        row = self._row(kind, precision, batch, compiled, peer, peer_extra)
        if peer_fn is None:
          row.pop('peer')
        row['ours'].update(ours_extra or {})
        rows.append(row)
        _log(row, kind)
        del compiled
        gc.collect()
    return rows

  def forward(self) -> List[Dict]:
    return self._sweep('forward', self.ours.forward,
                       lambda data, p: self.peer_lib.forward_fn(self.peer_model, data, p))

  def fwd_bwd(self) -> List[Dict]:
    return self._sweep('fwd_bwd', self.ours.forward_backward)

  def train(self) -> List[Dict]:
    optimizer_name = None
    if self.peer_model is not None:
      self.peer_optimizer, optimizer_name = self.peer_lib.make_optimizer(self.peer_model)
    optimizer = self.ours.optimizer_config(FLAGS.lamb)
    rows = self._sweep(
        'train', lambda *args: self.ours.train(*args, optimizer=optimizer),
        lambda data, p: self.peer_lib.train_step_fn(self.peer_model, self.peer_optimizer,
                                                    data, p),
        peer_extra={'optimizer': optimizer_name},
        ours_extra={'optimizer': self.ours.optimizer_name(optimizer)})
    if self.peer_model is not None:
      self.peer_model.eval()
    return rows


def _log(row, kind):
  peer = row.get('peer')
  peer_s = ''
  if peer is not None:
    peer_s = ', peer ' + (f'{peer["median_s"]:.3f} s' if isinstance(peer, dict) else str(peer))
  speed = f', speedup {row["speedup"]:.2f}x' if row.get('speedup') else ''
  print(f'{kind} {row["precision"]} b{row["batch"]}: ours {row["ours"]["median_s"]:.3f} s'
        f'{peer_s}{speed}', flush=True)


def _memory_points(settings, precisions) -> List[Dict]:
  seq = settings['seq_len']
  points = [dict(kind=kind, precision='float32', batch=1, seq_len=length)
            for kind in ('forward', 'train') for length in settings['memory_lengths']]
  for precision in precisions:
    if precision != 'float32' and settings['long_seq_len']:
      points.append(dict(kind='train', precision=precision, batch=1, seq_len=seq))
  long_len = FLAGS.long_seq_len and settings['long_seq_len']
  if long_len:
    # The same long config at the usual length too: the difference is the activations
    # alone (its position tables, hence parameters, are the same at both lengths).
    for kind in ('forward', 'train'):
      for length in (seq, long_len):
        points.append(dict(kind=kind, precision='float32', batch=1, seq_len=length,
                           max_seq_len=long_len))
  return points


def _data(settings, base_config, batch_sizes, train_rows) -> Dict:
  from bench import data_rate  # pylint: disable=import-outside-toplevel
  rates = [data_rate.measure(base_config, b, min_seconds=settings['data_min_seconds'],
                             block_size=settings['data_block_size'],
                             cache_dir=data_rate.default_cache_dir())
           for b in batch_sizes]
  needs = []
  for rate in rates:
    steps = [r for r in train_rows if r['batch'] == rate['batch']]
    if steps:
      fastest = min(steps, key=lambda r: r['ours']['median_s'])
      step_s = fastest['ours']['median_s']
      needs.append({'batch': rate['batch'], 'step_s': step_s,
                    'source': f'ours {fastest["precision"]}',
                    'headroom': rate['batches_per_s'] * step_s})
  return {'rates': rates, 'needs': needs}


def _write_json(results: Dict, path: str) -> None:
  """Writes ``results`` to ``path`` atomically (the previous file stays until replaced)."""
  from perceiver.command import atomic  # pylint: disable=import-outside-toplevel
  with atomic.atomic_write(path, 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)


def run(suite: str, out: Optional[str] = None) -> Dict:
  """Runs a suite and returns its results (also what --out writes).

  With ``out``, the results so far are written there after each part, so a run that is
  stopped (or killed) keeps what it measured.
  """
  from bench import memory  # pylint: disable=import-outside-toplevel
  from bench import report  # pylint: disable=import-outside-toplevel
  settings = _suite_settings(suite)
  if FLAGS.preset:
    settings['preset'] = FLAGS.preset
  if FLAGS.memory_lengths:
    settings['memory_lengths'] = [int(x) for x in FLAGS.memory_lengths]
  batch_sizes = [int(b) for b in (FLAGS.batch_sizes or settings['batch_sizes'])]
  settings['warmup'] = settings['warmup'] if FLAGS.warmup is None else FLAGS.warmup
  settings['repeats'] = settings['repeats'] if FLAGS.repeats is None else FLAGS.repeats
  precisions = list(FLAGS.precisions)
  for p in precisions:
    if p not in ('float32', 'bfloat16'):
      raise app.UsageError(f'--precisions: {p!r} is not float32 or bfloat16')
  parts = _parts(suite)
  results = {'meta': {
      'suite': suite, 'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
      'command': ' '.join(shlex.quote(a) for a in ['python', '-m', 'bench.run'] + sys.argv[1:]),
      'cpu_model': _cpu_model(), 'cores': os.cpu_count(), 'platform': platform.platform(),
      'versions': _versions(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'host_memory_retained': host_memory.retain_freed_memory(),
      'loadavg_start': _loadavg(), 'other_processes': _other_python_processes(),
      'warmup': settings['warmup'], 'repeats': settings['repeats'],
      'kernels': FLAGS.kernels, 'lamb': FLAGS.lamb,
  }}
  seconds = results['meta']['seconds'] = {}
  clock = time.perf_counter()

  def lap(name):
    nonlocal clock
    now = time.perf_counter()
    seconds[name] = round(now - clock, 1)
    clock = now
    if out:
      _write_json(results, out)

  if 'data_suite' in parts:
    from bench import data_rate  # pylint: disable=import-outside-toplevel
    results['data_suite'] = data_rate.suite()
    lap('data_suite')
    results['meta']['loadavg_end'] = _loadavg()
    return results
  if 'scale' in parts:
    from bench import scale  # pylint: disable=import-outside-toplevel
    results['scale'] = scale.measure(repeats=settings['repeats'], warmup=settings['warmup'],
                                     compile_memory=FLAGS.scale_compile)
    lap('scale')
    results['meta']['loadavg_end'] = _loadavg()
    return results
  if 'accelerator' in parts:
    from bench import accelerator  # pylint: disable=import-outside-toplevel
    results['accelerator'] = accelerator.measure(
        settings['preset'], batch_sizes, precisions, seq_len=settings['seq_len'],
        warmup=settings['warmup'], repeats=settings['repeats'], peak_flops=FLAGS.peak_flops,
        kernels=FLAGS.kernels)
    lap('accelerator')
    results['meta']['loadavg_end'] = _loadavg()
    return results
  # The memory sweep first, while this process is small: its points run in fresh
  # processes, which must not compete with the model, the peer and the heap this
  # process keeps (perceiver.training.host_memory) once the timed parts have run.
  if 'memory' in parts:
    results['memory'] = memory.sweep(settings['preset'], _memory_points(settings, precisions),
                                     fresh_process_each=settings['fresh_memory_process'])
    lap('memory')
  runner = None
  if {'peak', 'forward', 'train', 'data'} & set(parts):
    runner = Runner(settings, precisions, batch_sizes, FLAGS.peer == 'auto')
    results['meta']['peer'] = runner.peer_status
    params = runner.params
  else:
    params = None
  config = runner.base_config if runner else None
  results['config'] = {'preset': settings['preset'], 'seq_len': settings['seq_len']}
  if runner:
    param_bytes = runner.ours.param_bytes(params)
    results['config'].update(params=param_bytes // 4, param_bytes=param_bytes,
                             optimizer_state_bytes=2 * param_bytes,
                             analytic_forward_flops=runner.ours.analytic_flops(
                                 config, settings['seq_len'], 1, 'forward'))
  else:
    ok = [p for p in results.get('memory', []) if 'error' not in p]
    results['config'].update(params=ok[0]['param_bytes'] // 4 if ok else 0)
  lap('setup')
  if 'peak' in parts:
    results['peak'] = runner.measure_peak()
    lap('peak')
  if 'forward' in parts:
    results['forward'] = runner.forward()
    lap('forward')
  if 'train' in parts:
    results['fwd_bwd'] = runner.fwd_bwd()
    lap('fwd_bwd')
    results['train'] = runner.train()
    lap('train')
  if 'data' in parts:
    results['data'] = _data(settings, runner.base_config, batch_sizes,
                            results.get('train', []))
    lap('data')
  results['meta']['loadavg_end'] = _loadavg()
  results['targets'] = report.targets(results)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  results = run(FLAGS.suite, FLAGS.out)
  from bench import report  # pylint: disable=import-outside-toplevel
  if FLAGS.out:
    _write_json(results, FLAGS.out)
  print()
  if 'data_suite' in results:
    from bench import data_rate  # pylint: disable=import-outside-toplevel
    print(data_rate.render(results['data_suite']))
  elif 'accelerator' in results:
    from bench import accelerator  # pylint: disable=import-outside-toplevel
    print(accelerator.render(results['accelerator']))
  elif 'scale' in results:
    from bench import scale  # pylint: disable=import-outside-toplevel
    print(scale.render(results['scale']))
  else:
    print(report.render(results))
  return 0


if __name__ == '__main__':
  host_memory.retain_freed_memory()   # before JAX starts its threads: see perceiver.training.host_memory
  app.run(main)
