"""Atomic file writes: a reader sees the old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from perceiver.command import errors


@contextlib.contextmanager
def atomic_write(path, mode: str = 'wb', **open_kwargs):
  """Yields a file to write ``path``'s new content to.

  The content goes to a temporary file in the same directory, which is flushed, fsynced
  and renamed over ``path`` when the block ends without an exception; the directory is
  then fsynced so the rename survives a crash. On an exception (or a kill) ``path`` is
  untouched and the temporary file is removed (a kill can leave a ``*.tmp`` behind).
  The new file gets the permissions of the one it replaces, or those a plain ``open``
  would give (0666 less the umask), not the temporary file's private 0600.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp',
                               dir=directory)
  except OSError as e:
    raise _naming(e, path) from None
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.chmod(f.fileno(), _mode_for(path))
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    _remove(tmp)
    raise _naming(e, path) from None
  except BaseException:
    _remove(tmp)
    raise
  _fsync_directory(directory)


def write_text(path, text: str) -> str:
  """Writes ``text`` (UTF-8, '\\n' line ends) to ``path`` atomically; returns ``path``."""
  with atomic_write(path, 'w', encoding='utf-8', newline='\n') as f:
    f.write(text)
  return os.fspath(path)


def write_json(path, obj) -> str:
  """Writes ``obj`` as indented JSON with sorted keys, atomically; returns ``path``. NaN or
  infinity is a ValueError, not bad JSON."""
  return write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + '\n')


def _remove(tmp):
  try:
    os.unlink(tmp)
  except OSError:
    pass


def _naming(error: OSError, path: str) -> OSError:
  """``error`` as an OSError whose message names ``path`` (a full disk does not)."""
  if error.filename:
    return error
  return type(error)(error.errno, f'cannot write {path}: {error.strerror or error}')


def _mode_for(path):
  try:
    return os.stat(path).st_mode & 0o7777
  except FileNotFoundError:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory):
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def check_writable(path, flag: str) -> None:
  """Checks, before any work, that ``path`` (a file to be written at the end) can be:
  its directory is created if need be and a probe file is written and removed there.

  Raises:
    errors.ConfigError: naming ``flag`` (e.g. ``--out``) and why.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise errors.ConfigError(f'{flag}={path}: is a directory; give a file name')
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.write-probe.', dir=directory)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise errors.ConfigError(f'{flag}={path}: cannot write there: {e.strerror or e} '
                             f'({e.filename or directory})') from None


def check_free_space(directory, need_bytes: int, what: str, field: str) -> None:
  """Refuses to start work whose output (``need_bytes``, described by ``what``) cannot fit
  in the free space of ``directory``'s filesystem, where the filesystem reports it.

  Raises:
    errors.UserError: naming ``field`` (the flag or config field that sets the place or
      the amount), the free and needed sizes.
  """
  try:
    free = shutil.disk_usage(os.fspath(directory)).free
  except OSError:
    return   # not reported: the write itself will say
  if free < need_bytes:
    raise errors.UserError(f'{field}: {what} needs {need_bytes / 2**20:,.1f} MiB, but the '
                           f'filesystem of {directory} has {free / 2**20:,.1f} MiB free')
