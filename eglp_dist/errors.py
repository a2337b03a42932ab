"""The one exception type for bad user input (config keys, files, shards).

The CLI prints it as one line and exits with status 2, without a traceback: the message
itself must name the key or file and what is wrong with it.
"""


class UserError(Exception):
    """Bad input from the user; the message names the key or file and the problem."""


class ConfigError(UserError, ValueError):
    """A config key is unknown, mistyped or has a bad value."""


class DataError(UserError, ValueError):
    """A dataset file, shard or manifest is missing or corrupt."""
