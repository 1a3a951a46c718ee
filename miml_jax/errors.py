"""The one exception type for problems with what the user gave us.

The CLI prints a `UserInputError` as a single line (no traceback) and exits non-zero, so every
message must name the file, key or value at fault and say what is wrong with it.
"""


class UserInputError(ValueError):
  """Bad input from the user: a file, a config key, a workdir, a flag."""
