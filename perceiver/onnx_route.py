r"""The ``onnx_route`` command: a checkpoint as ``model.onnx``, through transformers.

    python -m perceiver.onnx_route --checkpoint=checkpoints/released.npz --out=onnx/

The route and what it inherits from transformers are ``perceiver.deploy.onnx``; this
module is its flags. Needs the ``hf`` extra.
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
from perceiver.deploy.onnx import export_onnx

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')

  def command():
    path = export_onnx(FLAGS.checkpoint, FLAGS.out, overwrite=FLAGS.overwrite)
    print(f'wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) beside the Hugging Face '
          f'checkpoint it was traced from')

  return cli.run(command)


def define_flags():
  """The command's flags (defined only when run as a command)."""
  flags.DEFINE_string('checkpoint', None, 'A masked-LM checkpoint (any form load_any reads).')
  flags.DEFINE_string('out', None, 'Directory to write (Hugging Face files + model.onnx).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
  flags.mark_flags_as_required(['checkpoint', 'out'])


if __name__ == '__main__':
  cli.start(main, define_flags)
