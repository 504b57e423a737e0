"""The one error type for mistakes a user can make and fix (bad option, missing data, ...)."""


class UserError(Exception):
    """Printed as one line ("error: ...") and a non-zero exit, never as a traceback."""
