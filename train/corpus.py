"""A built-in English corpus that needs no download: the Python standard library's docstrings.

Every Python installation ships its standard library's source, whose docstrings are
several megabytes of real English prose about programming. Each module's docstrings
become one document. Modules are split into train (95%) and valid (5%) by a hash of
their path, so the split is stable across runs and machines with the same Python.
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig
import zlib
from typing import Dict, Iterator, Tuple

from perceiver.command import atomic

BUILTIN_PREFIX = 'builtin:'
NAME = 'stdlib_docstrings'
_SKIP_DIRS = {'test', 'tests', 'idlelib', 'site-packages', 'dist-packages', 'turtledemo',
              '__pycache__', 'ensurepip'}
_BLANK_LINES = re.compile(r'\n\s*\n')


def _module_files(root: str) -> Iterator[str]:
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
    for name in sorted(files):
      if name.endswith('.py'):
        yield os.path.join(directory, name)


def _docstrings(path: str) -> str:
  try:
    with open(path, 'rb') as f:
      tree = ast.parse(f.read())
  except (SyntaxError, ValueError, OSError):
    return ''
  nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
      n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  texts = [ast.get_docstring(n) for n in nodes]
  # Blank lines separate documents in the .txt format, so none may stay inside one.
  return '\n'.join(_BLANK_LINES.sub('\n', t.strip()) for t in texts if t and t.strip())


def write_stdlib_corpus(out_dir: str, min_bytes: int = 200) -> Dict[str, str]:
  """Writes ``<out_dir>/stdlib_docstrings.{train,valid}.txt`` once; returns their paths."""
  paths = {split: os.path.join(out_dir, f'{NAME}.{split}.txt') for split in ('train', 'valid')}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  os.makedirs(out_dir, exist_ok=True)
  root = sysconfig.get_paths()['stdlib']
  docs = {'train': [], 'valid': []}
  for path in _module_files(root):
    text = _docstrings(path)
    if len(text.encode('utf-8')) >= min_bytes:
      split = 'valid' if zlib.crc32(os.path.relpath(path, root).encode()) % 20 == 0 else 'train'
      docs[split].append(text)
  for split, path in paths.items():
    with atomic.atomic_write(path, 'w', encoding='utf-8') as f:
      f.write('\n\n'.join(docs[split]) + '\n')
  return paths


def resolve(paths: str, cache_dir: str) -> Tuple[str, bool]:
  """Maps 'builtin:stdlib_docstrings[/train|/valid]' to files under ``cache_dir``.

  Returns (comma-separated paths, whether it was a built-in name).
  """
  if not paths.startswith(BUILTIN_PREFIX):
    return paths, False
  name, _, split = paths[len(BUILTIN_PREFIX):].partition('/')
  if name != NAME or split not in ('', 'train', 'valid'):
    raise ValueError(f'unknown built-in corpus {paths!r}; known: '
                     f'{BUILTIN_PREFIX}{NAME}/train, {BUILTIN_PREFIX}{NAME}/valid')
  return write_stdlib_corpus(cache_dir)[split or 'train'], True
