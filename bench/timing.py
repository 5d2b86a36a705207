"""Wall-clock timing: warm-up, then runs of several callables interleaved round by round.

Interleaving (ours, peer, ours, peer, ...) exposes both sides to the same machine load
over the same seconds, so a ratio measured in one run is not skewed by a neighbour's
job that started halfway through.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping


def run_once(fn: Callable[[], object]) -> float:
  """Seconds one call of ``fn`` takes; ``fn`` must block until its work is done."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int,
                repeats: int) -> Dict[str, List[float]]:
  """{name: [seconds of each timed run]} after ``warmup`` untimed runs of each.

  Round r runs every callable once, in the given order.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times: Dict[str, List[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(run_once(fn))
  return times


def summary(times: List[float]) -> Dict[str, object]:
  """Median, min, max and relative spread ((max - min) / median) of some run times."""
  median = statistics.median(times)
  return {'median_s': median, 'min_s': min(times), 'max_s': max(times),
          'spread': (max(times) - min(times)) / median if median > 0 else 0.0,
          'times_s': list(times)}
