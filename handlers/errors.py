"""The kit's two error types, shared by every stage (handlers/ is the lowest room all may import).

UserError: a mistake on the command line or in a file the user gave (an option, a missing or broken
checkpoint, spec or archive): printed as one line ("error: ..."), exit status 1, never a traceback.
ClientError: a request a served model refuses (not an image, too large, not an inference request):
answered with `status` (400, 413, 415) and the message as JSON, by every serving engine alike.
"""


class UserError(Exception):
    """Printed as one line ("error: ...") and a non-zero exit, never as a traceback."""


class ClientError(ValueError):
    """A request the model refuses. `status` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
