"""A run's checkpoints: ``train.mlm``'s workdir, ``eval.glue``'s and ``eval.tagging``'s
best and resume directories. Written and read with orbax-checkpoint.

Each checkpoint is a directory ``ckpt_<step:09d>/`` holding three orbax items:

- ``params/``: the parameters, in orbax's standard array format; every host writes the
  shards its own devices hold (nothing is gathered to one host);
- ``train/``: ``{'opt_state', 'rng', 'step'}`` (absent from a parameters-only checkpoint,
  such as a fine-tuning run's best one);
- ``meta/metadata``: JSON: the format tag, the model config, the run's metadata (step,
  settings), every host's data position (a list, one per host), and each array's shape,
  dtype and fingerprint (below).

Saving is asynchronous: ``save`` returns once the arrays are copied off the devices and
the step loop goes on while orbax writes them. A save waits for the one before it, and
``wait`` (called before a run returns or raises) for the last. Orbax writes into
``ckpt_<step>.orbax-checkpoint-tmp*`` and renames it when every host has finished, so a
directory named ``ckpt_<step>`` is complete, and a ``kill -9`` mid-save leaves only a
temporary directory, removed when the next run opens the directory.

Orbax's files carry no checksum a bit flip would fail, so each saved array's fingerprint
(a position-weighted sum of its bits, modulo 2**32, computed on the devices: exact on any
mesh) is kept in the metadata and checked after every restore; a mismatch is a damaged
checkpoint (the run falls back to the one before). The same jitted reduction refuses to
save non-finite parameters, without gathering them to a host.

A restore reads every array straight into the layout the current mesh asks for (abstract
arrays with shardings as orbax's target), so a checkpoint written on any mesh, by any
number of hosts, restores onto any other. Single-host tools (``perceiver.params.loading``) read
one gathered to host numpy arrays with ``read``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from perceiver import configs
from perceiver.params import params_file

FORMAT = 'perceiver-io-run-checkpoint/1'
CheckpointError = params_file.CheckpointError
CheckpointMismatch = params_file.CheckpointMismatch

_NAME = re.compile(r'^ckpt_(\d+)$')
_LEGACY = re.compile(r'^ckpt_\d+\.npz$')   # a run checkpoint before orbax (params_file)
_TMP = '.orbax-checkpoint-tmp'
META_FILE = os.path.join('meta', 'metadata')   # the JSON item, as orbax names its file


class _OrbaxInfo(logging.Filter):
  """Drops orbax's INFO records (some 30 lines a save) from absl's log; its warnings and
  errors pass."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def _ocp():
  """orbax.checkpoint, imported when a checkpoint is first written or read (it takes
  seconds, and commands that read no run checkpoint do not need it)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, _OrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxInfo())
  return ocp


class NonFiniteParams(CheckpointError):
  """Parameters holding NaN or infinity were asked to be saved (nothing was written)."""


class WorkdirLock:
  """Holds ``<workdir>/.lock`` (an exclusive ``flock``) while a run writes to ``workdir``,
  so that a second run started on the same directory is refused instead of interleaving
  its checkpoints and logs. Only process 0 takes it (the workdir is shared by hosts).
  The kernel releases it when the process ends, however it ends.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, '.lock')
    self._file = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    workdir = os.path.dirname(self.path)
    try:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
    except OSError as e:
      raise CheckpointError(
          f'--workdir={workdir}: cannot create or write there: {e.strerror or e} '
          f'({e.filename or self.path})') from None
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'another process'
      self._file.close()
      self._file = None
      raise CheckpointError(
          f'{workdir} is in use by {holder} (lock {self.path}); wait '
          'for it to end or use another --workdir') from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()}\n')
    self._file.flush()
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


# --------------------------------------------------------------------------------------
# Fingerprints and the finiteness check, on the devices.

def _bits(x):
  """An array's bits as uint32 (floats bitcast, PRNG keys as their data)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize * 8
  if not jnp.issubdtype(x.dtype, jnp.unsignedinteger):
    x = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{width}'))
  return x.astype(jnp.uint32)


def _fingerprint(x):
  """sum over i of bits[i] * (2 i + 1), modulo 2**32: an odd weight per position, so any
  single flipped bit (and a swap of unequal values) changes it; integer sums are exact in
  any order, so every mesh computes the same value."""
  bits = _bits(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
    stride *= bits.shape[axis]
  return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _summary(params, rest):
  """(whether every floating parameter is finite, the fingerprint of every leaf of
  ``(params, rest)``): a few replicated scalars, whatever the layout."""
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  all_finite = jnp.all(jnp.stack(finite)) if finite else jnp.asarray(True)
  return all_finite, jax.tree.map(_fingerprint, (params, rest))


def _leaf_table(tree) -> Dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _describe(params, rest, fingerprints) -> Dict[str, Any]:
  """{'params' | 'train': {leaf path: [shape, dtype, fingerprint]}}."""
  out = {}
  for name, tree, prints in (('params', params, fingerprints[0]),
                             ('train', rest, fingerprints[1])):
    if tree is None:
      continue
    leaves, sums = _leaf_table(tree), _leaf_table(prints)
    out[name] = {key: [list(np.shape(x)), str(np.dtype(x.dtype)), int(sums[key])]
                 for key, x in leaves.items()}
  return out


# --------------------------------------------------------------------------------------
# Where checkpoints are and what their metadata says.

def is_run_checkpoint(path) -> bool:
  """Whether ``path`` is one checkpoint directory of this module (complete or not)."""
  return os.path.isfile(os.path.join(os.fspath(path), META_FILE))


def latest_in(directory) -> Optional[str]:
  """The newest complete ``ckpt_<step>`` directory in ``directory``, or None."""
  steps = _steps(os.fspath(directory))
  return os.path.join(os.fspath(directory), f'ckpt_{steps[-1]:09d}') if steps else None


def _steps(directory: str) -> List[int]:
  if not os.path.isdir(directory):
    return []
  found = (_NAME.match(name) for name in os.listdir(directory))
  return sorted(int(m.group(1)) for m in found if m)


def read_meta(path) -> dict:
  """The JSON metadata of the checkpoint directory ``path``, checked for form."""
  path = os.fspath(path)
  file = os.path.join(path, META_FILE)
  try:
    with open(file, encoding='utf-8') as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f'{path}: not a complete run checkpoint ({META_FILE} is '
                          'missing)') from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path}: {META_FILE} is unreadable: {e}') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    got = meta.get('format') if isinstance(meta, dict) else None
    raise CheckpointError(f'{path}: format {got!r}, expected {FORMAT!r}')
  for key, kind in (('config', dict), ('metadata', dict), ('arrays', dict), ('data', list)):
    if not isinstance(meta.get(key), kind):
      raise CheckpointError(f'{path}: {META_FILE}: "{key}" is missing or not a '
                            f'{kind.__name__}')
  return meta


def config_of(meta) -> ml_collections.ConfigDict:
  return configs.upgrade(ml_collections.ConfigDict(meta['config']))


def _check_fits(path, meta, item, target) -> None:
  """CheckpointMismatch naming the arrays whose path, shape or dtype differ from
  ``target``'s (orbax would cast a dtype silently)."""
  saved = meta['arrays'].get(item)
  if saved is None:
    raise CheckpointMismatch(f'{path}: holds no {item!r} arrays (has: '
                             f'{", ".join(meta["arrays"]) or "none"})')
  want = {key: [list(np.shape(x)), str(np.dtype(x.dtype))]
          for key, x in _leaf_table(target).items()}
  have = {key: value[:2] for key, value in saved.items()}
  problems = [f'missing {k}' for k in sorted(set(want) - set(have))][:5]
  problems += [f'unexpected {k}' for k in sorted(set(have) - set(want))][:5]
  problems += [f'{k} is {" ".join(map(str, have[k]))}, this run needs '
               f'{" ".join(map(str, want[k]))}'
               for k in sorted(set(want) & set(have)) if have[k] != want[k]][:5]
  if problems:
    raise CheckpointMismatch(f'{path}: its {item} do not fit this run (another model or '
                             f'optimizer?): {"; ".join(problems)}')


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def _restore_items(path, targets: Dict[str, Any]) -> Dict[str, Any]:
  """Orbax's restore of ``targets`` ({item: abstract tree}); any failure to read (a file
  missing, truncated, undecodable) is a CheckpointError naming ``path``."""
  ocp = _ocp()
  args = ocp.args.Composite(**{name: ocp.args.StandardRestore(target)
                               for name, target in targets.items()})
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as reader:
      return dict(reader.restore(os.path.abspath(path), args=args))
  except Exception as e:  # pylint: disable=broad-except  # orbax and tensorstore raise many kinds
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f'{path}: does not read back ({type(e).__name__}: '
                          f'{first[:300]})') from None


def _verify(path, meta, restored: Dict[str, Any]) -> None:
  """CheckpointError when a restored array's fingerprint is not the saved one."""
  finite, prints = _summary(restored['params'], restored.get('train'))
  del finite
  for item, sums in zip(('params', 'train'), prints):
    if item not in restored:
      continue
    for key, value in _leaf_table(sums).items():
      if int(value) != meta['arrays'][item][key][2]:
        raise CheckpointError(f'{path}: {item} {key} reads back altered (its fingerprint '
                              'differs from the one saved): the files are damaged')


def read(path) -> tuple:
  """A checkpoint directory (or a directory of them: its newest) gathered to host numpy:
  ``(params {module: {name: np.ndarray}}, model config, metadata)``. For the single-host
  tools; every array is read onto this host's first device."""
  path = os.fspath(path)
  if not is_run_checkpoint(path):
    newest = latest_in(path)
    if newest is None:
      raise CheckpointError(f'{path}: neither a run checkpoint nor a directory holding '
                            'ckpt_<step> checkpoints')
    path = newest
  meta = read_meta(path)
  device = jax.local_devices(backend='cpu')[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  table = meta['arrays'].get('params') or {}
  if not table:
    raise CheckpointError(f'{path}: holds no parameters')
  target = {}
  for key, (shape, dtype, _) in table.items():
    names = re.findall(r"\['([^']*)'\]", key)
    if len(names) != 2:
      raise CheckpointError(f'{path}: parameter {key} is not module/name')
    target.setdefault(names[0], {})[names[1]] = jax.ShapeDtypeStruct(
        tuple(shape), np.dtype(dtype), sharding=sharding)
  restored = _restore_items(path, {'params': target})
  _verify(path, meta, restored)
  params = jax.tree.map(np.asarray, restored['params'])
  params_file.check_finite(params, path)
  return params, config_of(meta), meta['metadata']


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint read into a run's layout: arrays on the mesh, host-side metadata."""
  path: str
  step: int
  params: Any
  opt_state: Any
  rng: Any
  metadata: Dict[str, Any]
  data: List[Any]           # every saving host's data position, by host index
  process_count: int        # how many hosts wrote it

  def data_position(self, note: Callable[[str], None]):
    """This host's saved data position when the run has as many hosts as the one that
    saved it. On another host count, every host's position belongs to the old split of
    the data into shares; it is dropped, and each host starts its new share from the
    beginning of the data, as a new run would (documents seen before the checkpoint are
    seen again); ``note`` says so."""
    if self.process_count == jax.process_count():
      return self.data[jax.process_index()] if self.data else None
    note(f'warning: {self.path} was written by {self.process_count} host(s), this run '
         f'has {jax.process_count()}: parameters, optimizer state and step {self.step} '
         'are restored; the saved data positions belong to the old split of the data '
         'into host shares, so every host starts its new share from the beginning of '
         'the data (documents trained on before are read again)')
    return None


class CheckpointManager:
  """The checkpoints of one run under ``directory``: async save, keep the last ``keep``,
  restore the newest that reads back. Every host calls every method."""

  def __init__(self, directory: str, keep: int = 3):
    if keep < 1:
      raise ValueError(f'keep must be >= 1, got {keep}')
    self.directory = directory
    self.keep = keep
    self._writer = None
    self._pending = None   # the path of the save in flight
    if jax.process_index() == 0:
      os.makedirs(directory, exist_ok=True)
      for name in os.listdir(directory):
        if name.startswith('ckpt_') and _TMP in name:   # a save that never finished
          shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

  def steps(self) -> List[int]:
    """Steps of the complete checkpoints present, ascending."""
    return _steps(self.directory)

  def path(self, step: int) -> str:
    return os.path.join(self.directory, f'ckpt_{step:09d}')

  def latest(self) -> Optional[str]:
    """The newest complete checkpoint (one still being written is not complete)."""
    return latest_in(self.directory)

  # ------------------------------------------------------------------------------------
  # Saving.

  def save(self, step: int, params, config, *, opt_state=None, rng=None, data_state=None,
           **metadata) -> str:
    """Starts writing the checkpoint of ``step`` from global arrays and returns its path;
    the writing goes on in the background (``wait``).

    ``data_state`` is this host's input position (JSON); ``metadata`` JSON values.

    Raises:
      NonFiniteParams: the parameters hold NaN or infinity (nothing is written).
    """
    self.wait()
    rest = None
    if opt_state is not None:
      # The step as a global array laid out as the (replicated) RNG key: on several hosts
      # orbax writes global arrays only.
      step_array = jax.make_array_from_callback(
          (), rng.sharding, lambda index: np.asarray(step, np.int32))
      rest = {'opt_state': opt_state, 'rng': rng, 'step': step_array}
    finite, prints = _summary(params, rest)
    if not bool(finite):
      raise NonFiniteParams(f'non-finite parameters at step {step}: not saved')
    config_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    meta = {'format': FORMAT, 'config': params_file.jsonable(config_dict, 'config'),
            'metadata': params_file.jsonable(
                dict(metadata, step=int(step), process_count=jax.process_count()),
                'metadata'),
            'data': _gather_json(data_state), 'arrays': _describe(params, rest, prints)}
    ocp = _ocp()
    items = {'params': ocp.args.StandardSave(params), 'meta': ocp.args.JsonSave(meta)}
    if rest is not None:
      items['train'] = ocp.args.StandardSave(rest)
    if self._writer is None:
      self._writer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
    path = self.path(step)
    if os.path.isdir(path):   # a run redoing a step (after a fallback): replace it
      multihost_utils.sync_global_devices(f'replace {path}')
      if jax.process_index() == 0:
        shutil.rmtree(path)
      multihost_utils.sync_global_devices(f'replaced {path}')
    self._writer.save(os.path.abspath(path), args=ocp.args.Composite(**items))
    self._pending = path
    return path

  def wait(self) -> None:
    """Returns when the last save is complete on every host, then removes the
    checkpoints beyond the newest ``keep``."""
    if self._pending is None:
      return
    self._writer.wait_until_finished()
    self._pending = None
    if jax.process_index() == 0:
      for old in self.steps()[:-self.keep]:
        shutil.rmtree(self.path(old), ignore_errors=True)

  def close(self) -> None:
    """``wait``, then ends orbax's background writer."""
    try:
      self.wait()
    finally:
      if self._writer is not None:
        self._writer.close()
        self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ------------------------------------------------------------------------------------
  # Restoring.

  def restore_latest(self, shapes, shardings, note=print, check=None) -> Optional[Restored]:
    """The newest checkpoint that reads back whole, in the layout ``shardings``, or None.

    ``shapes``/``shardings``: a ``TrainState`` of the run's arrays' shapes and layouts
    (``opt_state`` None: parameters only). ``check(config, path)``, if given, vets each
    checkpoint's model config before its arrays are read (and raises to refuse it). A
    newer checkpoint that does not read back (a file missing or truncated, an array
    whose fingerprint differs) is moved aside to ``<name>.corrupt``, kept for inspection,
    and named in a warning; the one before it is tried next. One that reads but does not
    fit this run (``CheckpointMismatch``) is an error, not damage: it is left alone.
    """
    steps = self.steps()
    legacy = sorted(name for name in os.listdir(self.directory)
                    if _LEGACY.match(name)) if os.path.isdir(self.directory) else []
    if legacy and not steps:
      raise CheckpointError(
          f'{os.path.join(self.directory, legacy[-1])}: a checkpoint of the earlier one-file '
          'format, which a run no longer resumes (its parameters load anywhere else: '
          'eval.glue --init_checkpoint, perceiver.convert); use another --workdir')
    for index in reversed(range(len(steps))):
      path = self.path(steps[index])
      try:
        return self.restore(path, shapes, shardings, check)
      except CheckpointMismatch:
        raise
      except CheckpointError as e:
        aside = path + '.corrupt'
        multihost_utils.sync_global_devices(f'{path} read')
        if jax.process_index() == 0 and os.path.exists(path):
          shutil.rmtree(aside, ignore_errors=True)
          os.replace(path, aside)
        multihost_utils.sync_global_devices(f'{path} moved aside')
        then = (f'trying the one before it ({self.path(steps[index - 1])})' if index else
                'no other checkpoint is left: starting a new run from step 0')
        note(f'warning: {path} does not read back ({e}); moved aside to {aside}; {then}')
    return None

  def restore(self, path: str, shapes, shardings, check=None) -> Restored:
    """The checkpoint at ``path`` read into ``shardings`` (see ``restore_latest``)."""
    meta = read_meta(path)
    if check is not None:
      check(config_of(meta), path)
    _check_fits(path, meta, 'params', shapes.params)
    targets = {'params': _abstract(shapes.params, shardings.params)}
    if shapes.opt_state is not None:
      rest = {'opt_state': shapes.opt_state, 'rng': shapes.rng,
              'step': jax.ShapeDtypeStruct((), jnp.int32)}
      _check_fits(path, meta, 'train', rest)
      targets['train'] = _abstract(rest, {'opt_state': shardings.opt_state,
                                          'rng': shardings.rng, 'step': shardings.step})
    restored = _restore_items(path, targets)
    _verify(path, meta, restored)
    train = restored.get('train') or {}
    return Restored(path, int(meta['metadata']['step']), restored['params'],
                    train.get('opt_state'), train.get('rng'), meta['metadata'],
                    meta['data'], int(meta['metadata'].get('process_count', 1)))


def _gather_json(value) -> List[Any]:
  """``value`` (JSON) of every host, by host index: a small all-gather of the encoded
  text (every host must call it)."""
  if jax.process_count() == 1:
    return [params_file.jsonable(value, 'data position')]
  raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  every = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in
          zip(every.reshape(len(lengths.ravel()), -1), lengths.ravel())]
