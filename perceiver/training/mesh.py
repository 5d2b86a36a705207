"""The device mesh a run computes on, and where each array lives on it.

Every step is one ``jax.jit`` over a ``jax.sharding.Mesh`` with two named axes:

- ``data``: data parallelism; each position along it holds its own slice of the batch;
- ``fsdp``: fully sharded data parallelism; the batch is split along it too, and each
  large array of the state (parameters, optimizer moments) is split along it, so that a
  device holds 1/fsdp of them; XLA gathers a parameter where a computation needs it
  whole and reduce-scatters its gradient.

The mesh's shape comes from the config block ``mesh`` (``mesh.data``, ``mesh.fsdp``; one
of them may be -1: every device the other leaves). Devices are laid out in
``jax.devices()`` order (host by host), ``fsdp`` varying fastest: on several hosts each
host's devices are one contiguous block of the batch, which is what
``jax.make_array_from_process_local_data`` needs, and an ``fsdp`` group stays within a
host whenever ``fsdp`` divides the host's device count (its all-gathers then cross no
network).

Where each array of the state goes is decided by ``RULES`` from its shape alone, so
parameters and their optimizer moments always share a layout and a checkpoint written on
one mesh restores onto any other (``place`` splits full host arrays however the current
mesh asks).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

AXES = ('data', 'fsdp')
# The batch dimension is split over both axes: every device sees its own examples.
BATCH = AXES


def make(config=None, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The ``(data, fsdp)`` mesh of a ``mesh`` config block (default: data=-1, fsdp=1,
  plain data parallelism over every device) over ``devices`` (default: all of them).

  Raises:
    ValueError: naming ``mesh.data`` / ``mesh.fsdp`` when they do not fit the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  data = -1 if config is None else config.get('data', -1)
  fsdp = 1 if config is None else config.get('fsdp', 1)
  return Mesh(np.asarray(devices).reshape(resolve_shape(data, fsdp, len(devices))), AXES)


def resolve_shape(data: int, fsdp: int, devices: int) -> Tuple[int, int]:
  """``(data, fsdp)`` with a -1 filled in; ValueError naming the field if they do not
  multiply to ``devices``."""
  for field, value in (('mesh.data', data), ('mesh.fsdp', fsdp)):
    if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or value >= 1):
      raise ValueError(f'{field} must be an integer >= 1, or -1 (every device the other '
                       f'axis leaves), got {value!r}')
  if data == -1 and fsdp == -1:
    raise ValueError('mesh.data and mesh.fsdp cannot both be -1')
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if devices % known:
      field = 'mesh.fsdp' if data == -1 else 'mesh.data'
      raise ValueError(f'{field}={known} does not divide the {devices} device(s)')
    return (devices // known, fsdp) if data == -1 else (data, devices // known)
  if data * fsdp != devices:
    raise ValueError(f'mesh.data={data} x mesh.fsdp={fsdp} must be the {devices} '
                     'device(s) (or set one of them to -1)')
  return data, fsdp


def describe(mesh: Mesh) -> str:
  shape = ' x '.join(f'{name} {size}' for name, size in mesh.shape.items())
  hosts = len({d.process_index for d in mesh.devices.flat})
  return f'mesh {shape} ({mesh.devices.size} device(s) on {hosts} host(s))'


# --------------------------------------------------------------------------------------
# The state's layout: a small rule table, read in order; the first that applies wins.

RULES = (
    ('matrix', 'an array of 2 or more dimensions: its largest dimension that fsdp '
     'divides is split over fsdp (the first of equal ones)'),
    ('matrix, no dimension divisible', 'replicated (named at start, so a config can be '
     'made to divide)'),
    ('vector or scalar', 'replicated (biases, norms, counters, the RNG key: small)'),
)


def rule(shape: Sequence[int], fsdp: int) -> Tuple[str, P]:
  """``(rule name, PartitionSpec)`` of an array of ``shape`` on a mesh whose fsdp axis
  has ``fsdp`` devices (see ``RULES``)."""
  if len(shape) < 2:
    return RULES[2][0], P()
  if fsdp == 1:
    return RULES[0][0], P()
  divisible = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
  if not divisible:
    return RULES[1][0], P()
  axis = max(divisible, key=lambda a: (shape[a], -a))
  return RULES[0][0], P(*(['fsdp' if a == axis else None for a in range(len(shape))]))


def state_shardings(mesh: Mesh, tree) -> Any:
  """A ``NamedSharding`` for every leaf of ``tree`` (arrays or shape structs)."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, rule(np.shape(x), fsdp)[1]), tree)


def rules_report(mesh: Mesh, tree) -> List[str]:
  """Lines saying which rule placed how many arrays and values (printed at start), and
  each matrix no dimension of which fsdp divides."""
  fsdp = mesh.shape['fsdp']
  counts: Dict[str, List[int]] = {name: [0, 0] for name, _ in RULES}
  undivided = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    name, _ = rule(np.shape(x), fsdp)
    counts[name][0] += 1
    counts[name][1] += int(np.prod(np.shape(x)))
    if name == RULES[1][0]:
      undivided.append(f'{jax.tree_util.keystr(path)} {tuple(np.shape(x))}')
  lines = [f'placement on {describe(mesh)}:']
  for name, text in RULES:
    arrays, values = counts[name]
    if arrays:
      lines.append(f'  {name}: {text}: {arrays} arrays, {values:,} values')
  if undivided:
    lines.append(f'  not divisible by fsdp={fsdp}: ' + ', '.join(undivided[:8]) +
                 (f' and {len(undivided) - 8} more' if len(undivided) > 8 else ''))
  return lines


def per_device_bytes(tree, shardings) -> int:
  """Bytes of ``tree`` one device holds under ``shardings`` (the largest shard)."""
  total = 0
  for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(tuple(np.shape(x)))
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


# --------------------------------------------------------------------------------------
# Moving arrays between the host and the mesh.

def place(tree, shardings):
  """Host arrays (the full values, the same on every host) -> global arrays laid out by
  ``shardings``; each device receives only its own slice."""

  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree, shardings)


def to_host(tree):
  """Global arrays -> their full values as numpy arrays, on every host. With several
  hosts and sharded arrays this gathers across hosts: every host must call it."""

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


def batch_layout(global_batch: int, accum_steps: int, field: str = 'batch_size',
                 accum_field: str = 'grad_accum_steps') -> Dict[str, int]:
  """Splits a global batch over hosts, devices and accumulation steps.

  Raises:
    ValueError: naming ``field`` and ``accum_field`` when the batch does not split evenly.
  """
  devices, local = jax.device_count(), jax.local_device_count()
  if accum_steps < 1:
    raise ValueError(f'{accum_field} must be >= 1, got {accum_steps}')
  if global_batch < 1 or global_batch % (devices * accum_steps):
    raise ValueError(f'{field}={global_batch} must be a positive multiple of devices '
                     f'({devices}) x {accum_field} ({accum_steps})')
  per_device = global_batch // (devices * accum_steps)
  return {'per_device': per_device, 'accum': accum_steps, 'local_devices': local,
          'host_batch': per_device * local * accum_steps, 'devices': devices}


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is at least ``value``: a batch padded to
  split over the devices, a length padded to a multiple the compiled shapes share."""
  return -(-value // multiple) * multiple


def local_batch_devices(mesh: Mesh) -> int:
  """How many of the batch's slices this host feeds: its devices in the mesh."""
  return len(mesh.local_devices)


def batch_sharding(mesh: Mesh, accum: bool) -> NamedSharding:
  """[accum, batch, ...] (``accum``) or [batch, ...] split over every device."""
  return NamedSharding(mesh, P(None, BATCH) if accum else P(BATCH))


def shard_batch(batch: Dict[str, np.ndarray], mesh: Mesh, accum_steps: Optional[int] = None):
  """This host's rows -> global arrays split over the mesh's batch axes.

  With ``accum_steps``: [host_batch, ...] -> [accum_steps, global micro-batch, ...], where
  this host's device d takes, in micro-batch i, the rows ``(d * accum_steps + i) *
  per_device`` on: each device's examples are a contiguous run of the host batch, in
  every layout, so one host reading two hosts' shares (``data.hosts``) forms the same
  global batches as the two hosts. Without it: [host_batch, ...] split in order (the
  outputs of ``predict`` come back in the rows' order).

  Raises:
    ValueError: when the host batch does not split over this host's devices.
  """
  local = local_batch_devices(mesh)
  hosts = mesh.devices.size // local

  def one(x):
    x = np.asarray(x)
    if x.shape[0] % (local * (accum_steps or 1)):
      raise ValueError(f'local batch of {x.shape[0]} does not split over {local} devices x '
                       f'{accum_steps or 1} accumulation steps')
    if accum_steps:
      rest = x.shape[1:]
      x = x.reshape((local, accum_steps, -1) + rest).swapaxes(0, 1).reshape(
          (accum_steps, -1) + rest)
      global_shape = (accum_steps, x.shape[1] * hosts) + rest
    else:
      global_shape = (x.shape[0] * hosts,) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, bool(accum_steps)),
                                                  x, global_shape)

  return jax.tree.map(one, batch)
