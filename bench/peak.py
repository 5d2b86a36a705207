"""The matmul peak of this device, measured with JAX in the benchmark's own process.

MFU is reported against these numbers, not against a datasheet: the best throughput of
large ``jnp.dot`` products in float32, and in bfloat16 with float32 accumulation
(``preferred_element_type``), the two precisions the model's matmuls use.
"""

from __future__ import annotations

import statistics
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bench import timing

# (M, K, N): a model-sized product (2048 tokens x 1280 channels) and a large square one.
DEFAULT_SHAPES = ((2048, 1280, 1280), (4096, 4096, 4096))
# Also reported, not used for the peak: the latent products at batch 1.
MODEL_SHAPES = ((256, 1280, 1280),)


def _product(shape: Tuple[int, int, int], dtype) -> Tuple[callable, float]:
  m, k, n = shape
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
  b = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return (lambda: dot(a, b).block_until_ready()), 2.0 * m * k * n


def measure(dtype, shapes: Sequence[Tuple[int, int, int]] = DEFAULT_SHAPES,
            model_shapes: Sequence[Tuple[int, int, int]] = MODEL_SHAPES, *,
            warmup: int = 2, repeats: int = 5) -> Dict[str, object]:
  """{'flops_per_s': best shape's median FLOP/s, 'shapes': {'MxKxN': FLOP/s}, ...}."""
  results, info = {}, {}
  for group, out in ((shapes, results), (model_shapes, info)):
    for shape in group:
      fn, flops = _product(shape, dtype)
      times = timing.interleaved({'dot': fn}, warmup=warmup, repeats=repeats)['dot']
      out['x'.join(map(str, shape))] = flops / statistics.median(times)
  return {'flops_per_s': max(results.values()), 'shapes': results,
          'model_shapes': info, 'dtype': jnp.dtype(dtype).name,
          'accumulation': 'float32'}
