"""The one exception type for mistakes a user can fix (bad flags, files, configs).

The CLI turns it into exit status 2 and a single line on stderr; everything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem in the user's input, with a message that names it and the fix."""
