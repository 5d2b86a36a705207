r"""Converts masked-LM checkpoints between DeepMind's pickle, this project and Hugging Face.

    python -m perceiver.convert --from=hf --src=language-perceiver/ --dst=perceiver.npz
    python -m perceiver.convert --from=deepmind --src=language_perceiver_io_bytes.pickle \
        --dst=perceiver.npz
    python -m perceiver.convert --from=project --src=perceiver.npz --to=hf --dst=exported/

``--from``: ``hf`` (a transformers ``PerceiverForMaskedLM`` directory, or its
``model.safetensors``/``pytorch_model.bin`` with ``config.json`` beside it), ``deepmind``
(the released pickle, read through the safe unpickler; ``--config`` names its model), or
``project`` (this project's parameter file, a run checkpoint directory or a run's
directory). ``--to``: ``project`` (default; one file) or ``hf`` (a directory with
config.json + model.safetensors). An existing ``--dst`` is refused unless
``--overwrite``. A summary and any notes on how transformers' computation differs are
printed.
"""

from __future__ import annotations

# First, before the imports below (JAX takes seconds): a signal while they run is
# handled (see perceiver/command/signal_guard.py).
from perceiver.command import signal_guard  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  signal_guard.install(stop_status=None)

import dataclasses
import json
import math
import os
from typing import List, Optional

from absl import app
from absl import flags
import ml_collections
import numpy as np

from perceiver.params import params_file
from perceiver.command import cli
from perceiver import configs
from perceiver.command import errors
from perceiver.params import formats
from perceiver.params import hf
from perceiver.params import hf_io
from perceiver.params import loading
from perceiver import transform

SOURCES = ('hf', 'deepmind', 'project')
TARGETS = ('project', 'hf')


@dataclasses.dataclass
class Summary:
  """What a conversion read and wrote."""
  source: str
  src: str
  dst: str
  to: str
  num_tensors: int
  num_parameters: int
  config: ml_collections.ConfigDict
  notes: List[str]

  def lines(self) -> List[str]:
    enc = self.config.encoder
    depth = enc.num_self_attends_per_block * enc.get('num_blocks', 8)
    return [
        f'read {self.source} checkpoint {self.src}',
        f'{self.num_tensors} tensors, {self.num_parameters:,} parameters',
        (f'config: vocab {self.config.vocab_size}, d_model {self.config.d_model}, '
         f'max_seq_len {self.config.max_seq_len}, {enc.z_index_dim} latents x '
         f'{enc.num_z_channels}, {depth} latent self-attends '
         f'({enc.num_self_attends_per_block} x {enc.get("num_blocks", 8)} blocks)'),
    ] + [f'note: {n}' for n in self.notes] + [f'wrote {self.to} checkpoint {self.dst}']


def load_config(value: Optional[str]) -> ml_collections.ConfigDict:
  """A preset name (``configs.PRESETS``) or a JSON file of a config; default language_mlm."""
  if not value:
    return configs.language_mlm()
  if os.path.isfile(value):
    try:
      with open(value) as f:
        return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
      raise errors.ConfigError(f'--config={value}: unreadable JSON config: {e}') from e
  try:
    return configs.get(value)
  except ValueError as e:
    raise errors.ConfigError(f'--config={value}: neither a JSON file nor a preset: '
                             f'{e}') from e


# What each --from reads, and which --from reads each other kind (perceiver.params.formats).
_EXPECTED = {'hf': 'a Hugging Face directory (or its weights file with config.json beside it)',
             'deepmind': "DeepMind's parameter pickle",
             'project': "this project's checkpoint (a parameter file or a run checkpoint)"}
_FROM_FOR_KIND = {'project': 'project', 'run_checkpoint': 'project',
                  'run_directory': 'project', 'pickle': 'deepmind', 'hf_directory': 'hf',
                  'safetensors': 'hf', 'torch': 'hf'}


def check_source_kind(source: str, src: str) -> None:
  """Refuses ``src`` whose content is not what ``--from=source`` reads, naming what it is
  and the ``--from`` that reads it, before any loader runs."""
  kind = formats.sniff(src)
  accepted = {'hf': ('hf_directory', 'safetensors', 'torch', 'pickle'),
              'deepmind': ('pickle',),
              'project': ('project', 'run_checkpoint', 'run_directory')}[source]
  if kind in accepted:
    return
  message = f'--src={src}: {formats.describe(src, kind)}, not {_EXPECTED[source]}'
  if kind in _FROM_FOR_KIND:
    message += f': use --from={_FROM_FOR_KIND[kind]}'
  raise params_file.CheckpointError(message)


def _read(source, src, config_flag, to):
  """(params, config, notes, number of tensors in the file)."""
  check_source_kind(source, src)
  if source == 'hf':
    converted = hf_io.read_hf_checkpoint(src)
    params_file.check_finite(converted.params, src)
    return converted.params, converted.config, converted.notes, converted.num_tensors
  if source == 'deepmind':
    config = load_config(config_flag)
    if to == 'hf':
      hf.hf_config_from(config)   # Refuses, naming the field, before reading the pickle.
    params = params_file.load_deepmind_pickle(src, config)
    params_file.check_finite(params, src)
  else:
    if config_flag:
      raise errors.ConfigError('--config applies to --from=deepmind only (a project '
                               'checkpoint carries its config)')
    params, config, _ = loading.load_any(src)
    hf.refuse_token_classifier(params, src)
    params_file.check_params(
        params, params_file.expected_shapes(transform.masked_lm(config), config), source=src)
  return params, config, [], sum(len(leaves) for leaves in params.values())


def _check_destination(dst, to, overwrite):
  if not os.path.lexists(dst) or overwrite:
    if to == 'project' and os.path.isdir(dst):
      raise errors.ConfigError(f'--dst={dst}: is a directory; --to=project writes one file')
    return
  if to == 'hf' and os.path.isdir(dst) and not os.listdir(dst):
    return
  raise errors.ConfigError(f'--dst={dst}: already exists (pass --overwrite to replace it)')


def convert(source: str, src: str, dst: str, to: str = 'project',
            config: Optional[str] = None, overwrite: bool = False) -> Summary:
  """Reads ``src`` in form ``source`` and writes ``dst`` in form ``to``.

  Args:
    source: 'hf', 'deepmind' or 'project'.
    src: the checkpoint to read (see the module docstring).
    dst: the file (--to=project) or directory (--to=hf) to write.
    to: 'project' or 'hf'.
    config: for --from=deepmind, a preset name or JSON config file (default language_mlm).
    overwrite: replace an existing ``dst``.

  Returns:
    A Summary.

  Raises:
    errors.UserError: a bad flag (ConfigError), naming it; CheckpointError /
      hf.UnsupportedConfigError naming the file, tensor or config field; non-finite
      parameters are refused, named, and nothing is written.
  """
  if source not in SOURCES:
    raise errors.ConfigError(f'--from={source!r}: expected one of {", ".join(SOURCES)}')
  if to not in TARGETS:
    raise errors.ConfigError(f'--to={to!r}: expected one of {", ".join(TARGETS)}')
  if not src or not os.path.exists(src):
    raise errors.ConfigError(f'--src={src}: no such file or directory')
  if not dst:
    raise errors.ConfigError('--dst: required')
  if os.path.abspath(src) == os.path.abspath(dst):
    raise errors.ConfigError(f'--dst={dst}: is the same path as --src')
  _check_destination(dst, to, overwrite)
  params, model_config, notes, num_tensors = _read(source, src, config, to)
  if to == 'hf':
    notes = notes + hf_io.export_hf(params, model_config, dst, overwrite=overwrite)
  else:
    params_file.save(dst, params, model_config, converted_from=source,
                    source_path=os.path.abspath(src))
  num_parameters = sum(math.prod(np.shape(v)) for leaves in params.values()
                       for v in leaves.values())
  return Summary(source, src, dst, to, num_tensors, num_parameters, model_config, notes)


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags, defined only when run as a command (``train.mlm`` has a
  ``--config`` too)."""
  flags.DEFINE_enum('from', None, SOURCES, 'Form of --src.')
  flags.DEFINE_string('src', None, 'Checkpoint to read: HF directory or weights file, '
                      'DeepMind pickle, or project checkpoint.')
  flags.DEFINE_string('dst', None, 'File (--to=project) or directory (--to=hf) to write.')
  flags.DEFINE_enum('to', 'project', TARGETS, 'Form of --dst.')
  flags.DEFINE_string('config', None, 'For --from=deepmind: a preset name '
                      f'({", ".join(sorted(configs.PRESETS))}) or a JSON config file; '
                      'default language_mlm (the released model).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --dst.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')

  def command():
    summary = convert(FLAGS['from'].value, FLAGS.src, FLAGS.dst, to=FLAGS.to,
                      config=FLAGS.config, overwrite=FLAGS.overwrite)
    print('\n'.join(summary.lines()))

  return cli.run(command)


if __name__ == '__main__':
  def _define():
    define_flags()
    flags.mark_flags_as_required(['from', 'src', 'dst'])

  cli.start(main, _define)
