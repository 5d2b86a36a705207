"""The one kind of failure a command reports without a traceback.

A ``UserError`` is an expected failure: a bad flag or config field, a missing, malformed
or unsafe file, a row that does not parse, a checkpoint that does not fit the model. Its
message names the culprit (file and line, field, flag or tensor). Every error class of
this project that means "the input is wrong" derives from it; ``perceiver.command.cli`` prints
it as one ``error:`` line.
"""


class UserError(Exception):
  """An expected failure whose message names the file, line, field, flag or tensor."""


class ConfigError(UserError, ValueError):
  """A config field or flag that cannot work; the message names it."""
