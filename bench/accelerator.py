"""The train step on whatever device JAX runs on: ``bench.run --suite=accelerator``.

For the released model (or ``--preset``) at per-device batches 8, 32 and 64 (or
``--batch_sizes``), in float32 and bfloat16: the step time, bytes (= tokens) per second,
MFU against the device's published dense matmul peak, and the device's peak memory. A
batch that does not fit in memory is reported as such and larger ones are skipped.

MFU counts the model's matmul FLOPs (``perceiver.model.flops``: 3x the forward's for a train
step), the same definition as the other suites. Peaks are per chip, from the vendors'
data sheets, dense (no sparsity); float32 products run at JAX's default precision,
which is TF32 on NVIDIA tensor cores and bfloat16 passes on TPUs, so those peaks are
used for float32. A device not in the table, or the CPU, needs ``--peak_flops``
(otherwise MFU is left out).
"""

from __future__ import annotations

import gc
from typing import Dict, List, Optional

import jax
import numpy as np

from bench import lowering
from bench import ours
from bench import timing
from perceiver.model import layers

# device_kind substring -> {precision: dense peak FLOP/s per chip}. Checked in order:
# the first match wins, so more specific names come first.
PEAKS = (
    ('H200', {'bfloat16': 989e12, 'float32': 494e12}),
    ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
    ('H100', {'bfloat16': 989e12, 'float32': 494e12}),
    ('A100', {'bfloat16': 312e12, 'float32': 156e12}),
    ('TPU v4', {'bfloat16': 275e12, 'float32': 275e12}),
    ('TPU v5 lite', {'bfloat16': 197e12, 'float32': 197e12}),
    ('TPU v5e', {'bfloat16': 197e12, 'float32': 197e12}),
    ('TPU v5', {'bfloat16': 459e12, 'float32': 459e12}),
    ('TPU v6 lite', {'bfloat16': 918e12, 'float32': 918e12}),
)


def published_peak(device_kind: str, precision: str) -> Optional[float]:
  """The table's dense peak for a ``jax.Device.device_kind``, or None if unknown."""
  for name, peaks in PEAKS:
    if name.lower() in device_kind.lower():
      return peaks[precision]
  return None


def _device_peak_memory(device) -> Optional[int]:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if not stats:
    return None
  return stats.get('peak_bytes_in_use')


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'OOM' in text


def measure(preset: str, batch_sizes: List[int], precisions: List[str], *, seq_len: int,
            warmup: int, repeats: int, peak_flops: float = 0.0, kernels: str = 'auto'
            ) -> Dict:
  """Times the train step per (precision, per-device batch); returns rows and the device.

  ``peak_flops`` > 0 overrides the table for every precision.
  """
  device = jax.devices()[0]
  devices = jax.local_device_count()
  base = ours.model_config(preset, 'float32', kernels=kernels)
  params = ours.init_params(base, seq_len)
  rows = []
  for precision in precisions:
    config = ours.model_config(preset, precision, kernels=kernels)
    peak = peak_flops or published_peak(device.device_kind, precision)
    for batch in batch_sizes:
      data = ours.example_batch(batch * devices, seq_len)
      row = {'precision': precision, 'per_device_batch': batch, 'devices': devices}
      try:
        compiled = ours.train(config, params, data)
        times = timing.interleaved({'step': compiled.run}, warmup=warmup, repeats=repeats)
      except Exception as e:  # pylint: disable=broad-except
        if not _is_out_of_memory(e):
          raise
        row['error'] = 'out of memory'
        rows.append(row)
        print(f'accelerator {precision} b{batch}: out of memory; larger batches skipped',
              flush=True)
        break
      summary = timing.summary(times['step'])
      flops = ours.analytic_flops(config, seq_len, batch * devices, 'train')
      row.update(step=summary, tokens_per_s=batch * devices * seq_len / summary['median_s'],
                 flops_per_s=flops / summary['median_s'], xla_memory=compiled.memory,
                 device_peak_bytes=_device_peak_memory(device))
      if peak:
        row['mfu'] = flops / summary['median_s'] / (peak * devices)
        row['peak_flops_per_device'] = peak
      rows.append(row)
      print(f'accelerator {precision} b{batch}: {summary["median_s"]:.4f} s, '
            f'{row["tokens_per_s"]:,.0f} tokens/s' +
            (f', MFU {100 * row["mfu"]:.1f}%' if 'mfu' in row else ''), flush=True)
      del compiled
      gc.collect()
  platform = layers.platform(device)
  counts = {platform: lowering.count_ops(lowering.train_step_text(base, platform))}
  return {'device_kind': device.device_kind, 'platform': device.platform,
          'export_platform': platform, 'devices': devices, 'seq_len': seq_len,
          'preset': preset, 'kernels': kernels,
          'rows': rows,
          'lowering': counts, 'param_count': int(sum(np.prod(x.shape)
                                                     for x in jax.tree.leaves(params)))}


def render(result: Dict) -> str:
  """The suite's table."""
  lines = [f'Train step on {result["devices"]} x {result["device_kind"]} '
           f'({result["platform"]}), {result["preset"]} ({result["param_count"] / 1e6:.1f}M '
           f'parameters), {result["seq_len"]} bytes per sequence',
           'Lowered train step: ' + ', '.join(f'{k.replace("_", " ")} {v}' for k, v in
                                               result['lowering'][result['export_platform']].items())]
  header = ('precision', 'per-device batch', 'step s', 'tokens/s', 'TFLOP/s', 'MFU',
            'peak memory GB')
  table = []
  for row in result['rows']:
    if 'error' in row:
      table.append((row['precision'], str(row['per_device_batch']), row['error'], '', '',
                    '', ''))
      continue
    memory = row['device_peak_bytes'] or row['xla_memory'].get('peak')
    table.append((row['precision'], str(row['per_device_batch']),
                  f'{row["step"]["median_s"]:.4f}', f'{row["tokens_per_s"]:,.0f}',
                  f'{row["flops_per_s"] / 1e12:.1f}',
                  f'{100 * row["mfu"]:.1f}%' if 'mfu' in row else '-',
                  f'{memory / 1e9:.2f}' if memory else '-'))
  widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h)
            for i, h in enumerate(header)]
  fmt = lambda cells: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths)))
  lines += [fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in table]
  if not any('mfu' in r for r in result['rows']):
    lines.append(f'MFU: no published peak for {result["device_kind"]!r}; pass --peak_flops')
  return '\n'.join(lines)

