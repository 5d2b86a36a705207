r"""Host memory and time of saving a run's checkpoint: orbax (async) against the old npz.

    python -m bench.checkpoint_memory --preset=released    # 201M parameters + 2 LAMB moments
    python -m bench.checkpoint_memory --preset=tiny        # a seconds-long check

Orbax's users report about 3x the state's size in host memory while saving, and async
saves that never finish (orbax issues #392 and #1640). Each path runs in a fresh process
(``--path=orbax`` or ``--path=npz`` prints one JSON line), so that one's high-water mark
cannot hide the other's. The state (parameters, LAMB's two moments, RNG key, step) is
made on the device with random values, then saved ``--saves`` times in a row,
the way a run saves (orbax: each save waits for the one before; keep 1):

- ``state_bytes``: the state's size;
- ``resident_before_bytes``: the process's resident size just before the first save (the
  state lives in it: on a CPU the device's memory is the host's);
- ``save_peak_bytes``: the resident high-water mark during the saves (``VmHWM``, reset
  through ``/proc/self/clear_refs`` before the first), and ``extra_over_state``: what the
  saves added above ``resident_before_bytes``, over ``state_bytes`` (the "3x" is 2 here);
- ``blocking_s``: per save, the time until ``save`` returned, i.e. until the step loop
  could go on (orbax: the copy off the devices; npz: the whole write, gathered first);
- ``total_s``: per save, the time until the checkpoint was complete on disk;
- ``hung``: whether a save did not complete within ``--hang_after_s`` (a watchdog).

The checkpoints go to ``--dir`` (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_enum('preset', 'tiny', ['tiny', 'released'], 'The model whose state is saved: '
                  "the released 201M-parameter masked LM, or the tests' tiny one.")
flags.DEFINE_enum('path', None, ['orbax', 'npz'], 'Measure one path in this process '
                  '(default: both, each in a fresh process).')
flags.DEFINE_integer('saves', 3, 'Saves in a row (orbax: each waits for the one before).')
flags.DEFINE_float('hang_after_s', 900.0, 'A save not complete after this long is a hang.')
flags.DEFINE_string('dir', None, 'Where the checkpoints go (default: a temporary directory).')


def _status_bytes(field):
  with open('/proc/self/status', encoding='utf-8') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  return None


def _reset_hwm():
  with open('/proc/self/clear_refs', 'w', encoding='utf-8') as f:
    f.write('5')


def _state(preset):
  """(model config, TrainState) of random values, made on the device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from perceiver import configs  # pylint: disable=import-outside-toplevel
  from perceiver import transform  # pylint: disable=import-outside-toplevel
  from perceiver.training import optim  # pylint: disable=import-outside-toplevel
  from perceiver.training import step as step_lib  # pylint: disable=import-outside-toplevel
  from train.configs import mlm as mlm_configs  # pylint: disable=import-outside-toplevel
  config = configs.language_mlm() if preset == 'released' else configs.tiny()
  model = transform.masked_lm(config)
  optimizer = optim.make(mlm_configs.get_config('smoke').optimizer)
  shapes = jax.eval_shape(step_lib.new_state_fn(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)), optimizer,
      jax.random.PRNGKey(1)))

  # Random values (zstd, which orbax applies, cannot shrink them much), drawn by numpy:
  # jax's threefry over 600M values takes minutes on a small CPU.
  rng = np.random.default_rng(0)

  def one(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      value = rng.random(x.shape, dtype=np.float32).astype(x.dtype) - 0.5
    else:
      value = np.zeros(x.shape, x.dtype)
    return jax.device_put(value)

  state = jax.tree.map(one, shapes)
  jax.block_until_ready(state)
  return config, state


def _measure(path_kind, preset, saves, hang_after_s, directory):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  config, state = _state(preset)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  blocking, total = [], []
  hung = threading.Event()
  if path_kind == 'orbax':
    from perceiver.training import run_checkpoints  # pylint: disable=import-outside-toplevel
    run_checkpoints._ocp()  # pylint: disable=protected-access  # the import is not the save's
    manager = run_checkpoints.CheckpointManager(directory, keep=1)
  resident_before = _status_bytes('VmRSS')
  _reset_hwm()
  for step in range(1, saves + 1):
    start = time.perf_counter()
    if path_kind == 'orbax':
      manager.save(step, state.params, config, opt_state=state.opt_state, rng=state.rng,
                   data_state={'step': step})
      blocking.append(time.perf_counter() - start)
      watchdog = threading.Timer(hang_after_s, hung.set)
      watchdog.start()
      manager.wait()   # where the next save (or the run's end) would wait
      watchdog.cancel()
    else:
      from perceiver.params import params_file  # pylint: disable=import-outside-toplevel
      from perceiver.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
      host = mesh_lib.to_host(state)   # the old path: gathered, then one file written
      if not all(np.isfinite(x).all() for x in jax.tree.leaves(host.params)):
        raise RuntimeError('non-finite parameters')
      params_file.save(os.path.join(directory, f'ckpt_{step:09d}.npz'), host.params, config,
                       trees={'opt_state': host.opt_state, 'rng': host.rng}, step=step)
      del host
      blocking.append(time.perf_counter() - start)
    total.append(time.perf_counter() - start)
    if hung.is_set():
      break
  peak = _status_bytes('VmHWM')
  if path_kind == 'orbax':
    manager.close()
  return {'path': path_kind, 'preset': preset, 'devices': jax.device_count(),
          'state_bytes': int(state_bytes), 'resident_before_bytes': resident_before,
          'save_peak_bytes': peak,
          'extra_over_state': round((peak - resident_before) / state_bytes, 3),
          'peak_over_state': round(peak / state_bytes, 3),
          'blocking_s': [round(t, 3) for t in blocking], 'total_s': [round(t, 3) for t in total],
          'hung': hung.is_set(), 'saves_completed': len(total) - int(hung.is_set())}


def main(argv):
  del argv
  if FLAGS.path:
    directory = FLAGS.dir or tempfile.mkdtemp(prefix='ckpt_bench_')
    try:
      print(json.dumps(_measure(FLAGS.path, FLAGS.preset, FLAGS.saves, FLAGS.hang_after_s,
                                directory)))
    finally:
      if not FLAGS.dir:
        shutil.rmtree(directory, ignore_errors=True)
    return 0
  rows = []
  for path_kind in ('orbax', 'npz'):
    done = subprocess.run(
        [sys.executable, '-m', 'bench.checkpoint_memory', f'--path={path_kind}',
         f'--preset={FLAGS.preset}', f'--saves={FLAGS.saves}',
         f'--hang_after_s={FLAGS.hang_after_s}'] + ([f'--dir={FLAGS.dir}/{path_kind}']
                                                     if FLAGS.dir else []),
        cwd=_ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
      print(done.stderr[-3000:], file=sys.stderr)
      return 1
    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
  print('| path | state | resident before | save peak | (peak - before) / state | '
        'blocking s | complete s | hung |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["path"]} | {r["state_bytes"] / 2**30:.2f} GiB | '
          f'{r["resident_before_bytes"] / 2**30:.2f} GiB | {r["save_peak_bytes"] / 2**30:.2f} GiB | '
          f'{r["extra_over_state"]:.2f} | {", ".join(f"{t:.2f}" for t in r["blocking_s"])} | '
          f'{", ".join(f"{t:.2f}" for t in r["total_s"])} | {r["hung"]} |')
  for r in rows:
    print(json.dumps(r))
  return 0


if __name__ == '__main__':
  app.run(main)
