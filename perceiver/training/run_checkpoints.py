"""A run's checkpoints: ``train.mlm``'s workdir, ``eval.glue``'s and ``eval.tagging``'s
best and resume directories, written and restored with orbax-checkpoint's
``CheckpointManager``. The layout (``ckpt_<step:09d>/`` holding the items ``params``,
``train`` and ``meta``), the fingerprints and the reading of one checkpoint are
``perceiver.params.run_checkpoint``'s, shared with the single-host tools.

Orbax's manager does the bookkeeping: the step directories' names (``step_prefix`` and
``step_format_fixed_length``, so the directories written before it read as they are),
which steps are present (``all_steps``, ``reload``), the asynchronous save and its commit
(every host writes the shards its own devices hold into
``ckpt_<step>.orbax-checkpoint-tmp-*``, renamed once all have finished, so a directory
named ``ckpt_<step>`` is complete), keeping the ``keep`` written last (``max_to_keep``: the older
ones go once the newer save has committed), removing the temporary directory a ``kill -9``
mid-save left (``cleanup_tmp_directories``, when the next run opens the directory), and
the barriers between hosts. ``save`` returns once the arrays are copied off the devices;
the step loop goes on while orbax writes them.

What orbax's manager does not do stays here:

- the fingerprints (orbax's files carry no checksum a bit flip would fail) and the
  refusal to save non-finite parameters: one jitted reduction on the devices, before the
  save, without gathering the arrays to a host;
- falling back when the newest checkpoint does not read back: the manager restores the
  step it is asked for or raises; moving the damaged one aside and trying the one before
  is ``restore_latest``'s;
- the reading itself goes through ``run_checkpoint.restore_items``: ``restore`` takes a
  checkpoint's path (a fine-tuning run reads its best one back by the path it recorded),
  and the single-host tools read the same directories with no manager at all. The
  manager's ``restore(step)`` is the same orbax call (a ``Checkpointer`` of the composite
  handler on the step's directory), so one reader serves both and a checkpoint reads one
  way;
- every host's data position, gathered into the metadata item;
- replacing a step already present (a fine-tuning run killed after saving a best epoch
  but before its resume checkpoint redoes that epoch): tried with orbax-checkpoint 0.12.8,
  the manager skips an unforced save of a step at or below its newest (``save`` returns
  False) and raises ``StepAlreadyExistsError`` for a present step even with
  ``force=True``, so ``save`` deletes that step through the manager (``delete``, with its
  barrier), then saves with ``force=True``: this run, not orbax's interval policy, says
  when to save;
- "complete" steps: tried likewise, ``all_steps`` lists a step as soon as its save is
  dispatched, while only ``ckpt_<step>.orbax-checkpoint-tmp`` is on disk, so ``steps``
  and ``latest`` wait for a save in flight first.

A restore reads every array straight into the layout the current mesh asks for (abstract
arrays with shardings as orbax's target), so a checkpoint written on any mesh, by any
number of hosts, restores onto any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from perceiver.params import params_file
from perceiver.params import run_checkpoint

CheckpointError = params_file.CheckpointError
CheckpointMismatch = params_file.CheckpointMismatch

_LEGACY = re.compile(r'^ckpt_\d+\.npz$')   # a run checkpoint before orbax (params_file)


class NonFiniteParams(CheckpointError):
  """Parameters holding NaN or infinity were asked to be saved (nothing was written)."""


def _describe(params, rest, fingerprints) -> Dict[str, Any]:
  """{'params' | 'train': {leaf path: [shape, dtype, fingerprint]}}."""
  out = {}
  for name, tree, prints in (('params', params, fingerprints[0]),
                             ('train', rest, fingerprints[1])):
    if tree is None:
      continue
    leaves, sums = run_checkpoint.leaf_table(tree), run_checkpoint.leaf_table(prints)
    out[name] = {key: [list(np.shape(x)), str(np.dtype(x.dtype)), int(sums[key])]
                 for key, x in leaves.items()}
  return out


def _check_fits(path, meta, item, target) -> None:
  """CheckpointMismatch naming the arrays whose path, shape or dtype differ from
  ``target``'s (orbax would cast a dtype silently)."""
  saved = meta['arrays'].get(item)
  if saved is None:
    raise CheckpointMismatch(f'{path}: holds no {item!r} arrays (has: '
                             f'{", ".join(meta["arrays"]) or "none"})')
  want = {key: [list(np.shape(x)), str(np.dtype(x.dtype))]
          for key, x in run_checkpoint.leaf_table(target).items()}
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
    ocp = run_checkpoint.ocp()
    self._orbax = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, step_prefix=run_checkpoint.STEP_PREFIX,
            step_format_fixed_length=run_checkpoint.STEP_DIGITS,
            enable_async_checkpointing=True, cleanup_tmp_directories=True,
            save_root_metadata=False, lightweight_initialize=True))

  def steps(self) -> List[int]:
    """Steps of the complete checkpoints present, ascending (a save in flight is waited
    for first: orbax lists a step as soon as its save starts)."""
    self.wait()
    return sorted(self._orbax.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, run_checkpoint.step_name(step))

  def latest(self) -> Optional[str]:
    """The newest complete checkpoint, or None."""
    steps = self.steps()
    return self.path(steps[-1]) if steps else None

  # ------------------------------------------------------------------------------------
  # Saving.

  def save(self, step: int, params, config, *, opt_state=None, rng=None, data_state=None,
           **metadata) -> str:
    """Starts writing the checkpoint of ``step`` from global arrays and returns its path;
    the writing goes on in the background (``wait``). A checkpoint of ``step`` already
    there (a run redoing steps after a kill) is replaced.

    ``data_state`` is this host's input position (JSON); ``metadata`` JSON values.

    Raises:
      NonFiniteParams: the parameters hold NaN or infinity (nothing is written).
    """
    rest = None
    if opt_state is not None:
      # The step as a global array laid out as the (replicated) RNG key: on several hosts
      # orbax writes global arrays only.
      step_array = jax.make_array_from_callback(
          (), rng.sharding, lambda index: np.asarray(step, np.int32))
      rest = {'opt_state': opt_state, 'rng': rng, 'step': step_array}
    finite, prints = run_checkpoint.summary(params, rest)
    if not bool(finite):
      raise NonFiniteParams(f'non-finite parameters at step {step}: not saved')
    config_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    meta = {'format': run_checkpoint.FORMAT,
            'config': params_file.jsonable(config_dict, 'config'),
            'metadata': params_file.jsonable(
                dict(metadata, step=int(step), process_count=jax.process_count()),
                'metadata'),
            'data': _gather_json(data_state), 'arrays': _describe(params, rest, prints)}
    ocp = run_checkpoint.ocp()
    items = {'params': ocp.args.StandardSave(params), 'meta': ocp.args.JsonSave(meta)}
    if rest is not None:
      items['train'] = ocp.args.StandardSave(rest)
    if step in self.steps():
      self._orbax.delete(step)
    self._orbax.save(step, args=ocp.args.Composite(**items), force=True)
    return self.path(step)

  def wait(self) -> None:
    """Returns when the last save is complete on every host and the checkpoints beyond
    the newest ``keep`` are removed."""
    self._orbax.wait_until_finished()

  def close(self) -> None:
    """``wait``, then ends orbax's background writer."""
    self._orbax.close()

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
    fit this run (``CheckpointMismatch``), or whose metadata step is not its arrays'
    (``StepDisagrees``), is an error, not damage: it is left alone.
    """
    steps = self.steps()
    self._refuse_legacy(steps)
    for index in reversed(range(len(steps))):
      path = self.path(steps[index])
      try:
        return self.restore(path, shapes, shardings, check)
      except (CheckpointMismatch, run_checkpoint.StepDisagrees):
        raise
      except CheckpointError as e:
        aside = path + '.corrupt'
        multihost_utils.sync_global_devices(f'{path} read')
        if jax.process_index() == 0 and os.path.exists(path):
          shutil.rmtree(aside, ignore_errors=True)
          os.replace(path, aside)
        multihost_utils.sync_global_devices(f'{path} moved aside')
        self._orbax.reload()
        then = (f'trying the one before it ({self.path(steps[index - 1])})' if index else
                'no other checkpoint is left: starting a new run from step 0')
        note(f'warning: {path} does not read back ({_damage(path, e)}); moved aside to '
             f'{aside}; {then}')
    return None

  def _refuse_legacy(self, steps: List[int]) -> None:
    """CheckpointError when the directory holds only checkpoints of the one-file format
    this module replaced (a run no longer resumes from them)."""
    legacy = sorted(name for name in os.listdir(self.directory)
                    if _LEGACY.match(name)) if os.path.isdir(self.directory) else []
    if legacy and not steps:
      raise CheckpointError(
          f'{os.path.join(self.directory, legacy[-1])}: a checkpoint of the earlier one-file '
          'format, which a run no longer resumes (its parameters load anywhere else: '
          'eval.glue --init_checkpoint, perceiver.convert); use another --workdir')

  def restore(self, path: str, shapes, shardings, check=None) -> Restored:
    """The checkpoint at ``path`` read into ``shardings`` (see ``restore_latest``)."""
    meta = run_checkpoint.read_meta(path)
    if check is not None:
      check(run_checkpoint.config_of(meta), path)
    _check_fits(path, meta, 'params', shapes.params)
    targets = {'params': _abstract(shapes.params, shardings.params)}
    if shapes.opt_state is not None:
      rest = {'opt_state': shapes.opt_state, 'rng': shapes.rng,
              'step': jax.ShapeDtypeStruct((), jnp.int32)}
      _check_fits(path, meta, 'train', rest)
      targets['train'] = _abstract(rest, {'opt_state': shardings.opt_state,
                                          'rng': shardings.rng, 'step': shardings.step})
    restored = run_checkpoint.restore_items(path, targets)
    run_checkpoint.verify(path, meta, restored)
    train = restored.get('train') or {}
    return Restored(path, int(meta['metadata']['step']), restored['params'],
                    train.get('opt_state'), train.get('rng'), meta['metadata'],
                    meta['data'], int(meta['metadata'].get('process_count', 1)))


def _damage(path: str, error: CheckpointError) -> str:
  """What ``error`` says is wrong with ``path``, less the path and the "does not read
  back" that the warning says once."""
  text = str(error).removeprefix(f'{path}: ')
  wrapper = 'does not read back ('
  if text.startswith(wrapper) and text.endswith(')'):
    text = text[len(wrapper):-1]
  return text


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
