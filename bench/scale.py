r"""The train step over a device mesh: ``bench.run --suite=scale``.

Two parts, each in a fresh process started with simulated CPU devices
(``--xla_force_host_platform_device_count``, which JAX reads at start-up):

- ``time``: on 8 devices, the train step data-parallel (state replicated) and FSDP (state
  split over all 8), timed interleaved in one process, with the per-device state bytes
  of each (the placement's, and the compiled step's argument bytes);
- ``memory``: nothing run: the step of the released model, Perceiver IO++ and a ~1B
  parameter configuration lowered and compiled over meshes of fsdp 1, 8 and 64 devices at
  per-device batch 1, and XLA's memory analysis of each program: per device, the state
  (arguments), and the peak (arguments + outputs - donated aliases + temporaries). The
  model is built as for a GPU (``platform='cuda'``: the original's
  formulation, optax's LAMB) and compiled by XLA:CPU, so temporaries are the CPU
  compiler's estimate of that program's buffers, not a GPU's. With ``--depths=a,b[,c]`` each configuration is
  compiled with that many latent self-attention layers instead of its own 26, 40 or 36 (a
  full-depth step takes XLA:CPU many minutes to compile on a small machine), and each
  figure is extended to the full depth along the line through the two largest depths:
  every layer adds the same parameters, optimizer state and activations, so the figures
  are close to linear in the depth (the parameters and state exactly; the compiler's
  temporaries less so); a third, smaller depth measures how far from that line they are
  (``depth_fit_error``, reported).

    python -m bench.run --suite=scale --out=scale.json
    python -m bench.scale --part=memory --devices=64 --presets=language_mlm   # one part
    python -m bench.scale --part=memory --devices=64 --depths=2,4,6          # by depth
    python -m bench.scale --part=memory --devices=8 --presets=language_mlm --fsdp=1 \
        --remat=none,block --batch=1,8 --depths=2,4       # rematerialisation, by batch

``--remat`` compiles each program under each rematerialisation policy (the model config's
``remat``) and ``--batch`` at each per-device batch; every row names both. The memory part
runs with ``--xla_disable_hlo_passes=cse_barrier_expander`` (``MEMORY_XLA_FLAGS``):
XLA:CPU otherwise turns optimization barriers into control dependencies before merging
common subexpressions, which merges each recomputed block back into the forward pass,
where a GPU or TPU compiler keeps the barrier. It changes no program without barriers
(the GPU program without remat has none).

What the temporaries hold (weights gathered whole, gradients all-reduced whole, the rest)
and which part divides with fsdp: add ``--xla_dump_to=DIR`` to ``XLA_FLAGS`` and read the
dumped programs with ``python -m bench.live DIR`` (its docstring says what XLA:CPU does
there that a GPU compiler does not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

from absl import app
from absl import flags

ONE_BILLION = dict(d_model=768, d_latents=2560, num_latents=256, num_self_attends=36,
                   max_seq_len=2048, qk_channels=256, num_heads=8)
PRESETS = ('language_mlm', 'language_mlm_plusplus', 'one_billion')
FSDP = (1, 8, 64)
# The memory part's XLA:CPU keeps optimization barriers as GPU and TPU compilers do.
MEMORY_XLA_FLAGS = '--xla_disable_hlo_passes=cse_barrier_expander'
# The depths the suite compiles at, extended to each model's own (the module docstring).
DEPTHS = (2, 4, 6)
REMATS = ('none', 'block')


def _model_config(preset: str):
  from perceiver import configs  # pylint: disable=import-outside-toplevel
  if preset == 'one_billion':
    return configs.language(**ONE_BILLION)
  return configs.get(preset)


def _mesh_config(data: int, fsdp: int):
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict({'data': data, 'fsdp': fsdp})


def time_part(preset: str, seq_len: int, warmup: int, repeats: int) -> Dict:
  """Replicated against FSDP on all devices of this process, same model and batch."""
  import jax  # pylint: disable=import-outside-toplevel
  from bench import ours  # pylint: disable=import-outside-toplevel
  from bench import timing  # pylint: disable=import-outside-toplevel
  from perceiver import configs  # pylint: disable=import-outside-toplevel
  from perceiver.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  devices = jax.device_count()
  config = configs.PRESETS[preset](max_seq_len=seq_len)   # small or tiny
  params = ours.init_params(config, seq_len)
  batch = ours.example_batch(devices, seq_len)
  rows, runs = {}, {}
  for name, (data, fsdp) in (('replicated', (devices, 1)), ('fsdp', (1, devices))):
    mesh = mesh_lib.make(_mesh_config(data, fsdp))
    compiled = ours.train(config, params, batch, mesh_config=_mesh_config(data, fsdp))
    runs[name] = compiled.run
    shapes = jax.eval_shape(lambda p: p, params)
    param_bytes = mesh_lib.per_device_bytes(shapes, mesh_lib.state_shardings(mesh, shapes))
    rows[name] = {'mesh': mesh_lib.describe(mesh), 'per_device_param_bytes': param_bytes,
                  'per_device_state_bytes_placed': 3 * param_bytes,
                  'xla_memory': compiled.memory}
  times = timing.interleaved(runs, warmup=warmup, repeats=repeats)
  for name in rows:
    rows[name]['step'] = timing.summary(times[name])
  return {'preset': preset, 'seq_len': seq_len, 'devices': devices,
          'params': sum(int(x.size) for x in jax.tree.leaves(params)), 'rows': rows,
          'fsdp_over_replicated': (rows['fsdp']['step']['median_s'] /
                                   rows['replicated']['step']['median_s'])}


_FIELDS = ('argument', 'output', 'alias', 'temp')


def _gpu_run(config, opt, fsdp: int):
  """The run of ``config`` and ``opt`` over fsdp ``fsdp`` as built for a GPU
  (``platform='cuda'``), and its masked LM (``train.mlm.build``; nothing compiled)."""
  import jax  # pylint: disable=import-outside-toplevel
  from perceiver.training import driver  # pylint: disable=import-outside-toplevel
  from train import mlm  # pylint: disable=import-outside-toplevel
  run = driver.Run.create(_mesh_config(1, fsdp), opt, config, jax.devices()[:fsdp],
                          platform='cuda')
  return run, mlm.build(run)


def _compiled_memory(config, opt, fsdp: int, batch: int = 1) -> Dict:
  """XLA's memory analysis of the train step of ``config`` over fsdp ``fsdp`` at
  per-device batch ``batch``, per device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from perceiver.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from train import mlm  # pylint: disable=import-outside-toplevel
  seq = config.max_seq_len
  run, built = _gpu_run(config, opt, fsdp)
  step = run.train_step(built.loss_fn, mlm.count_fn, built.shardings)
  batch_sharding = mesh_lib.batch_sharding(run.mesh, True)
  batch = {k: jax.ShapeDtypeStruct((1, fsdp * batch, seq), dtype, sharding=batch_sharding)
           for k, dtype in (('input_ids', jnp.int32), ('input_mask', jnp.int32),
                            ('labels', jnp.int32), ('weights', jnp.float32))}
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       built.shapes, built.shardings)
  analysis = step.lower(state, batch).compile().memory_analysis()
  row = {'params': sum(int(x.size) for x in jax.tree.leaves(built.shapes.params)),
         'state_bytes_placed': mesh_lib.per_device_bytes(built.shapes, built.shardings)}
  for field in _FIELDS:
    row[field] = int(getattr(analysis, f'{field}_size_in_bytes'))
  return row


def _placed_bytes(config, opt, fsdp: int) -> int:
  """Per-device bytes of parameters and optimizer state by the placement rules alone."""
  from perceiver.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  _, built = _gpu_run(config, opt, fsdp)
  return mesh_lib.per_device_bytes(built.shapes, built.shardings)


def _peak(row: Dict) -> int:
  return row['argument'] + row['output'] - row['alias'] + row['temp']


def extend_to_depth(rows: Dict[int, Dict], depth: int) -> Dict:
  """The figures at ``depth`` on the line through the two largest measured depths of
  ``rows`` ({depth: figures}: the nearest to ``depth``); with more depths,
  ``depth_fit_error``: the largest relative distance of their peaks from that line."""
  ordered = sorted(rows.items())
  (d0, r0), (d1, r1) = ordered[-2:]
  line = lambda key, d: r0[key] + (r1[key] - r0[key]) * (d - d0) / (d1 - d0)
  out = {key: int(round(line(key, depth)))
         for key in ('params', 'state_bytes_placed') + _FIELDS}
  out['peak'] = _peak(out)
  out['measured_depths'] = sorted(rows)
  if len(rows) > 2:
    errors = []
    for d, r in ordered[:-2]:
      fitted = _peak({key: line(key, d) for key in _FIELDS})
      errors.append(abs(fitted - _peak(r)) / _peak(r))
    out['depth_fit_error'] = max(errors)
  return out


def memory_part(presets: List[str], fsdp_sizes: List[int],
                depths: Optional[List[int]] = None, remats=('none',),
                batches=(1,)) -> List[Dict]:
  """Compiled memory analysis of the step per preset, fsdp size, rematerialisation policy
  and per-device batch (nothing runs), at the presets' own depth or extended from
  ``depths`` (see the module docstring)."""
  import itertools  # pylint: disable=import-outside-toplevel
  from train.configs import mlm as mlm_configs  # pylint: disable=import-outside-toplevel
  out = []
  opt = mlm_configs.get_config('paper').optimizer
  for preset, remat in itertools.product(presets, remats):
    config = _model_config(preset)
    config.remat = remat
    full_depth = config.encoder.num_self_attends_per_block
    for fsdp, batch in itertools.product(fsdp_sizes, batches):
      head = {'preset': preset, 'fsdp': fsdp, 'per_device_batch': batch, 'remat': remat,
              'seq_len': config.max_seq_len, 'depth': full_depth}
      if not depths:
        row = dict(head, **_compiled_memory(config, opt, fsdp, batch))
        row['peak'] = _peak(row)
      else:
        measured = {}
        for depth in depths:
          shallow = config.copy_and_resolve_references()
          shallow.encoder.num_self_attends_per_block = depth
          measured[depth] = _compiled_memory(shallow, opt, fsdp, batch)
          print(json.dumps(dict(head, depth=depth, **measured[depth])), file=sys.stderr,
                flush=True)
        row = dict(head, **extend_to_depth(measured, full_depth))
        row['measured'] = {str(d): dict(r, peak=_peak(r)) for d, r in measured.items()}
        # What the placement rules give at the full depth, exactly (no compile): the
        # extension must meet it.
        row['state_bytes_placed_exact'] = _placed_bytes(config, opt, fsdp)
      print(json.dumps(row), file=sys.stderr, flush=True)
      out.append(row)
  return out


def placed_state(presets=PRESETS, fsdp_sizes=FSDP) -> List[Dict]:
  """Per-device bytes of the state by the placement rules alone (``mesh.rule``; no
  device, no compile): parameters, LAMB's two moments and the gradients, float32."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from perceiver import transform  # pylint: disable=import-outside-toplevel
  from perceiver.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  rows = []
  for preset in presets:
    config = _model_config(preset)
    model = transform.masked_lm(config, platform='cuda')
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, config.max_seq_len), jnp.int32)))
    params = sum(int(x.size) for x in jax.tree.leaves(shapes))
    for fsdp in fsdp_sizes:
      shard = 0
      for x in jax.tree.leaves(shapes):
        spec = mesh_lib.rule(x.shape, fsdp)[1]
        size = int(np.prod(x.shape))
        shard += size // fsdp if 'fsdp' in tuple(spec) else size
      rows.append({'preset': preset, 'params': params, 'fsdp': fsdp,
                   'param_bytes': 4 * shard, 'state_and_grad_bytes': 4 * 4 * shard})
  return rows


def run_in_process(part: str, devices: int, **kwargs) -> object:
  """Runs one part in a fresh process with ``devices`` simulated CPU devices."""
  args = [sys.executable, '-m', 'bench.scale', f'--part={part}', f'--devices={devices}']
  args += [f'--{k}={",".join(map(str, v)) if isinstance(v, (list, tuple)) else v}'
           for k, v in kwargs.items()]
  xla_flags = f'--xla_force_host_platform_device_count={devices}'
  if part == 'memory':
    xla_flags += ' ' + MEMORY_XLA_FLAGS
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(args, cwd=root, env=env, stdout=subprocess.PIPE, text=True,
                        check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def measure(time_preset: str = 'small', time_seq_len: int = 128, warmup: int = 1,
            repeats: int = 5, presets=PRESETS, fsdp_sizes=FSDP, compile_memory: bool = True,
            depths=DEPTHS) -> Dict:
  """What ``bench.run --suite=scale`` records: the timed part, the state each device
  holds by the placement rules, and (``compile_memory``) the compiled memory analysis
  with remat off and on (the big models' steps 18 times at each depth: long on a small
  CPU), the released model's at per-device batches 1 and 8, and the GPU presets judged
  from those."""
  result = {'time': run_in_process('time', 8, preset=time_preset, seq_len=time_seq_len,
                                   warmup=warmup, repeats=repeats)}
  result['placed'] = placed_state(presets, fsdp_sizes)
  extra = {'depths': list(depths)} if depths else {}
  result['memory'] = run_in_process('memory', max(fsdp_sizes), presets=list(presets),
                                    fsdp=list(fsdp_sizes), remat=list(REMATS),
                                    **extra) if compile_memory else []
  if compile_memory:
    result['remat_batch'] = run_in_process('memory', 1, presets=['language_mlm'], fsdp=[1],
                                           remat=list(REMATS), batch=[1, 8], **extra)
    result['gpu_presets'] = gpu_presets(result['remat_batch'])
  return result


def added_per_sequence(one: Dict, eight: Dict) -> List[float]:
  """Bytes of peak each sequence adds from per-device batch 1 to 8, at the full depth and
  at each depth compiled (the extension of a difference of two peaks, each the largest of
  several program points, is less sure than that of a peak, so both are kept)."""
  out = [(eight['peak'] - one['peak']) / 7]
  for depth, row in sorted(one.get('measured', {}).items()):
    out.append((eight['measured'][depth]['peak'] - row['peak']) / 7)
  return out


def gpu_presets(memory_rows: List[Dict], mfu: float = 0.45) -> List[Dict]:
  """The GPU presets of ``train/configs/mlm.py`` (``GPU_HOSTS``) judged from the compiled
  memory of the released model's step with remat 'block' on one device (``memory_rows``:
  per-device batches 1 and 8): the per-device peak at the preset's batch is batch 1's
  peak, plus for each added sequence the largest of ``added_per_sequence`` and every
  layer's saved input (float32 latents), plus one float32 copy of the parameters for the
  gradient accumulator when it accumulates; then the largest power-of-two batch within
  the margin, and at ``mfu`` of the device's peak the optimizer steps per second (FLOPs
  of ``perceiver.model.flops``) and the days to the preset's steps."""
  from perceiver.model import flops  # pylint: disable=import-outside-toplevel
  from train.configs import mlm as mlm_configs  # pylint: disable=import-outside-toplevel
  by_batch = {r['per_device_batch']: r for r in memory_rows
              if r['preset'] == 'language_mlm' and r['fsdp'] == 1 and r['remat'] == 'block'}
  model = mlm_configs.get_config('paper').model
  saved_inputs = 4 * model.encoder.z_index_dim * model.encoder.num_z_channels * (
      model.encoder.num_self_attends_per_block)
  per_sequence = max(added_per_sequence(by_batch[1], by_batch[8])) + saved_inputs
  out = []
  for name in ('gpu_24gb', 'gpu_80gb', 'gpus_8x80gb', 'gpu_24gb_short'):
    host = mlm_configs.GPU_HOSTS[name.replace('_short', '')]
    config = mlm_configs.get_config(name)
    limit = (1 - mlm_configs.GPU_MARGIN) * host['memory_gib'] * 2**30
    accumulator = 4 * by_batch[1]['params'] if config.train.grad_accum_steps > 1 else 0
    peak_at = lambda batch, accumulator=accumulator: (
        by_batch[1]['peak'] + (batch - 1) * per_sequence + accumulator)
    largest = 1
    while peak_at(2 * largest) <= limit:
      largest *= 2
    step_flops = flops.masked_lm_train_step(config.model, config.model.max_seq_len,
                                            config.train.batch_size)
    steps_per_s = mfu * host['devices'] * host['peak_flops'] / step_flops
    out.append({'preset': name, 'devices': host['devices'], 'memory_gib': host['memory_gib'],
                'per_device_batch': host['per_device_batch'], 'largest_fitting': largest,
                'grad_accum_steps': config.train.grad_accum_steps,
                'global_batch': config.train.batch_size, 'steps': config.train.steps,
                'peak_bytes': int(peak_at(host['per_device_batch'])),
                'steps_per_s': steps_per_s,
                'days': config.train.steps / steps_per_s / 86400})
  return out


def _gb(n: int) -> str:
  return f'{n / 2**30:.2f}'


def render(result: Dict) -> str:
  t = result['time']
  lines = [f'Train step on {t["devices"]} simulated CPU devices, preset {t["preset"]} at '
           f'{t["seq_len"]} bytes ({t["params"]:,} parameters), global batch {t["devices"]}:',
           '| layout | median step s | spread | per-device parameter bytes | compiled '
           'argument bytes |', '|---|---|---|---|---|']
  for name, row in t['rows'].items():
    lines.append(f'| {name} ({row["mesh"]}) | {row["step"]["median_s"]:.3f} | '
                 f'{row["step"]["spread"]:.0%} | {row["per_device_param_bytes"]:,} | '
                 f'{row["xla_memory"].get("argument", 0):,} |')
  lines.append(f'FSDP / replicated step time: {t["fsdp_over_replicated"]:.2f}')
  if result.get('placed'):
    lines += ['', 'Per-device state by the placement rules (float32 parameters, 2 LAMB '
              'moments and the gradients; GiB):',
              '| model | parameters | fsdp | parameters | with LAMB state and gradients |',
              '|---|---|---|---|---|']
    for row in result['placed']:
      lines.append(f'| {row["preset"]} | {row["params"] / 1e6:.0f}M | {row["fsdp"]} | '
                   f'{_gb(row["param_bytes"])} | {_gb(row["state_and_grad_bytes"])} |')
  if result.get('memory'):
    lines += ['', 'Compiled per-device memory (GiB) of the train step, per-device batch 1, '
              'from XLA memory analysis (nothing run):',
              '| model | parameters | fsdp | remat | state (arguments) | temporaries | peak | '
              'compiled at depths | depth fit error |', '|---|---|---|---|---|---|---|---|---|']
    for row in result['memory']:
      depths = ','.join(map(str, row.get('measured_depths', [row.get('depth')])))
      fit = row.get('depth_fit_error')
      lines.append(f'| {row["preset"]} | {row["params"] / 1e6:.0f}M | {row["fsdp"]} | '
                   f'{row.get("remat", "none")} | {_gb(row["argument"])} | '
                   f'{_gb(row["temp"])} | {_gb(row["peak"])} | {depths} | '
                   f'{"" if fit is None else f"{fit:.2%}"} |')
  return '\n'.join(lines + _render_remat(result))


def _render_remat(result: Dict) -> List[str]:
  lines = []
  if result.get('remat_batch'):
    lines += ['', 'Released model, one device: compiled peak (GiB) by remat and per-device '
              'batch, and the peak each added sequence adds (MiB; full depth by extension, '
              'then at each depth compiled):',
              '| remat | batch 1 | batch 8 | per added sequence |', '|---|---|---|---|']
    rows = {(r['remat'], r['per_device_batch']): r for r in result['remat_batch']}
    for remat in sorted({r for r, _ in rows}):
      one, eight = rows[(remat, 1)], rows[(remat, 8)]
      added = ', '.join(f'{x / 2**20:.0f}' for x in added_per_sequence(one, eight))
      lines.append(f'| {remat} | {_gb(one["peak"])} | {_gb(eight["peak"])} | {added} |')
  if result.get('gpu_presets'):
    lines += ['', 'GPU presets (train/configs/mlm.py), the released model, remat block, '
              'bfloat16 matmuls; at 45% MFU:',
              '| preset | devices | per-device batch (largest within margin) | accumulation '
              '| global batch | per-device peak GiB | steps/s | steps | days |',
              '|---|---|---|---|---|---|---|---|---|']
    for p in result['gpu_presets']:
      lines.append(f'| {p["preset"]} | {p["devices"]} x {p["memory_gib"]} GB | '
                   f'{p["per_device_batch"]} ({p["largest_fitting"]}) | '
                   f'{p["grad_accum_steps"]} | {p["global_batch"]} | {_gb(p["peak_bytes"])} | '
                   f'{p["steps_per_s"]:.2f} | {p["steps"]:,} | {p["days"]:.1f} |')
  return lines


FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  if jax.device_count() != FLAGS.devices:
    raise app.UsageError(f'--devices={FLAGS.devices} but JAX has {jax.device_count()}: start '
                         'with XLA_FLAGS=--xla_force_host_platform_device_count=N '
                         '(bench.run --suite=scale does)')
  if FLAGS.part == 'memory' and MEMORY_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
    raise app.UsageError(f'--part=memory needs XLA_FLAGS to hold {MEMORY_XLA_FLAGS} (see '
                         'the module docstring; bench.run --suite=scale sets it)')
  if FLAGS.part == 'time':
    out = time_part(FLAGS.preset, FLAGS.seq_len, FLAGS.warmup, FLAGS.repeats)
  else:
    out = memory_part(FLAGS.presets, [int(f) for f in FLAGS.fsdp],
                      [int(d) for d in FLAGS.depths] if FLAGS.depths else None,
                      FLAGS.remat, [int(b) for b in FLAGS.batch])
  print(json.dumps(out))


if __name__ == '__main__':
  flags.DEFINE_enum('part', 'time', ['time', 'memory'], 'Which part to run.')
  flags.DEFINE_integer('devices', 8, 'Simulated CPU devices this process was started with.')
  flags.DEFINE_enum('preset', 'small', ['small', 'tiny'], 'time: model preset '
                    '(perceiver.configs; one that takes max_seq_len).')
  flags.DEFINE_integer('seq_len', 128, 'time: bytes per sequence.')
  flags.DEFINE_integer('warmup', 1, 'time: untimed steps of each layout.')
  flags.DEFINE_integer('repeats', 5, 'time: timed steps of each layout.')
  flags.DEFINE_list('presets', list(PRESETS), 'memory: model presets (one_billion: a ~1B '
                    'parameter configuration, ONE_BILLION).')
  flags.DEFINE_list('fsdp', [str(f) for f in FSDP], 'memory: fsdp sizes.')
  flags.DEFINE_list('remat', ['none'], 'memory: rematerialisation policies (the model '
                    "config's remat: perceiver.model.modules.REMAT_POLICIES).")
  flags.DEFINE_list('batch', ['1'], 'memory: per-device batches.')
  flags.DEFINE_list('depths', None, 'memory: compile at these numbers of latent '
                    'self-attention layers (2 or more, ascending) and extend to the full '
                    'depth (see the module docstring); default: the full depth.')
  app.run(main)
