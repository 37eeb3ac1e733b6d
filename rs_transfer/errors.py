"""The one exception type the CLI turns into a single `error: ...` line and exit code 2.

Anything a user can cause (a typo in a model name, a missing file, a checkpoint that does not fit) raises a
subclass of `UserError` with a message that names the file or key; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass
