"""What a checkpoint path holds, told by its content before any loader reads it.

A file's name says little (a random ``.npz``, a project checkpoint renamed ``.pickle``),
and each loader, given the wrong kind of file, fails in its own terms (a zip read as a
pickle is "not a safe parameter pickle"). ``sniff`` reads a file's first bytes (and a
zip's list of entries) and returns one of ``KINDS``; ``describe`` says it in words, so a
message names what the file is and what was expected.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile

CONFIG_FILE = 'config.json'   # a Hugging Face directory's (as perceiver.params.hf_io.CONFIG_FILE)
# A run checkpoint's JSON item (as perceiver.training.run_checkpoints.META_FILE).
RUN_META_FILE = os.path.join('meta', 'metadata')
_RUN_CHECKPOINT = re.compile(r'^ckpt_\d+$')

KINDS = {
    'missing': 'does not exist',
    'hf_directory': 'a Hugging Face checkpoint directory',
    'run_checkpoint': "a run checkpoint directory (train.mlm's or eval.glue's ckpt_<step>/)",
    'run_directory': 'a run directory holding run checkpoints (ckpt_<step>/: its newest '
                     'is read)',
    'directory': (f'a directory that is no checkpoint (no {CONFIG_FILE}: not a Hugging '
                  f'Face checkpoint; no {RUN_META_FILE}: not a run checkpoint; no '
                  'ckpt_<step>/ in it: not a run directory)'),
    'empty': 'an empty file (0 bytes)',
    'project': "this project's checkpoint (a zip of .npy arrays and metadata.json)",
    'torch': 'a PyTorch file (a zip holding data.pkl)',
    'npz': 'a numpy .npz archive not written by this project (no metadata.json)',
    'zip': 'a zip archive that is not a checkpoint',
    'pickle': 'a Python pickle',
    'safetensors': 'a safetensors file',
    'unknown': 'not a checkpoint format this project reads',
}


def _zip_kind(path: str) -> str:
  try:
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
  except (zipfile.BadZipFile, OSError, ValueError):
    names = [_first_zip_entry(path)]   # a damaged zip: its first local header's name
  if any(n == 'metadata.json' or n.startswith('params/') for n in names):
    return 'project'
  if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
    return 'torch'
  if names and all(n.endswith('.npy') for n in names):
    return 'npz'
  return 'zip'


def _first_zip_entry(path: str) -> str:
  with open(path, 'rb') as f:
    header = f.read(30 + 256)
  if len(header) < 30:
    return ''
  (length,) = struct.unpack('<H', header[26:28])
  return header[30:30 + length].decode('utf-8', errors='replace')


def _last_byte(path: str) -> bytes:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def sniff(path) -> str:
  """The kind of ``path`` (a key of ``KINDS``), from its content."""
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
      return 'hf_directory'
    if os.path.isfile(os.path.join(path, RUN_META_FILE)):
      return 'run_checkpoint'
    if any(_RUN_CHECKPOINT.match(name) and os.path.isdir(os.path.join(path, name))
           for name in os.listdir(path)):
      return 'run_directory'
    return 'directory'
  if not os.path.exists(path):
    return 'missing'
  with open(path, 'rb') as f:
    head = f.read(16)
  if not head:
    return 'empty'
  if head.startswith(b'PK\x03\x04') or head.startswith(b'PK\x05\x06'):
    return _zip_kind(path)
  if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
    return 'pickle'   # protocols 2-5 start with PROTO
  if head[:1] in (b'}', b']', b'(') and _last_byte(path) == b'.':
    return 'pickle'   # protocols 0-1: a dict, list or mark first, STOP last
  if len(head) >= 9 and head[8:9] == b'{':
    (header_size,) = struct.unpack('<Q', head[:8])
    if 8 + header_size <= os.path.getsize(path):
      return 'safetensors'
  return 'unknown'


def describe(path, kind: str = '') -> str:
  """``kind`` (default: ``sniff(path)``) in words; an unknown file's first bytes too."""
  kind = kind or sniff(path)
  words = KINDS[kind]
  if kind == 'unknown':
    with open(path, 'rb') as f:
      words += f' (it starts with {f.read(8)!r})'
  return words
