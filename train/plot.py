r"""Learning curves from ``metrics.jsonl``: loss and accuracy against steps and wall-clock time.

    python -m train.plot --workdir=checkpoints/smoke [checkpoints/other ...] --out=curves.png

One PNG of four panels: masked-byte loss and accuracy, each against steps and against
minutes of wall-clock time (set-up and compilation included; a resumed run continues
from where its previous process stopped). Training reports are thin lines, held-out
evaluations thick lines with dots, and the held-out context-free baseline (the most
frequent masked byte's accuracy; the masked bytes' entropy) a dashed line of the same
colour: a curve leaves its baseline when the model starts to use context.
"""

from __future__ import annotations

# First, before the imports below (JAX takes seconds): a signal while they run is
# handled (see perceiver/command/signal_guard.py).
from perceiver.command import signal_guard  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  signal_guard.install(stop_status=None)

import json
import math
import os
import sys
from typing import Dict, List

from absl import flags

from perceiver.command import atomic
from perceiver.command import cli
from perceiver.command import errors


class PlotError(errors.UserError, ValueError):
  """Bad input: the message names the flag or file (and line)."""


# The fields a record is plotted by: each must be a number where present.
_NUMERIC = ('step', 'loss', 'accuracy', 'baseline_loss', 'baseline_accuracy', 'elapsed_s',
            'time')


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
      value)


def read_metrics(workdir: str) -> Dict[str, List[dict]]:
  """{'train': [...], 'eval': [...]} records of ``workdir/metrics.jsonl``, each with
  ``minutes``: wall-clock time since the run's start, summed over resumed processes."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise PlotError(f'--workdir {workdir}: no metrics.jsonl there (is it a train.mlm '
                    'run directory?)')
  records = []
  with open(path, 'rb') as f:
    for line_no, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        raise PlotError(f'{path}:{line_no}: not UTF-8 text (byte {e.start + 1} of the '
                        'line)') from None
      except ValueError as e:
        raise PlotError(f'{path}:{line_no}: not a JSON object: {e}') from None
      if (not isinstance(record, dict) or 'step' not in record or
          not isinstance(record.get('kind'), str)):
        raise PlotError(f'{path}:{line_no}: not a metrics record (no step or kind)')
      for field in _NUMERIC:
        if field in record and not _is_number(record[field]):
          raise PlotError(f'{path}:{line_no}: field {field!r} is {record[field]!r}, not a '
                          'finite number')
      if 'elapsed_s' not in record and 'time' not in record:
        raise PlotError(f'{path}:{line_no}: no elapsed_s or time field (the wall-clock '
                        'axis needs one)')
      records.append(record)
  _add_minutes(records)
  out = {'train': [], 'eval': []}
  for record in records:
    if record['kind'] in out:
      out[record['kind']].append(record)
  if not out['train'] and not out['eval']:
    raise PlotError(f'{path}: no train or eval records to plot')
  return out


def _add_minutes(records):
  """Wall-clock minutes per record: ``elapsed_s`` restarts at 0 in a resumed process, so
  each new process continues from the previous one's last value."""
  offset, previous, first_time = 0.0, None, None
  for record in records:
    if 'elapsed_s' in record:
      elapsed = record['elapsed_s']
      if previous is not None and elapsed < previous:
        offset += previous
      previous = elapsed
      record['minutes'] = (offset + elapsed) / 60
    else:   # logs written before elapsed_s existed
      first_time = record['time'] if first_time is None else first_time
      record['minutes'] = (record['time'] - first_time) / 60


def plot(workdirs: List[str], out: str, title: str = '') -> str:
  """Writes the PNG of ``workdirs``' curves to ``out``; returns ``out``."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise PlotError('train.plot needs matplotlib, a dependency of this project: '
                    'pip install matplotlib') from None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  runs = [(w, read_metrics(w)) for w in workdirs]
  atomic.check_writable(out, '--out')   # before drawing
  fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (workdir, metrics) in enumerate(runs):
    color = colors[i % len(colors)]
    name = os.path.basename(os.path.normpath(workdir))
    for row, key, base in ((0, 'loss', 'baseline_loss'), (1, 'accuracy', 'baseline_accuracy')):
      for col, x in ((0, 'step'), (1, 'minutes')):
        ax = axes[row][col]
        train = [r for r in metrics['train'] if key in r]
        if train:
          ax.plot([r[x] for r in train], [r[key] for r in train], color=color, lw=0.8,
                  alpha=0.45, label=f'{name} train')
        held = [r for r in metrics['eval'] if key in r]
        if held:
          ax.plot([r[x] for r in held], [r[key] for r in held], color=color, lw=2,
                  marker='o', ms=3, label=f'{name} held-out')
        baseline = [r for r in held if base in r]
        if baseline:
          ax.plot([baseline[0][x], baseline[-1][x]], [baseline[-1][base]] * 2, color=color,
                  ls='--', lw=1.2, label=f'{name} context-free baseline')
  for row, label in ((0, 'masked-byte loss (nats)'), (1, 'masked-byte accuracy')):
    for col, xlabel in ((0, 'step'), (1, 'wall-clock minutes')):
      ax = axes[row][col]
      ax.set_xlabel(xlabel)
      ax.set_ylabel(label)
      ax.grid(alpha=0.3)
  # Loss falls from ~log(262) ~ 5.6 nats or more at the start: keep the interesting part.
  for col in (0, 1):
    lows = [r['loss'] for _, m in runs for r in m['train'] + m['eval'] if 'loss' in r]
    bases = [r['baseline_loss'] for _, m in runs for r in m['eval'] if 'baseline_loss' in r]
    if lows:
      top = max(bases) * 1.25 if bases else sorted(lows)[len(lows) // 2] * 1.5
      axes[0][col].set_ylim(min(lows) * 0.95, top)
  axes[0][0].legend(fontsize=7, loc='upper right')
  fig.suptitle(title or 'masked-byte loss and accuracy: ' + ', '.join(
      os.path.basename(os.path.normpath(w)) for w in workdirs))
  fig.tight_layout()
  directory = os.path.dirname(os.path.abspath(out))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list('workdir', None, 'train.mlm run directories (comma-separated, or more '
                    'of them after the flag).')
  flags.DEFINE_string('out', None, 'The PNG to write (default: <first workdir>/curves.png).')
  flags.DEFINE_string('title', '', 'The figure title (default: the runs\' names).')


def main(argv):
  workdirs = list(FLAGS.workdir or []) + list(argv[1:])
  if not workdirs:
    print('error: --workdir: give at least one run directory', file=sys.stderr)
    return 1
  out = FLAGS.out or os.path.join(workdirs[0], 'curves.png')

  def command():
    plot(workdirs, out, FLAGS.title)
    print(f'wrote {out}')

  return cli.run(command)


if __name__ == '__main__':
  cli.start(main, define_flags)
