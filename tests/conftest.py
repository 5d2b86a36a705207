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
