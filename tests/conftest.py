"""Shared test helpers: paths to ../shared data and small models."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('PERCEIVER_SHARED', ROOT.parent / 'shared'))


def shared_path(*parts):
  """A path under ../shared, or a skip naming what is missing (a user's fresh machine)."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'{path} not found: these tests read the data in ../shared '
                '(set PERCEIVER_SHARED to its location)')
  return path


def glue_dir():
  """The GLUE directory for real-data tests: $PERCEIVER_GLUE_DIR, else ../shared/data/glue.

  Skips, naming PERCEIVER_GLUE_DIR, where neither is a directory (a user's fresh machine).
  """
  env = os.environ.get('PERCEIVER_GLUE_DIR')
  candidates = ([pathlib.Path(env)] if env else []) + [SHARED / 'data' / 'glue']
  for path in candidates:
    if path.is_dir():
      return path
  pytest.skip('no GLUE directory: set PERCEIVER_GLUE_DIR to one laid out as the GLUE '
              f'download script writes it (tried {", ".join(map(str, candidates))})')


def released_param_shapes():
  """{'module/name': shape} of DeepMind's released checkpoint, from the parameter list in
  ../shared/reference (skips where it is absent)."""
  path = shared_path('reference', 'language_perceiver_io_bytes.params.txt')
  shapes = {}
  for line in path.read_text().splitlines():
    name, shape = line.split(' ', 1)
    shapes[name] = tuple(int(d) for d in shape.strip('[]').split(','))
  return shapes
