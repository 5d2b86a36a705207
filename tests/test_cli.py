"""perceiver.command.cli: a bad flag or config file is one ``error:`` line naming the flag,
before anything runs, in every command (ml_collections' messages cut to that line, with
its "did you mean" hint)."""

import subprocess
import sys

import pytest

from perceiver.command import cli
from perceiver.command import errors
from tests import helpers
from train import mlm
from train.configs import mlm as mlm_configs


def _raise(error):
  def command():
    raise error
  return command


def test_expected_failures_are_one_line_and_bugs_keep_their_traceback(monkeypatch):
  monkeypatch.delenv('PERCEIVER_VERBOSE', raising=False)
  assert helpers.run_command(lambda: None) == (0, '')
  assert helpers.run_command(lambda: 3) == (3, '')
  assert helpers.run_command(_raise(errors.ConfigError('--x=1: bad'))) == (
      1, 'error: --x=1: bad\n')
  missing = FileNotFoundError(2, 'No such file or directory', 'a.txt')
  assert helpers.run_command(_raise(missing)) == (
      1, "error: [Errno 2] No such file or directory: 'a.txt'\n")
  with pytest.raises(ZeroDivisionError):   # a bug, not an expected failure
    helpers.run_command(_raise(ZeroDivisionError('division by zero')))
  monkeypatch.setenv('PERCEIVER_VERBOSE', '1')   # expected failures keep theirs too
  with pytest.raises(errors.ConfigError, match='--x=1: bad'):
    helpers.run_command(_raise(errors.ConfigError('--x=1: bad')))


def test_running_out_of_device_memory_is_one_line_naming_what_sizes_the_program(monkeypatch):
  """XLA's RESOURCE_EXHAUSTED (here a real one: a 4 TiB array on the CPU) is an expected
  failure: one line naming the settings to lower, not JAX's traceback."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv('PERCEIVER_VERBOSE', raising=False)

  def too_big():
    jax.jit(lambda: jnp.ones((2 ** 40,), jnp.float32))().block_until_ready()

  status, stderr = helpers.run_command(too_big)
  assert status == 1 and stderr.count('\n') == 1, stderr
  assert stderr.startswith('error: out of memory: RESOURCE_EXHAUSTED: Out of memory '
                           'allocating 4398046511104 bytes; ') and 'max_seq_len' in stderr
  with pytest.raises(RuntimeError):   # any other runtime error stays a traceback
    helpers.run_command(_raise(RuntimeError('RESOURCE_EXHAUSTED: not XLA\'s')))


def _ml_collections_error(config, path):
  """The exception ml_collections raises for an override of a field ``config`` lacks."""
  from ml_collections.config_flags import config_path  # pylint: disable=import-outside-toplevel
  try:
    config_path.get_type(path, config)
  except (KeyError, AttributeError) as e:
    return e
  raise AssertionError(f'{path} was found')


@pytest.mark.parametrize('argv,path,message', [
    (['x', '--config.train.stepz=10'], 'train.stepz',
     "--config.train.stepz=10: no config field 'train.stepz' (did you mean 'train.steps'?)"),
    (['x', '--workdir=w', '--config.trian.steps', '3'], 'trian.steps',
     "--config.trian.steps: no config field 'trian.steps' (did you mean 'train.steps'?)"),
    (['x', '--config.optimizer.zzz=1'], 'optimizer.zzz',
     "--config.optimizer.zzz=1: no config field 'optimizer.zzz'"),
])
def test_an_unknown_config_field_is_named_with_its_flag_and_hint(argv, path, message):
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({'train': {'steps': 1, 'batch_size': 2},
                                      'optimizer': {'learning_rate': 1.0}})
  assert cli._unknown_field(_ml_collections_error(config, path), argv) == message


def test_a_renamed_config_field_names_its_new_name():
  argv = ['x', '--config.data.shuffle_block=16']
  error = _ml_collections_error(mlm_configs.get_config('smoke'), 'data.shuffle_block')
  assert cli._unknown_field(error, argv, mlm.RENAMED_FIELDS) == (
      "--config.data.shuffle_block=16: no config field 'data.shuffle_block' "
      "(renamed 'data.block_size')")


def test_a_config_file_traceback_is_cut_to_its_last_line():
  error = ValueError("flag --config=c.py:nope: Error whilst parsing config file:\n\n"
                     "Traceback (most recent call last):\n  File \"c.py\", line 3\n"
                     "ValueError: unknown preset 'nope'; known: a, b\n")
  assert cli._flag_error_line(error) == (
      "--config=c.py:nope: the config file does not load: unknown preset 'nope'; known: a, b")
  assert cli._flag_error_line(ValueError('flag --x=y: bad\n  value')) == '--x=y: bad value'


_FLAG_CASES = [
    (['train.mlm', '--config.train.stepz=10'],
     "--config.train.stepz=10: no config field 'train.stepz' (did you mean 'train.steps'?)"),
    (['train.mlm', '--config=train/configs/mlm.py:nope'],
     "--config=train/configs/mlm.py:nope: the config file does not load: unknown preset "
     "'nope'"),
    (['train.mlm', '--config=missing_config.py'],
     "--config=missing_config.py: the config file does not load: [Errno 2] No such file"),
    (['train.mlm', '--config.train.steps=abc'], "--config.train.steps=abc: invalid literal"),
    (['train.mlm', '--config=README.md'],
     '--config=README.md: the config file does not load: SyntaxError: '),
    (['train.mlm', '--stepz=3'], "Unknown command line flag 'stepz'"),
    (['eval.glue', '--task=rte', '--config.train.epochz=1'],
     "--config.train.epochz=1: no config field 'train.epochz' (did you mean 'train.epochs'?)"),
    (['eval.mlm', '--data=x'], '--checkpoint'),
    (['perceiver.convert', '--from=hf', '--src=a'], '--dst'),
]


@pytest.mark.slow
@pytest.mark.parametrize('argv,message', _FLAG_CASES, ids=[' '.join(c[0]) for c in _FLAG_CASES])
def test_commands_answer_bad_flags_and_config_files_with_one_line(tmp_path, argv, message):
  done = subprocess.run([sys.executable, '-m', *argv, f'--workdir={tmp_path / "w"}']
                        if argv[0] in ('train.mlm', 'eval.glue') else
                        [sys.executable, '-m', *argv], cwd=helpers.ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-2000:]
  assert message in helpers.one_error_line(done.stderr)
  assert not (tmp_path / 'w').exists()
