"""The one exception every configuration check raises: a one-line message that names the field at fault."""


class ConfigError(ValueError):
    """A configuration value that cannot describe a working model or run; the message names the field."""
