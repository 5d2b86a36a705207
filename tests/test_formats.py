"""perceiver.params.formats: what a checkpoint path holds, told by its content; and the
messages of the readers that use it (``loading.load_any``, ``perceiver.convert``), which
name what a file is and what was expected."""

import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest

from perceiver import convert
from perceiver.params import formats
from perceiver.params import loading
from perceiver.params import params_file
from tests import helpers


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  return helpers.save_tiny_checkpoint(tmp_path_factory.mktemp('tiny') / 'tiny.npz')


def _kinds_of_files(directory, tiny_npz):
  """{name: path} of files that are not what their names say."""
  directory = pathlib.Path(directory)
  files = {}
  files['empty'] = directory / 'empty.npz'
  files['empty'].write_bytes(b'')
  files['random'] = directory / 'random.npz'
  files['random'].write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096,
                                                                       dtype=np.uint8)))
  files['numpy'] = directory / 'arrays.npz'
  np.savez(files['numpy'], a=np.zeros(3))
  files['zip'] = directory / 'notes.npz'
  with zipfile.ZipFile(files['zip'], 'w') as zf:
    zf.writestr('readme.txt', 'hello')
  files['safetensors'] = directory / 'weights.safetensors'
  header = b'{"__metadata__":{}}'
  files['safetensors'].write_bytes(struct.pack('<Q', len(header)) + header)
  files['project_as_pickle'] = directory / 'project.pickle'
  files['project_as_pickle'].write_bytes(pathlib.Path(tiny_npz).read_bytes())
  files['pickle_as_npz'] = directory / 'params.npz'
  with open(files['pickle_as_npz'], 'wb') as f:
    pickle.dump({'embed': {'embeddings': np.zeros((2, 2), np.float32)}}, f, protocol=4)
  files['directory'] = directory / 'outputs'
  (files['directory'] / 'ckpt_12.npz').mkdir(parents=True)   # not ckpt_<step>/ either
  return files


def test_sniff_tells_each_kind_by_its_content(tiny_checkpoint, tmp_path):
  """Each kind, laid out by hand; the names say nothing (or mislead)."""
  files = _kinds_of_files(tmp_path, tiny_checkpoint)
  files['protocol_0'] = tmp_path / 'old.ckpt'
  files['protocol_0'].write_bytes(pickle.dumps({'a': 1}, protocol=0))
  files['torch'] = tmp_path / 'model.npz'
  with zipfile.ZipFile(files['torch'], 'w') as zf:
    zf.writestr('archive/data.pkl', pickle.dumps({}))
  for name, inside in (('hf', 'config.json'), ('run', 'meta/metadata'),
                       ('runs', 'ckpt_000000002/x')):
    files[name] = tmp_path / name
    (files[name] / inside).parent.mkdir(parents=True)
    (files[name] / inside).write_text('{}')
  expected = {'empty': 'empty', 'random': 'unknown', 'numpy': 'npz', 'zip': 'zip',
              'safetensors': 'safetensors', 'project_as_pickle': 'project',
              'pickle_as_npz': 'pickle', 'directory': 'directory', 'protocol_0': 'pickle',
              'torch': 'torch', 'hf': 'hf_directory', 'run': 'run_checkpoint',
              'runs': 'run_directory'}
  assert {name: formats.sniff(path) for name, path in files.items()} == expected
  assert formats.sniff(tmp_path / 'nothing.npz') == 'missing'
  assert formats.describe(files['random']).startswith(
      'not a checkpoint format this project reads (it starts with b')


_ANY_CHECKPOINT = ("expected this project's checkpoint, DeepMind's pickle or a Hugging Face "
                   'directory')


@pytest.mark.parametrize('name,message', [
    ('empty', f'empty.npz: an empty file (0 bytes); {_ANY_CHECKPOINT}'),
    ('random', 'random.npz: not a checkpoint format this project reads (it starts with b'),
    ('numpy', 'arrays.npz: a numpy .npz archive not written by this project (no '
              f'metadata.json); {_ANY_CHECKPOINT}'),
    ('zip', f'notes.npz: a zip archive that is not a checkpoint; {_ANY_CHECKPOINT}'),
    ('safetensors', 'weights.safetensors: a safetensors file without config.json beside it'),
    ('directory', 'outputs: a directory that is no checkpoint (no config.json: not a '
                  'Hugging Face checkpoint; no meta/metadata: not a run checkpoint; no '
                  'ckpt_<step>/ in it: not a run directory)'),
])
def test_load_any_names_what_a_file_is(tiny_checkpoint, tmp_path, name, message):
  files = _kinds_of_files(tmp_path, tiny_checkpoint)
  with pytest.raises(params_file.CheckpointError) as raised:
    loading.load_any(files[name])
  assert message in str(raised.value)
  assert 'pickle' not in str(raised.value).split(';')[0]   # not "not a safe ... pickle"


@pytest.mark.parametrize('source,name,message', [
    ('deepmind', 'project_as_pickle', "project.pickle: this project's checkpoint (a zip of "
                                      ".npy arrays and metadata.json), not DeepMind's "
                                      'parameter pickle: use --from=project'),
    ('deepmind', 'random', "random.npz: not a checkpoint format this project reads"),
    ('project', 'pickle_as_npz', "params.npz: a Python pickle, not this project's checkpoint (a "
                                 'parameter file or a run checkpoint): use --from=deepmind'),
    ('project', 'empty', "empty.npz: an empty file (0 bytes), not this project's checkpoint"),
    ('hf', 'project_as_pickle', 'not a Hugging Face directory (or its weights file with '
                                'config.json beside it): use --from=project'),
])
def test_convert_names_what_src_is_and_the_from_that_reads_it(tiny_checkpoint, tmp_path,
                                                              source, name, message):
  files = _kinds_of_files(tmp_path, tiny_checkpoint)
  before = helpers.snapshot(tmp_path)
  status, stderr = helpers.run_command(lambda: convert.convert(
      source, str(files[name]), str(tmp_path / 'out.npz'),
      config='tiny' if source == 'deepmind' else None))
  line = helpers.one_error_line(stderr)
  assert status == 1 and f'--src={files[name]}' in line and message in line, line
  assert helpers.snapshot(tmp_path) == before

