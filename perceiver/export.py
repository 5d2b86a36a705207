r"""The ``export`` command: writes a checkpoint as a program that runs without this code.

    python -m perceiver.export --checkpoint=checkpoints/language_perceiver_io_bytes.pickle \
        --task=masked_lm --out=exported/

What is written, and how, is ``perceiver.deploy.export``; this module is its flags.
"""

# First, before the imports below (JAX takes seconds): a signal while they run is
# handled (see perceiver/command/signal_guard.py).
from perceiver.command import signal_guard  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  signal_guard.install(stop_status=None)

import os  # pylint: disable=g-import-not-at-top

from absl import app
from absl import flags

from perceiver.command import cli
from perceiver.deploy.export import DTYPES, DEFAULT_PLATFORMS, TASKS, export

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined only when run as a command)."""
  flags.DEFINE_string('checkpoint', None, 'Checkpoint to export: this project\'s, '
                      'DeepMind\'s pickle or a Hugging Face directory.')
  flags.DEFINE_enum('task', None, TASKS, 'What the program computes; default: classifier '
                    'for a classifier checkpoint, else masked_lm.')
  flags.DEFINE_string('out', None, 'Directory to write.')
  flags.DEFINE_enum('dtype', 'float32', DTYPES, 'bfloat16: dense weights stored in '
                    'bfloat16, mixed-precision compute.')
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS), 'Platforms the one artifact '
                    'runs on.')
  flags.DEFINE_bool('overwrite', False, 'Replace an earlier export at --out.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')

  def command():
    manifest = export(FLAGS.checkpoint, FLAGS.out, task=FLAGS.task, dtype=FLAGS.dtype,
                      platforms=FLAGS.platforms, overwrite=FLAGS.overwrite)
    size = sum(os.path.getsize(os.path.join(FLAGS.out, f)) for f in os.listdir(FLAGS.out))
    labels = f', labels {", ".join(manifest["labels"])}' if manifest['labels'] else ''
    print(f'wrote {FLAGS.out}: {manifest["task"]}{labels}, '
          f'{manifest["num_parameters"]:,} parameters in {manifest["param_dtype"]}, '
          f'window {manifest["max_seq_len"]} bytes, platforms '
          f'{", ".join(manifest["platforms"])}, {size / 1e6:.1f} MB')

  return cli.run(command)


if __name__ == '__main__':
  def _define():
    define_flags()
    flags.mark_flags_as_required(['checkpoint', 'out'])

  cli.start(main, _define)
