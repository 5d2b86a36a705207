"""Reading one of a run's checkpoints (``train.mlm``'s workdir, ``eval.glue``'s and
``eval.tagging``'s best and resume directories): where they are, what their metadata says,
their arrays read back and checked. The writer is the training library's ``run_checkpoints``;
this reader is here, in the parameter-file layer, so that the single-host tools
(``perceiver.params.loading``) read a run's checkpoint without the training library.

Each checkpoint is a directory ``ckpt_<step:09d>/`` holding three orbax items:

- ``params/``: the parameters, in orbax's standard array format;
- ``train/``: ``{'opt_state', 'rng', 'step'}`` (absent from a parameters-only checkpoint,
  such as a fine-tuning run's best one);
- ``meta/metadata``: JSON: the format tag, the model config, the run's metadata (step,
  settings), every host's data position (a list, one per host), and each array's shape,
  dtype and fingerprint (below).

Orbax's files carry no checksum a bit flip would fail, so each saved array's fingerprint
(a position-weighted sum of its bits, modulo 2**32, computed on the devices: exact on any
mesh) is kept in the metadata and checked after every read; a mismatch is a damaged
checkpoint. The step saved with the arrays (``train/step``) is checked against the
metadata's, so an edited metadata step is refused rather than resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any, Dict, List, Optional
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perceiver import configs
from perceiver.command import cli
from perceiver.params import formats
from perceiver.params import params_file

FORMAT = 'perceiver-io-run-checkpoint/1'
META_FILE = formats.RUN_META_FILE   # the JSON item, as orbax names its file
STEP_PREFIX, STEP_DIGITS = 'ckpt', 9   # ckpt_<step:09d>
CheckpointError = params_file.CheckpointError

_NAME = re.compile(rf'^{STEP_PREFIX}_(\d+)$')


class StepDisagrees(CheckpointError):
  """The step saved with a checkpoint's arrays is not the step its metadata says."""


class _OrbaxLog(logging.Filter):
  """Drops orbax's INFO records (some 30 lines a save) from absl's log; its warnings and
  errors pass, until a read has failed (``_mute_abandoned_reads``): then orbax's and
  asyncio's records are dropped too."""

  muted = False

  def filter(self, record):
    if f'{os.sep}orbax{os.sep}' in record.pathname:
      return record.levelno >= logging.WARNING and not self.muted
    return record.name != 'asyncio' or not self.muted


_LOG_FILTER = _OrbaxLog()


def ocp():
  """orbax.checkpoint, imported when a checkpoint is first written or read (it takes
  seconds, and commands that read no run checkpoint do not need it)."""
  import orbax.checkpoint as orbax_checkpoint  # pylint: disable=import-outside-toplevel
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if _LOG_FILTER not in logger.filters:
      logger.addFilter(_LOG_FILTER)
  return orbax_checkpoint


def _abandoned(exc_value, obj=None) -> bool:
  """Whether an exception reported outside the read (unraisable, or uncaught in a
  callback) is the leftover of an abandoned read: orbax's read coroutine, or a
  TensorStore callback finding asyncio's loop closed."""
  code = getattr(obj, 'cr_code', None)
  return ((code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename)
          or (isinstance(exc_value, RuntimeError) and 'Event loop is closed' in str(exc_value)))


def _mute_abandoned_reads() -> None:
  """Keeps the leftovers of a failed read off stderr, unless ``--verbose``.

  When one array does not read back, orbax raises at once and leaves its other
  reads of that checkpoint in flight; they end later, after asyncio's loop is closed:
  coroutines collected unawaited ("Exception ignored in <coroutine ...>", "coroutine ...
  was never awaited"), TensorStore callbacks raising "Event loop is closed", orbax and
  asyncio log records: hundreds of lines of library tracebacks, each repeating a failure
  the caller already reports in one line. From the first failed read on, those (and only
  those: other exceptions and warnings keep their hooks) are dropped; ``--verbose``
  (``PERCEIVER_VERBOSE=1``) keeps them all.
  """
  if cli.verbose() or _LOG_FILTER.muted:
    return
  _LOG_FILTER.muted = True
  warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)
  unraisable, excepthook = sys.unraisablehook, sys.excepthook

  def quiet_unraisable(report):
    if not _abandoned(report.exc_value, report.object):
      unraisable(report)

  def quiet_excepthook(kind, value, traceback):
    if not _abandoned(value):
      excepthook(kind, value, traceback)

  sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook


# Where TensorStore's messages go on to its own reprs: a spec, source locations.
_LIBRARY_TAIL = r'See full TensorStore details|\s*\[(?:tensorstore_spec|source locations)\b'


def _read_failure(path, error: BaseException) -> str:
  """One line for a read that failed: the checkpoint, the item and array when the error
  names them, and the deepest reason in the error's chain, without the library's reprs
  (cut where ``_LIBRARY_TAIL`` starts, first line, at most 200 characters)."""
  chain = [error]
  while len(chain) < 8 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  texts = [re.split(_LIBRARY_TAIL, str(e))[0].strip() for e in chain]
  reason = next((t for t in reversed(texts) if t), type(error).__name__)
  reason = reason.splitlines()[0].rstrip('. ')
  where = ''
  for text in texts:   # TensorStore names the key and the item's directory
    found = re.search(r'"([^"]+)" in OCDBT database at local file "([^"]*)":?\s*(.*)', text)
    if found:
      array = re.sub(r'/(\d+(\.\d+)*|\.z\w+)$', '', found.group(1))   # less chunk or .zarray
      where = f'{os.path.basename(os.path.normpath(found.group(2)))} array {array}: '
      reason = (found.group(3) or reason).splitlines()[0].rstrip('. ')
      break
  if len(reason) > 200:
    reason = reason[:197] + '...'
  return f'{path}: does not read back ({where}{reason})'


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
def summary(params, rest):
  """(whether every floating parameter is finite, the fingerprint of every leaf of
  ``(params, rest)``): a few replicated scalars, whatever the layout."""
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  all_finite = jnp.all(jnp.stack(finite)) if finite else jnp.asarray(True)
  return all_finite, jax.tree.map(_fingerprint, (params, rest))


def leaf_table(tree) -> Dict[str, Any]:
  """{leaf path (``jax.tree_util.keystr``): leaf}: how the metadata names arrays."""
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# --------------------------------------------------------------------------------------
# Where checkpoints are and what their metadata says.

def is_run_checkpoint(path) -> bool:
  """Whether ``path`` is one checkpoint directory of this format (complete or not)."""
  return os.path.isfile(os.path.join(os.fspath(path), META_FILE))


def step_name(step: int) -> str:
  return f'{STEP_PREFIX}_{step:0{STEP_DIGITS}d}'


def steps_in(directory) -> List[int]:
  """Steps of the complete ``ckpt_<step>`` directories in ``directory``, ascending (one
  still being written has orbax's temporary name)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  found = (_NAME.match(name) for name in os.listdir(directory))
  return sorted(int(m.group(1)) for m in found if m)


def latest_in(directory) -> Optional[str]:
  """The newest complete ``ckpt_<step>`` directory in ``directory``, or None."""
  steps = steps_in(directory)
  return os.path.join(os.fspath(directory), step_name(steps[-1])) if steps else None


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


# --------------------------------------------------------------------------------------
# The arrays.

def restore_items(path, targets: Dict[str, Any]) -> Dict[str, Any]:
  """Orbax's restore of ``targets`` ({item: abstract tree, each leaf a
  ``ShapeDtypeStruct`` with the sharding to read it into}); any failure to read (a file
  missing, truncated, undecodable) is a CheckpointError of one line naming ``path`` (and
  the array, when the error does; see ``_read_failure``), its leftovers kept off stderr
  (``_mute_abandoned_reads``)."""
  orbax_checkpoint = ocp()
  args = orbax_checkpoint.args.Composite(**{
      name: orbax_checkpoint.args.StandardRestore(target) for name, target in targets.items()})
  try:
    with orbax_checkpoint.Checkpointer(orbax_checkpoint.CompositeCheckpointHandler()) as reader:
      return dict(reader.restore(os.path.abspath(path), args=args))
  except Exception as e:  # pylint: disable=broad-except  # orbax and tensorstore raise many kinds
    _mute_abandoned_reads()
    raise CheckpointError(_read_failure(path, e)) from e


def verify(path, meta, restored: Dict[str, Any]) -> None:
  """CheckpointError when a restored array's fingerprint is not the saved one;
  StepDisagrees when the step read with the arrays is not the metadata's."""
  _, prints = summary(restored['params'], restored.get('train'))
  for item, sums in zip(('params', 'train'), prints):
    if item not in restored:
      continue
    for key, value in leaf_table(sums).items():
      if int(value) != meta['arrays'][item][key][2]:
        raise CheckpointError(f'{path}: {item} {key} reads back altered (its fingerprint '
                              'differs from the one saved): the files are damaged')
  if 'train' in restored:
    saved, said = int(restored['train']['step']), meta['metadata'].get('step')
    if saved != said:
      raise StepDisagrees(f'{path}: its arrays were saved at step {saved} but its '
                          f'{META_FILE} says step {said}: refusing to resume from it')


def read(path) -> tuple:
  """A checkpoint directory (or a directory of them: its newest) gathered to host numpy:
  ``(params {module: {name: np.ndarray}}, model config, metadata)``. For the single-host
  tools; every array is read onto this host's first CPU device."""
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
  restored = restore_items(path, {'params': target})
  verify(path, meta, restored)
  params = jax.tree.map(np.asarray, restored['params'])
  params_file.check_finite(params, path)
  return params, config_of(meta), meta['metadata']
