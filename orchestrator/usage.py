"""The one error type CLI commands raise for a bad flag or config value."""


class UsageError(Exception):
    """A bad flag or config value; the message names it. Printed as one line, exit code 2."""
