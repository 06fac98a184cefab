"""One exception type for mistakes a user can fix; the CLIs print it as one line."""


class UserError(Exception):
    """Bad input: a wrong path, a file that does not fit, an impossible option.

    The message says what is wrong and, where it helps, what to do about it.
    Command-line scripts print it as `error: <message>` and exit with status 2.
    """
