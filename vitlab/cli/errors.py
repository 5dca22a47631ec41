"""The one exception type every subcommand raises for a user mistake."""


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2, no traceback."""
