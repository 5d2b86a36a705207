"""pytest settings: the ``slow`` marker and the ``--slow`` option.

By default the tests marked ``slow`` (subprocess runs, multi-process training, kill -9 and
resume, learning runs, the benchmark's smoke suite) are deselected, so ``pytest -q tests``
is a loop of under two minutes on a 2-core CPU; ``--slow`` runs every test, and
``-m slow`` only the slow ones. Helpers shared by the test modules are in
``tests/helpers.py``.

Each test process (each pytest-xdist worker: ``pytest.ini``) keeps one JAX persistent
compilation cache in a fresh temporary directory: many tests build the same tiny model's
steps (each run of an app compiles its own), and an identical program then compiles once
per process instead of once per test. What is computed does not change, and nothing is
kept between sessions.
"""

import os

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

_CACHE_OPTIONS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')


def pytest_addoption(parser):
  parser.addoption('--slow', action='store_true', default=False,
                   help='also run the tests marked slow (CI runs them all)')


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: takes more than a few seconds (subprocesses, several processes, '
      'learning runs); deselected unless --slow or -m selects it')
  config.addinivalue_line(
      'markers', 'hf: needs the optional hf extra (torch, transformers); skips, naming the '
      'extra, without it')


# Fixtures that need the optional `hf` extra (torch, transformers); a test using one is
# marked `hf`, so CI can run those that are not slow after installing the extra.
_HF_FIXTURES = frozenset({'hf_libs'})


@pytest.hookimpl(tryfirst=True)   # before -m reads the markers
def pytest_collection_modifyitems(config, items):
  for item in items:
    if _HF_FIXTURES & set(getattr(item, 'fixturenames', ())):
      item.add_marker('hf')
  if config.getoption('--slow') or config.getoption('-m'):
    return
  named = _named_tests(config)
  slow = [item for item in items if 'slow' in item.keywords
          and item.nodeid.split('[')[0] not in named and item.nodeid not in named]
  if slow:
    config.hook.pytest_deselected(items=slow)
    dropped = set(map(id, slow))
    items[:] = [item for item in items if id(item) not in dropped]


def _named_tests(config):
  """The tests named by node id on the command line (``path::test``), as node ids: a test
  named so runs whether it is slow or not."""
  named = set()
  for arg in config.args:
    path, sep, rest = str(arg).partition('::')
    if sep:
      relative = os.path.relpath(os.path.abspath(path), str(config.rootpath))
      named.add(f'{relative}::{rest}')
  return named


@pytest.fixture(autouse=True, scope='session')
def compilation_cache_dir(tmp_path_factory):
  """The session's compilation cache (see the module docstring)."""
  saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  path = str(tmp_path_factory.mktemp('jax_cache'))
  compilation_cache.reset_cache()
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  yield path
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
