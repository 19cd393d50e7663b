"""User-facing errors. The CLI prints ``tinyseek: error: <message>`` (one line) and exits 2."""


class UserError(Exception):
    """Bad input from the user: a config value, a file, a request. Message is one line."""
