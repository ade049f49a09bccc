"""The one error type users see: its message names the place and says what to do."""


class CrlftError(Exception):
    """An error the user can fix; its message says what to do."""


def first_line(exc: BaseException) -> str:
    """An exception's message for a one-line error: its first line, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
