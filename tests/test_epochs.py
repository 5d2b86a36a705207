"""What the fine-tuning commands share (perceiver.training.epochs): seeded epochs and their
exact resume, a finished run's summary, and cleaning up a run's outputs. The run itself
(``epochs.train``) is tested through both commands (tests/test_glue.py,
tests/test_tagging.py)."""

import itertools
import json

import numpy as np
import pytest

from eval.configs import tagging as tagging_configs
from perceiver import configs as perceiver_configs
from perceiver.training import epochs


class _Error(Exception):
  pass


def _rows(start_step, steps):
  walk = epochs.seeded_epochs(5, 2, seed=7, start_step=start_step,
                              make_batch=lambda rows: {'rows': rows})
  return [(batch['rows'].tolist(), step) for batch, step in itertools.islice(walk, steps)]


def test_seeded_epochs_visit_every_example_once_and_resume_exactly():
  run = _rows(0, 6)      # 5 examples in batches of 2: 3 steps an epoch (the last short)
  assert [step for _, step in run] == [1, 2, 3, 4, 5, 6]
  for epoch in (run[:3], run[3:]):
    assert [len(rows) for rows, _ in epoch] == [2, 2, 1]
    assert sorted(sum((rows for rows, _ in epoch), [])) == [0, 1, 2, 3, 4]
  # Each epoch's order is seeded by [seed, epoch]: numpy's own permutation of it.
  for epoch, steps in ((1, run[:3]), (2, run[3:])):
    order = np.random.default_rng([7, epoch]).permutation(5).tolist()
    assert sum((rows for rows, _ in steps), []) == order
  # From step 4 (mid-way into the second epoch's batches too) the same batches follow.
  assert _rows(4, 2) == run[4:]


def test_a_finished_summary_is_reported_refused_or_left_for_retraining(tmp_path):
  kwargs = dict(resume=True, overwrite=False, error=_Error)
  assert epochs.finished_summary(str(tmp_path), **kwargs) is None
  (tmp_path / epochs.FINISHED).write_text(json.dumps({'main_score': 0.5}))
  assert epochs.finished_summary(str(tmp_path), **kwargs) == {'main_score': 0.5}
  assert epochs.finished_summary(str(tmp_path), resume=False, overwrite=True,
                                 error=_Error) is None
  with pytest.raises(_Error, match='already holds a finished run.*--overwrite'):
    epochs.finished_summary(str(tmp_path), resume=False, overwrite=False, error=_Error)
  (tmp_path / epochs.FINISHED).write_text('{"main_score"')
  with pytest.raises(_Error, match=r'dev_metrics.json: unreadable .*--overwrite'):
    epochs.finished_summary(str(tmp_path), **kwargs)


def test_remove_outputs_spares_what_the_run_did_not_write(tmp_path):
  ours = ['metrics.jsonl', 'checkpoint/ckpt_000000004.npz', 'resume/ckpt_000000002.npz']
  theirs = ['notes.txt', 'checkpoint/README', 'point/metrics.jsonl']
  for name in ours + theirs:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text('x')
  epochs.remove_outputs(str(tmp_path), lambda name: name == 'metrics.jsonl')
  assert not any((tmp_path / name).exists() for name in ours)
  assert all((tmp_path / name).exists() for name in theirs)
  assert not (tmp_path / 'resume').exists() and (tmp_path / 'checkpoint').is_dir()
  epochs.remove_outputs(str(tmp_path / 'missing'), lambda name: True)   # nothing to do


@pytest.mark.parametrize('field,value,message', [
    ('train.epochs', 0, 'train.epochs must be an integer >= 1, got 0'),
    ('train.epochs', True, 'train.epochs must be an integer >= 1, got True'),
    ('optimizer.b2', 1.0, r'optimizer.b2 must be in \[0, 1\), got 1.0'),
    ('optimizer.learning_rate', float('nan'), 'optimizer.learning_rate must be a finite'),
    ('dropout.head', 1.0, r'dropout.head must be in \[0, 1\), got 1.0'),
])
def test_check_config_names_the_field(field, value, message):
  """Both commands' shared settings, on tagging's config (GLUE's is tested through
  eval.glue in tests/test_bad_inputs.py)."""
  config = tagging_configs.get_config('smoke')
  epochs.check_config(config, (('train.epochs', 1),), _Error)   # as it comes: runs
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(_Error, match=message):
    epochs.check_config(config, (('train.epochs', 1),), _Error)


def test_plan_sets_the_run_length_the_decay_and_the_compute():
  """10 examples in batches of 4: 3 steps an epoch; the smoke preset's 10 epochs are 30
  steps, which the learning rate decays to (its ``decay_steps`` is 0); the model computes
  as this CPU does best (the driver's compute)."""
  config = tagging_configs.get_config('smoke')
  assert config.optimizer.decay_steps == 0 and config.train.epochs == 10
  plan = epochs.plan(config, perceiver_configs.tiny(), 10, batch_size=4, learning_rate=0.5,
                     error=_Error)
  assert (plan.steps_per_epoch, plan.total_steps, plan.accum_steps) == (3, 30, 1)
  assert plan.optimizer.decay_steps == 30 and plan.optimizer.learning_rate == 0.5
  assert config.optimizer.decay_steps == 0                       # the config is untouched
  assert plan.run.platform == 'cpu'   # built for it: XLA:CPU's kernels under 'auto'
  assert plan.describe().startswith('batch 4 (1 device(s) x 1 accumulation step(s)), '
                                    '3 steps/epoch x 10 epochs = 30 steps; learning rate 0.5')
  config.train.grad_accum_steps = 3
  with pytest.raises(_Error, match='sweep.batch_sizes=4 must be a positive multiple'):
    epochs.plan(config, perceiver_configs.tiny(), 10, batch_size=4, learning_rate=0.5,
                error=_Error, batch_field='sweep.batch_sizes')


def test_setting_differences_name_each_field_as_the_user_sets_it():
  """A resume checkpoint keeps its run's settings ({'config': the config as JSON, and the
  task's own, e.g. GLUE's batch size}); a rerun with others is refused naming them."""
  old = {'config': {'mesh': {'data': -1, 'fsdp': 1}, 'seed': 0}, 'batch_size': 8,
         'learning_rate': 0.1}
  new = {'config': {'mesh': {'data': -1, 'fsdp': 2}, 'seed': 0}, 'batch_size': 4,
         'learning_rate': 0.1}
  assert epochs.setting_differences(old, old) == []
  assert epochs.setting_differences(old, new) == ['batch_size=8 (now 4)',
                                                  'mesh.fsdp=1 (now 2)']
  del new['config']['seed']
  assert epochs.setting_differences(old, new) == ['batch_size=8 (now 4)',
                                                  'mesh.fsdp=1 (now 2)', 'seed=0 (now None)']
  assert epochs.setting_differences(None, new) == ['settings (none recorded)']
