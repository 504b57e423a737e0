"""The one error type for mistakes a user can make and fix (bad option, missing data, ...): it lives in
handlers/errors.py, the lowest room every stage imports."""

from handlers.errors import UserError

__all__ = ["UserError"]
