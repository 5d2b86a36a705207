"""``python -m eval.tagging``: the tagging command (``eval.tagging.app``)."""

# First, before the imports below (JAX takes seconds, and starts threads): the host
# memory policy, then the signal guard (see each one's docstring).
from perceiver.training import host_memory  # pylint: disable=g-bad-import-order
from perceiver.command import signal_guard  # pylint: disable=g-bad-import-order

host_memory.retain_freed_memory()
signal_guard.install(stop_status=0)

from eval.tagging import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from perceiver.command import cli  # pylint: disable=g-import-not-at-top,g-bad-import-order

__doc__ = app.__doc__   # what --help shows (absl: the main module's docstring)
cli.start(app.main, app.define_flags, stop_status=0)
