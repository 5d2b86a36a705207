r"""Peak memory of the forward pass and the train step against input length.

Each point runs in a fresh process (``python -m bench.memory --kind=train --seq_len=2048
...`` prints one JSON line), so that one point's high-water mark cannot hide another's.
Three figures per point:

- XLA's compiled memory statistics: arguments, outputs (less those aliased to donated
  arguments) and temporaries: the executable's own peak, independent of the process;
- ``step_peak_bytes``: the process's resident high-water mark while the step runs
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` once compiled and
  warmed up), so it includes the parameters and optimizer state held in memory;
  ``resident_before_bytes`` is the resident size just before (the step adds the rest);
- ``process_peak_bytes``: ``ru_maxrss`` of the whole process, set-up included.

Unlike training and the timed suites, these processes leave glibc's default of returning
freed memory to the system (``perceiver.training.host_memory`` is not applied), so that the resident
size falls back after set-up and the step's own high-water mark shows.

Activations are what grows with the input: ``marginal_bytes_per_input_byte`` is the
growth of XLA's temporaries from the previous (shorter) point of the same kind, precision
and ``max_seq_len``, per added input byte; constant across lengths means linear growth.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Dict, List, Optional

from absl import app
from absl import flags

from perceiver.training import host_memory

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vm_hwm_bytes() -> Optional[int]:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_hwm() -> bool:
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _ru_maxrss_bytes() -> int:
  # Linux reports kilobytes, macOS bytes.
  scale = 1 if sys.platform == 'darwin' else 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_point(preset: str, kind: str, precision: str, batch: int, seq_len: int,
                  max_seq_len: Optional[int] = None) -> Dict[str, object]:
  """Runs one point in this process (call it in a fresh one) and returns its figures."""
  import gc  # pylint: disable=import-outside-toplevel
  from bench import ours  # pylint: disable=import-outside-toplevel
  config = ours.model_config(preset, precision, max_seq_len)
  params = ours.init_params(config, config.max_seq_len)
  param_bytes = ours.param_bytes(params)
  data = ours.example_batch(batch, seq_len)
  build = {'forward': ours.forward, 'train': ours.train}[kind]
  compiled = build(config, params, data)
  del params   # the train step holds its own (replicated) state; the forward its params
  compiled.run()
  compiled.run()
  gc.collect()
  host_memory.release_freed_memory()
  reset = _reset_hwm()
  before = _vm_hwm_bytes() if reset else None
  compiled.run()
  step_peak = _vm_hwm_bytes() if reset else None
  state_bytes = param_bytes * (3 if kind == 'train' else 1)   # params + two moments
  input_bytes = batch * seq_len
  xla = compiled.memory
  return {
      'kind': kind, 'precision': precision, 'batch': batch, 'seq_len': seq_len,
      'max_seq_len': config.max_seq_len, 'param_bytes': param_bytes,
      'state_bytes': state_bytes, 'xla': xla,
      'temp_bytes_per_input_byte': xla.get('temp', 0) / input_bytes,
      'resident_before_bytes': before, 'step_peak_bytes': step_peak,
      'process_peak_bytes': _ru_maxrss_bytes(),
  }


def run_points(preset: str, points: List[Dict[str, object]], timeout: float = 1800
               ) -> List[Dict[str, object]]:
  """``measure_point`` for each point, in turn, in one fresh Python process.

  An error is returned in place of the points, not raised. Only the first point's
  ``process_peak_bytes`` is its own; later ones carry the process's history too.
  """
  args = [sys.executable, '-m', 'bench.memory', f'--preset={preset}',
          f'--points={json.dumps(points)}']
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [_ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  try:
    done = subprocess.run(args, cwd=_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return [dict(point, error=f'timed out after {timeout:.0f} s') for point in points]
  results = [json.loads(l) for l in done.stdout.splitlines() if l.startswith('{')]
  if done.returncode or len(results) != len(points):
    tail = ' | '.join((done.stderr or done.stdout).strip().splitlines()[-3:])
    results += [dict(point, error=f'exit {done.returncode}: {tail}')
                for point in points[len(results):]]
  for i, result in enumerate(results):
    result['fresh_process'] = i == 0
  return results


def sweep(preset: str, points: List[Dict[str, object]], fresh_process_each: bool = True
          ) -> List[Dict[str, object]]:
  """Every point ({kind, precision, batch, seq_len[, max_seq_len]}), each in its own
  process (or all in one when not ``fresh_process_each``: quicker, for smoke runs)."""
  if fresh_process_each:
    results = [r for point in points for r in run_points(preset, [point])]
  else:
    results = run_points(preset, points)
  add_marginal(results)
  return results


def add_marginal(results: List[Dict[str, object]]) -> None:
  """Sets ``marginal_bytes_per_input_byte`` against the previous shorter point."""
  previous = {}
  for point in sorted((p for p in results if 'error' not in p),
                      key=lambda p: (p['kind'], p['precision'], p['max_seq_len'],
                                     p['batch'] * p['seq_len'])):
    key = (point['kind'], point['precision'], point['max_seq_len'])
    before = previous.get(key)
    if before is not None:
      added = point['batch'] * point['seq_len'] - before['batch'] * before['seq_len']
      point['marginal_bytes_per_input_byte'] = (
          (point['xla']['temp'] - before['xla']['temp']) / added if added else None)
    previous[key] = point


FLAGS = flags.FLAGS


def main(argv):
  del argv
  for point in json.loads(FLAGS.points):
    print(json.dumps(measure_point(FLAGS.preset, **point)), flush=True)


if __name__ == '__main__':
  # Defined only when run as a command: bench.run, which imports this module, has its
  # own --preset.
  flags.DEFINE_string('preset', 'language_mlm', 'Model preset (perceiver.configs).')
  flags.DEFINE_string('points', '[{"kind": "train", "precision": "float32", "batch": 1, '
                      '"seq_len": 2048}]',
                      'JSON list of points: {kind: forward|train, precision, batch, seq_len'
                      '[, max_seq_len]}; each result is printed as one JSON line.')
  app.run(main)
