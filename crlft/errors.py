"""The one error type users see: its message names the place and says what to do."""


class CrlftError(Exception):
    """An error the user can fix; its message says what to do."""
