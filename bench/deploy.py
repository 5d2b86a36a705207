r"""An export's size, and its load-and-first-call time against building the model from source.

    python -m bench.deploy --preset=language_mlm --workdir=/tmp/deploy

Writes a checkpoint of the preset's architecture (random weights: sizes and times do not
depend on the values) in this project's format, exports it with ``perceiver.deploy.export``
(float32 and bfloat16 weights), then, each in a fresh Python process, times one batch of
``--batch`` x the window:

- ``source``: ``import perceiver``, ``loading.load_any`` the checkpoint, build
  ``transform.masked_lm(config)`` and ``jax.jit`` its ``apply`` (as README's "Using the
  model in your code"), first call (trace, compile, run), second call;
- ``artifact``: ``import perceiver_load`` (jax and safetensors only), ``load`` the export
  directory, first call (compile, run), second call.

Both run the same computation (the original's formulation); each phase's seconds and
the process's whole wall-clock time (interpreter start included) are reported, the
median of ``--repeats`` processes. Figures: bench/RESULTS.md ("Deploy").
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from perceiver.params import params_file
from perceiver import configs
from perceiver.deploy import export
from perceiver import transform

import perceiver_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = '''
import json, sys, time
start = time.perf_counter()
marks = {}
def mark(name):
  marks[name] = time.perf_counter() - start - sum(marks.values())
'''

SOURCE = _PRELUDE + '''
import jax, numpy as np
import perceiver
from perceiver.params import loading
from perceiver import transform
mark('import')
params, config, _ = loading.load_any(sys.argv[1])
mark('load')
apply = jax.jit(transform.masked_lm(config).apply)
ids = np.full((int(sys.argv[2]), config.max_seq_len), 7, np.int32)
mask = np.ones_like(ids)
apply(params, None, ids, mask).block_until_ready()
mark('first_call')
apply(params, None, ids, mask).block_until_ready()
mark('second_call')
print(json.dumps(marks))
'''

ARTIFACT = _PRELUDE + '''
import numpy as np
import perceiver_load
mark('import')
model = perceiver_load.load(sys.argv[1])
mark('load')
ids = np.full((int(sys.argv[2]), model.max_seq_len), 7, np.int32)
model(ids, np.ones_like(ids))
mark('first_call')
model(ids, np.ones_like(ids))
mark('second_call')
print(json.dumps(marks))
'''


def random_checkpoint(preset: str, path: str, seed: int = 0) -> str:
  """A checkpoint of ``preset``'s masked LM with N(0, 0.02) weights, written to ``path``."""
  config = configs.get(preset)
  shapes = jax.eval_shape(transform.masked_lm(config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32),
                        shapes)
  return params_file.save(path, params, config)


def directory_size(path: str) -> Dict[str, int]:
  return {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def time_process(script: str, target: str, batch: int) -> Dict[str, float]:
  """One fresh process running ``script``: its phases' seconds and its wall-clock time."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-c', script, target, str(batch)], env=env,
                        capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f'timed process failed:\n{proc.stderr[-3000:]}')
  marks = json.loads(proc.stdout.strip().splitlines()[-1])
  marks['process_wall'] = wall
  return marks


def median_runs(script, target, batch, repeats) -> Dict[str, float]:
  runs = [time_process(script, target, batch) for _ in range(repeats)]
  return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run(preset: str, workdir: str, batch: int, repeats: int,
        dtypes: Sequence[str]) -> Dict:
  os.makedirs(workdir, exist_ok=True)
  ckpt = os.path.join(workdir, f'{preset}.npz')
  if not os.path.exists(ckpt):
    random_checkpoint(preset, ckpt)
  results: Dict = {'preset': preset, 'batch': batch, 'repeats': repeats,
                   'jax': jax.__version__, 'checkpoint_bytes': os.path.getsize(ckpt),
                   'exports': {}}
  print(f'{preset}: checkpoint {os.path.getsize(ckpt) / 1e6:.1f} MB', flush=True)
  results['source'] = median_runs(SOURCE, ckpt, batch, repeats)
  print(f'  source: {results["source"]}', flush=True)
  for dtype in dtypes:
    out = os.path.join(workdir, f'export-{dtype}')
    start = time.perf_counter()
    export.export(ckpt, out, dtype=dtype, overwrite=True)
    seconds = time.perf_counter() - start
    timing = median_runs(ARTIFACT, out, batch, repeats)
    results['exports'][dtype] = {'export_seconds': seconds, 'files': directory_size(out),
                                 'artifact': timing}
    print(f'  export {dtype}: {seconds:.1f} s, files {directory_size(out)}', flush=True)
    print(f'  artifact {dtype}: {timing}', flush=True)
  return results


def table(results: Dict) -> List[str]:
  """The Markdown rows of bench/RESULTS.md's "Deploy" table."""
  phases = ('import', 'load', 'first_call', 'second_call', 'process_wall')
  rows = ['| | size on disk | ' + ' | '.join(p.replace('_', ' ') for p in phases) + ' |',
          '|---|---|' + '---|' * len(phases)]
  source = results['source']
  rows.append(f'| from source (checkpoint, `import perceiver`) | '
              f'{results["checkpoint_bytes"] / 1e6:.1f} MB | ' +
              ' | '.join(f'{source[p]:.2f} s' for p in phases) + ' |')
  for dtype, entry in results['exports'].items():
    files = entry['files']
    size = (f'{sum(files.values()) / 1e6:.1f} MB (program '
            f'{files[perceiver_load.PROGRAM] / 1e3:.0f} kB)')
    rows.append(f'| export, {dtype} weights (`perceiver_load`) | {size} | ' +
                ' | '.join(f'{entry["artifact"][p]:.2f} s' for p in phases) + ' |')
  return rows


FLAGS = flags.FLAGS


def main(argv):
  del argv
  results = run(FLAGS.preset, FLAGS.workdir, FLAGS.batch, FLAGS.repeats, FLAGS.dtypes)
  print('\n'.join(table(results)))
  if FLAGS.out:
    with open(FLAGS.out, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  flags.DEFINE_string('preset', 'language_mlm', 'Model preset (perceiver.configs).')
  flags.DEFINE_string('workdir', '/tmp/perceiver-deploy-bench', 'Where the checkpoint and '
                      'exports are written (about 2.3 GB for language_mlm).')
  flags.DEFINE_integer('batch', 1, 'Batch size of the timed calls.')
  flags.DEFINE_integer('repeats', 1, 'Processes per measurement (median reported).')
  flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Export weight dtypes.')
  flags.DEFINE_string('out', None, 'Also write the results as JSON here.')
  app.run(main)
