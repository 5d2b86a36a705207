"""The commands' error policy: an expected failure is one ``error:`` line, then exit 1.

Expected failures are ``errors.UserError`` (bad flags, config fields, files, rows and
checkpoints) and ``OSError`` (a path that cannot be read or written: missing,
permissions, a full disk). Anything else is a bug and keeps its traceback.
``--verbose`` (or ``PERCEIVER_VERBOSE=1``) shows the traceback of expected failures too.
A second SIGTERM/SIGINT during training ends the command at once with status
128 + signal; Ctrl-C outside training ends it with status 130.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from absl import flags

from perceiver import errors
from perceiver.training import hosts

flags.DEFINE_bool('verbose', False, 'Show the traceback of expected errors too (also: '
                  'PERCEIVER_VERBOSE=1).')


def verbose() -> bool:
  if os.environ.get('PERCEIVER_VERBOSE', '') not in ('', '0'):
    return True
  return bool(flags.FLAGS.is_parsed() and flags.FLAGS.verbose)


def run(command: Callable[[], Optional[int]], *, saved: str = '') -> int:
  """Runs ``command`` under the policy; returns the exit status.

  ``saved`` says where the last complete output is (for the message after an
  interruption).
  """
  try:
    return command() or 0
  except (errors.UserError, OSError) as e:
    if verbose():
      raise
    print(f'error: {e}', file=sys.stderr)
    return 1
  except hosts.Interrupted as e:
    print(f'error: {e}: stopped at once, nothing more saved' +
          (f'; {saved}' if saved else ''), file=sys.stderr)
    return 128 + e.signum
  except KeyboardInterrupt:
    print('error: interrupted' + (f'; {saved}' if saved else ''), file=sys.stderr)
    return 130
