"""The commands' error policy: an expected failure is one ``error:`` line, then exit 1.

Expected failures are ``errors.UserError`` (bad flags, config fields, files, rows and
checkpoints), ``OSError`` (a path that cannot be read or written: missing,
permissions, a full disk) and XLA's ``RESOURCE_EXHAUSTED`` (a program that needs more
device memory than there is: the settings that size it are named). Anything else is a
bug and keeps its traceback.
``--verbose`` (or ``PERCEIVER_VERBOSE=1``) shows the traceback of expected failures too.

Every command starts through ``start``: it installs ``perceiver.command.signal_guard`` first,
then defines and parses the flags, so that a flag or config error (an unknown field, a
preset or config file that does not load, a value that does not parse) is one ``error:``
line naming the flag, with ml_collections' "did you mean" hint. A signal during set-up
ends the command with one line saying what was kept (``run``'s ``stop_status``); a second
one ends it at once with status 128 + signal.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Mapping, Optional, Sequence

from absl import app
from absl import flags

from perceiver.command import errors
from perceiver.command import signal_guard

flags.DEFINE_bool('verbose', False, 'Show the traceback of expected errors too (also: '
                  'PERCEIVER_VERBOSE=1).')


def verbose() -> bool:
  if os.environ.get('PERCEIVER_VERBOSE', '') not in ('', '0'):
    return True
  if not flags.FLAGS.is_parsed():   # an error while the flags are parsed
    return any(a in ('--verbose', '--verbose=true', '--verbose=1') for a in sys.argv[1:])
  return bool(flags.FLAGS.verbose)


def run(command: Callable[[], Optional[int]], *, saved: str = '',
        stop_status: Optional[int] = None) -> int:
  """Runs ``command`` under the policy; returns the exit status.

  ``saved`` says where the last complete output is (for the message after an
  interruption). ``stop_status``: the status after a first signal that stopped the
  command before it finished (``signal_guard.Stopped``): 0 for a command whose stop
  loses nothing (a run that resumes), None for 128 + signal (a one-shot command whose
  result was not written).
  """
  signal_guard.started(saved)
  try:
    return command() or 0
  except (errors.UserError, OSError) as e:
    if verbose():
      raise
    print(f'error: {e}', file=sys.stderr)
    return 1
  except Exception as e:  # pylint: disable=broad-except
    if verbose() or not out_of_memory(e):
      raise
    print(f'error: {out_of_memory(e)}', file=sys.stderr)
    return 1
  except signal_guard.Stopped as e:
    kept = f'; {saved}' if saved else ''
    if stop_status == 0:
      line = f'{e} before the command finished: stopped; nothing was lost{kept}'
    else:
      line = f'error: interrupted ({e}): the command did not finish{kept}'
    if signal_guard.claim():
      print(line, file=sys.stderr)
    return 128 + e.signum if stop_status is None else stop_status
  except signal_guard.Interrupted as e:
    if signal_guard.claim():
      print(f'error: {e}: stopped at once, nothing more saved' +
            (f'; {saved}' if saved else ''), file=sys.stderr)
    return 128 + e.signum
  except KeyboardInterrupt:
    if signal_guard.claim():
      print('error: interrupted' + (f'; {saved}' if saved else ''), file=sys.stderr)
    return 130


def out_of_memory(error: BaseException) -> str:
  """The one line for XLA's out-of-memory error (a ``JaxRuntimeError`` whose status is
  RESOURCE_EXHAUSTED, recognised by name: this module imports no JAX), else ''."""
  text = str(error)
  if type(error).__name__ not in ('JaxRuntimeError', 'XlaRuntimeError') or not text.startswith(
      'RESOURCE_EXHAUSTED'):
    return ''
  first = text.splitlines()[0][:300].rstrip('.')
  return (f'out of memory: {first}; the program needs more memory than the device has: '
          'lower the per-device batch (the batch size, or more gradient accumulation '
          'steps), the model\'s max_seq_len, or turn on model.remat')


# --------------------------------------------------------------------------------------
# Flags and config files.

_HINT = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"\?')


def _unknown_field(error: BaseException, argv: Sequence[str],
                   renamed: Optional[Mapping[str, str]] = None) -> str:
  """The message for an override of a config field that does not exist.

  ml_collections raises a bare KeyError/AttributeError naming only the last part of the
  path (with a hint); the flag is found on the command line by that part. ``renamed``
  (old path -> new path, the command's) names a field's new name.
  """
  text = str(error.args[0] if error.args else error).replace("\\'", "'")
  text = text.replace('\\n', '\n')
  hint = _HINT.search(text)
  key = hint.group(2) if hint else text.split('\n')[0].strip().strip('\'"\\')
  culprit = None
  for arg in argv[1:]:
    name = arg.lstrip('-').split('=', 1)[0]
    parts = name.split('.')
    if len(parts) > 1 and key in parts[1:]:
      culprit = arg if '=' in arg else '--' + name
      path = '.'.join(parts[1:])
      break
  if culprit is None:
    return f'no config field {key!r}' + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
  message = f'{culprit}: no config field {path!r}'
  if path in (renamed or {}):
    message += f' (renamed {renamed[path]!r})'
  elif hint:
    message += f' (did you mean {path.replace(key, hint.group(1))!r}?)'
  return message


def _flag_error_line(error: BaseException) -> str:
  """One line for an absl flag error; a config file's traceback is cut to its last line."""
  text = str(error)
  match = re.match(r'flag (--\S+): Error whilst parsing config file:', text)
  if match:
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    last = re.sub(r'^\w+(Error|Exception): ', '', last)
    return f'{match.group(1)}: the config file does not load: {last}'
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  line = ' '.join(lines) if lines else type(error).__name__
  return line[len('flag '):] if line.startswith('flag --') else line


def _fail(line: str) -> None:
  print(f'error: {line}', file=sys.stderr)
  sys.exit(1)


def _check_config_flags(names: Sequence[str]) -> None:
  """A config flag whose file did not load holds a placeholder that raises OSError when
  touched; touch it now, so the error names the flag before anything runs."""
  for name in names:
    if name not in flags.FLAGS:
      continue
    try:
      flags.FLAGS[name].value.keys()
    except OSError as e:
      if verbose():
        raise
      cause = e.__cause__ or e
      lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
      where = getattr(flags.FLAGS[name], 'config_filename', '') or flags.FLAGS[name].serialize()
      _fail(f'--{name}={where}: the config file does not load: '
            f'{lines[-1] if lines else cause}')
    except AttributeError:
      pass   # not a ConfigDict (an inline config, a dataclass): nothing to check


def _broken_config_file(error: BaseException, argv: Sequence[str],
                        config_flags: Sequence[str]) -> str:
  """The message for a config file that is not valid Python (or fails to import)."""
  given = [a for a in argv[1:] for name in config_flags if a.startswith(f'--{name}=')]
  where = f' ({error.filename}, line {error.lineno})' if isinstance(error, SyntaxError) else ''
  text = error.msg if isinstance(error, SyntaxError) else str(error)
  return (f'{given[-1] if given else "--config"}: the config file does not load: '
          f'{type(error).__name__}: {text}{where}')


def parse_flags(argv: Sequence[str], config_flags: Sequence[str] = ('config',),
                renamed: Optional[Mapping[str, str]] = None):
  """``app.run``'s flags parser under the policy (see the module docstring)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    if verbose():
      raise
    _fail(_flag_error_line(e))
  except (KeyError, AttributeError) as e:   # an override of a field that does not exist
    if verbose():
      raise
    _fail(_unknown_field(e, argv, renamed))
  except (SyntaxError, ImportError, NameError) as e:   # a config file that is not Python
    if verbose():
      raise
    _fail(_broken_config_file(e, argv, config_flags))
  _check_config_flags(config_flags)
  return rest


def start(main: Callable, define_flags: Callable[[], None] = lambda: None, *,
          stop_status: Optional[int] = None, config_flags: Sequence[str] = ('config',),
          renamed: Optional[Mapping[str, str]] = None) -> None:
  """Runs a command: the signal guard first, then its flags, then ``main`` (absl).

  ``define_flags`` may already parse part of the command line (ml_collections defines a
  flag per ``--config.<field>`` override when the config flag is defined), so its errors
  are reported under the policy too; ``renamed``: config fields' old paths -> new
  paths, named when an old one is given. ``stop_status``: see ``signal_guard.install`` (which
  the command module calls first thing; calling it again changes nothing else).
  """
  signal_guard.install(stop_status)
  try:
    define_flags()
  except flags.Error as e:
    if verbose():
      raise
    _fail(_flag_error_line(e))
  except (KeyError, AttributeError) as e:
    if verbose():
      raise
    _fail(_unknown_field(e, sys.argv, renamed))

  def guarded_main(argv):
    status = main(argv)
    if signal_guard.reported():
      # A signal ended the command, possibly inside JAX's own code (a compilation): the
      # command has unwound and reported, and the interpreter's teardown of JAX's
      # half-built objects could crash, so the process ends here.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status or 0)   # pylint: disable=protected-access
    return status

  app.run(guarded_main, flags_parser=lambda argv: parse_flags(argv, config_flags, renamed))
