"""Optional TensorBoard event files beside ``metrics.jsonl``, when a writer is installed.

Neither writer is a dependency of this project: if ``tensorboardX`` is importable, each
logged metric also goes to ``<workdir>/tensorboard/`` as a scalar named ``<kind>/<name>``
(``train/loss``, ``eval/accuracy``, ``eval/baseline_accuracy``, ...), else if ``clu`` is
(it writes through TensorFlow's summary writer) the same through ``clu.metric_writers``;
otherwise nothing is written and nothing fails. ``metrics.jsonl`` is always written.

    pip install tensorboardX tensorboard
    tensorboard --logdir checkpoints/
"""

from __future__ import annotations

import os
from typing import Dict, Optional

SUBDIR = 'tensorboard'


class _TensorboardX:

  def __init__(self, writer):
    self._writer = writer

  def scalars(self, step: int, kind: str, metrics: Dict[str, float]):
    for name, value in metrics.items():
      self._writer.add_scalar(f'{kind}/{name}', value, step)
    self._writer.flush()

  def close(self):
    self._writer.close()


class _Clu:

  def __init__(self, writer):
    self._writer = writer

  def scalars(self, step: int, kind: str, metrics: Dict[str, float]):
    self._writer.write_scalars(step, {f'{kind}/{k}': v for k, v in metrics.items()})
    self._writer.flush()

  def close(self):
    self._writer.close()


def open_writer(workdir: str) -> Optional[object]:
  """A writer with ``scalars(step, kind, metrics)`` and ``close()``, or None if neither
  tensorboardX nor clu (with TensorFlow) can be imported."""
  logdir = os.path.join(workdir, SUBDIR)
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  except ImportError:
    pass
  else:
    return _TensorboardX(tensorboardX.SummaryWriter(logdir))
  try:
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
    return _Clu(metric_writers.SummaryWriter(logdir))
  except ImportError:   # clu absent, or present without TensorFlow
    return None
