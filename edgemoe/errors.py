"""The one exception type edgemoe raises for bad input."""


class EdgeMoEError(ValueError):
    """Bad input: a file, a value or an option. The message names it and what is wrong."""
