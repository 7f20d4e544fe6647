"""Errors raised before any expensive work, each naming the problem and the valid choices."""


class ConfigError(ValueError):
    """Bad configuration: names the problem and the valid choices."""


class DataError(ValueError):
    """Missing or malformed data file."""
