"""The one exception type for mistakes a user can make (bad config, data, hostfile, checkpoint, disk).

The CLI and the training entry point print its one-line message and exit with its code; anything else
that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's first message line for a one-line error (its type's name when it has no message)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
