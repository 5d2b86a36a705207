r"""What a compiled step holds at its memory peak, by the kind of instruction that made it.

XLA's memory analysis (``bench.scale --part=memory``) gives a program's temporaries as one
figure. To tell which part of it divides with fsdp and which does not, this reads what
XLA:CPU writes for each program under ``--xla_dump_to``: the buffer assignment (the size
of each value in the temporaries' allocation) and the live ranges (each value's first and
last position in the schedule), and adds up, at every position, the bytes live there by
the kind of the value's defining instruction (``KINDS``):

- ``gathered``: all-gather outputs: weights gathered whole from their fsdp shards;
- ``reduced``: all-reduce outputs of at least ``LARGE`` bytes: gradients summed whole over
  the batch, before each device keeps its slice;
- ``other``: everything else (activations, gradients not yet reduced, the optimizer's
  intermediates).

The peak is the position with the most live bytes. ``sharded_estimate`` is the largest
total with every ``reduced`` value counted at 1/fsdp of its size: XLA:CPU has no
reduce-scatter (its pipeline has no ``ReduceScatterCreator``), so the partitioner's
all-reduce + dynamic-slice stays, the slice is fused into the optimizer's update, and each
whole gradient lives until the update; a GPU compiler turns the pair into a
reduce-scatter before fusion, so the device keeps only its slice. The estimate keeps the
CPU's schedule, so it is an estimate, not a GPU's figure.

    XLA_FLAGS='--xla_force_host_platform_device_count=64 \
      --xla_disable_hlo_passes=cse_barrier_expander --xla_dump_to=/tmp/dump \
      --xla_dump_hlo_module_re=jit_step' JAX_PLATFORMS=cpu \
      python -m bench.scale --part=memory --devices=64 --presets=language_mlm --fsdp=8 \
      --depths=2,4
    python -m bench.live /tmp/dump --fsdp=8        # one row per program, in compile order
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Tuple

from absl import app
from absl import flags

KINDS = ('gathered', 'reduced', 'other')
# An all-reduce output at least this large is a gradient (the step's other all-reduces
# are of scalars and bias-sized vectors).
LARGE = 1 << 20
_VALUE = re.compile(r'^ value: <\d+ (\S+?) @\d+> \(size=(\d+),')
_RANGE = re.compile(r'^\s+(\S+\{[0-9,]*\}):(\d+)-(\d+)$', re.M)


def temp_values(buffer_assignment: str) -> Tuple[int, Dict[str, int]]:
  """``(bytes, {value: size})`` of the temporaries' allocation(s) (``preallocated-temp``)
  in the text of a ``*-buffer-assignment.txt``; values named as in the live ranges
  (``name{}`` or ``name{i}`` for a tuple's element)."""
  total, sizes, in_temp = 0, {}, False
  for line in buffer_assignment.splitlines():
    if line.startswith('allocation '):
      in_temp = 'preallocated-temp' in line
      if in_temp:
        total += int(re.match(r'allocation \d+: size (\d+)', line).group(1))
      continue
    match = _VALUE.match(line) if in_temp else None
    if match:
      name = match.group(1)
      sizes[name if '{' in name else name + '{}'] = int(match.group(2))
  return total, sizes


def live_ranges(live_range: str) -> List[Tuple[str, int, int]]:
  """``(value, first, last)`` of every value in the ``BufferLiveRange`` section of a
  ``*-live-range.txt``."""
  section = live_range.split('BufferLiveRange:', 1)[1].split('Live ranges at', 1)[0]
  return [(m.group(1), int(m.group(2)), int(m.group(3))) for m in _RANGE.finditer(section)]


def kind(value: str, size: int) -> str:
  """The ``KINDS`` entry of a value, by its defining instruction's name."""
  if value.startswith('all-gather'):
    return 'gathered'
  if value.startswith('all-reduce') and size >= LARGE:
    return 'reduced'
  return 'other'


def profile(sizes: Dict[str, int], ranges) -> Dict[str, List[int]]:
  """Live bytes of each kind at every position of the schedule (values in ``sizes``
  only: the temporaries)."""
  length = 1 + max((last for _, _, last in ranges), default=0)
  steps = {k: [0] * (length + 1) for k in KINDS}
  for value, first, last in ranges:
    if value in sizes:
      step = steps[kind(value, sizes[value])]
      step[first] += sizes[value]
      step[last + 1] -= sizes[value]
  out = {}
  for k, step in steps.items():
    running, out[k] = 0, []
    for change in step[:length]:
      running += change
      out[k].append(running)
  return out


def summary(live: Dict[str, List[int]], fsdp: int = 1) -> Dict:
  """The peak's position, total and bytes by kind, the most ``reduced`` bytes live at
  once, and (``fsdp`` > 1) ``sharded_estimate``: the largest total with ``reduced``
  counted at 1/fsdp (see the module docstring)."""
  totals = [sum(x) for x in zip(*(live[k] for k in KINDS))]
  peak = max(range(len(totals)), key=totals.__getitem__)
  out = {'peak_position': peak, 'peak_live': totals[peak],
         'at_peak': {k: live[k][peak] for k in KINDS},
         'most_reduced_live': max(live['reduced'])}
  if fsdp > 1:
    out['sharded_estimate'] = max(
        g + o + r / fsdp for g, o, r in zip(live['gathered'], live['other'], live['reduced']))
  return out


def read_dump(directory: str, fsdp: int = 1) -> List[Dict]:
  """One ``summary`` per train-step program XLA:CPU dumped in ``directory`` (in the
  order compiled), with its module name and the temporaries' allocation in bytes."""
  rows = []
  pattern = os.path.join(directory, '*cpu_after_optimizations-live-range.txt')
  for path in sorted(glob.glob(pattern)):
    prefix = path[:-len('-live-range.txt')]
    with open(prefix + '-buffer-assignment.txt') as f:
      temp, sizes = temp_values(f.read())
    with open(path) as f:
      live = profile(sizes, live_ranges(f.read()))
    rows.append(dict(module=os.path.basename(prefix).split('.cpu_after')[0],
                     temp_allocation=temp, **summary(live, fsdp)))
  return rows


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m bench.live DUMP_DIR [--fsdp=N]')
  for row in read_dump(argv[1], FLAGS.fsdp):
    print(json.dumps(row))


FLAGS = flags.FLAGS

if __name__ == '__main__':
  flags.DEFINE_integer('fsdp', 1, 'fsdp size of the dumped programs (for sharded_estimate).')
  app.run(main)
