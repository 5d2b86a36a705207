"""The fine-tuning skeleton the two task packages (``eval.glue``, ``eval.tagging``) share.

A task package brings one ``Task`` object (its data, model head, loss, scores and
outputs); this module runs it: ``finetune`` plans the run, builds the classifier from the
trunk (``perceiver.params.transfer``), hands the task to
``perceiver.training.epochs.train`` and returns the best epoch's summary;
``predictor`` runs the best parameters again (GLUE's test predictions). Beside them, the
pieces of the command both apps have: one host only, the trunk, the finished run's
summary file, the common flags and ``main``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Protocol

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from perceiver.command import atomic
from perceiver.command import cli
from perceiver.params import transfer
from perceiver.training import driver
from perceiver.training import epochs
from perceiver.training import mesh as mesh_lib
from perceiver.training import step as step_lib
from perceiver.training import writer as writer_lib



class Task(epochs.Task, Protocol):
  """A task as this skeleton runs it: ``epochs.Task``, and its model (``head``, a
  ``perceiver.transform`` builder, with ``num_outputs``: classes or tags), the words the
  log says of what it trains on, and its own fields of the run's summary."""
  head: Callable[..., Any]
  num_outputs: int

  def describe_train(self) -> str:
    """The log line's words for the training split ('120 train examples')."""

  def summary_fields(self, best: Dict[str, Any], written: Any) -> Dict[str, Any]:
    """The task's own fields of ``dev_metrics.json`` (its results, counts, labels)."""


@dataclasses.dataclass
class RunResult:
  """The best dev epoch of one run: where its files are, what ``dev_metrics.json`` holds,
  its selection score, and its parameters (host arrays)."""
  run_dir: str
  summary: Dict[str, Any]
  score: float
  params: Any


def finetune(task: Task, trunk: transfer.Trunk, config, run_dir: str,
             log: writer_lib.RunLog, *, batch_size: int, learning_rate: float,
             settings: Dict[str, Any], resume: bool,
             batch_field: str = 'train.batch_size') -> RunResult:
  """Fine-tunes the classifier of ``trunk`` on ``task`` at ``batch_size`` and
  ``learning_rate``, scoring dev after every epoch; writes under ``run_dir`` what
  ``epochs.train`` and ``task.write_best`` write (a resumed run must share ``settings``).

  Raises:
    epochs.Stopped: a signal stopped the run (its state is saved).
  """
  start_time = time.time()
  train_split = task.data['train']
  plan = epochs.plan(config, trunk.model_config, len(train_split), batch_size=batch_size,
                     learning_rate=learning_rate, error=task.error, batch_field=batch_field)
  model = plan.run.build(task.head, task.num_outputs)
  params = transfer.classifier_params(model, trunk, config.seed, train_split.length,
                                      log.note)
  log.note(f'  {task.describe_train()}, {plan.describe()}')
  outcome = epochs.train(plan, task, model, params=params, seed=config.seed, run_dir=run_dir,
                         log=log, settings=settings, resume=resume, train_config=config.train)
  best = outcome.best
  summary = {
      'main_score': best['score'], 'best_epoch': best['epoch'], 'best_step': best['step'],
      'checkpoint': best['path'], 'epochs': outcome.history, 'batch_size': batch_size,
      'learning_rate': float(plan.optimizer.learning_rate), 'total_steps': plan.total_steps,
      'init': trunk.source, 'devices': plan.run.mesh.devices.size,
      **task.summary_fields(best, outcome.written),
      'run_time_s': time.time() - start_time,
  }
  return RunResult(run_dir, summary, best['score'], outcome.params)


def predictor(task: Task, model_config, params: Any, config) -> Callable[[Any], np.ndarray]:
  """``split -> outputs`` of ``params`` (host arrays of ``task``'s model of
  ``model_config``) on this host's mesh of ``config.mesh``, ``config.eval.batch_size``
  rows (rounded up to the devices) per call; a mesh that does not fit is
  ``task.error`` naming the field."""
  try:
    run = driver.Run.create(config.mesh, config.optimizer, model_config, jax.local_devices())
  except ValueError as e:
    raise task.error(str(e)) from None
  shardings = mesh_lib.state_shardings(run.mesh, params)
  model = run.build(task.head, task.num_outputs)
  predict_step = step_lib.make_predict_step(task.predict_fn(model), run.mesh, shardings)
  devices = run.mesh.devices.size
  return epochs.predictor(task, predict_step, mesh_lib.place(params, shardings),
                          -(-config.eval.batch_size // devices) * devices, run.mesh)


# --------------------------------------------------------------------------------------
# The command around the runs.

def one_host(command: str, error: Callable[[str], Exception]) -> None:
  """Refuses a start on more than one host: a fine-tuning run fits one host."""
  if jax.process_count() > 1:
    raise error(f'{command} runs on one host (with all of its devices); this is host '
                f'{jax.process_index()} of {jax.process_count()}. Start it on one host '
                'only: fine-tuning this model fits one host (see README, "Scale")')


def opening_line(command: str, what: str) -> str:
  """The log's first line: the command, its devices and ``what`` it reads and writes."""
  return (f'{command} on {jax.local_device_count()} device(s) '
          f'({jax.devices()[0].platform}); {what}')


def load_trunk(init_checkpoint: Optional[str], config, log: writer_lib.RunLog, *,
               mlm_decoder: bool = False) -> transfer.Trunk:
  """The trunk of ``init_checkpoint`` (or a new one of ``config.model``), with the
  config's encoder and head dropout; ``mlm_decoder``: its MLM decoder too."""
  return transfer.load_trunk(init_checkpoint, config.model,
                             encoder_dropout=config.dropout.encoder,
                             head_dropout=config.dropout.head, note=log.note,
                             mlm_decoder=mlm_decoder)


def write_finished(directory: str, summary: Dict[str, Any]) -> str:
  """Writes ``summary`` as ``directory``'s ``dev_metrics.json``: the run is finished."""
  return atomic.write_json(os.path.join(directory, epochs.FINISHED), summary)


def define_flags(config_file: str, what: str) -> None:
  """The flags both commands have: ``--config`` (``config_file``, ``what``'s presets),
  ``--workdir``, ``--init_checkpoint`` and ``--overwrite``."""
  config_flags.DEFINE_config_file('config', config_file, f'{what} config file[:preset] '
                                  '(presets: paper, smoke).', lock_config=True)
  flags.DEFINE_string('init_checkpoint', None, "DeepMind's pickle, this project's "
                      'checkpoint, or a Hugging Face checkpoint; without it the model '
                      'starts from scratch.')
  flags.DEFINE_bool('overwrite', False, 'Retrain what finished, replacing its outputs.')


def make_main(command: Callable[[], Any], saved: str) -> Callable:
  """The command's ``main`` for ``cli.start``: no stray arguments, then ``command`` under
  the error policy; a stop by a signal is reported (the run resumes) with status 0."""

  def main(argv):
    if len(argv) > 1:
      print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
      return 2

    def stoppable():
      try:
        command()
      except epochs.Stopped as e:
        print(f'{e}', file=sys.stderr)

    return cli.run(stoppable, saved=saved, stop_status=0)

  return main
