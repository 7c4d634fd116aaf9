"""The one error type for problems a user can fix."""


class UserError(Exception):
    """Bad input or setup, with a message that names the file or value and the fix.

    Tools and checks raise it; only the entry points (nnscd.cli) turn it into `nnscd: error: ...` and exit status 2,
    so a tool called from Python (a notebook, a test) can catch it like any error.
    """
