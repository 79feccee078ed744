"""The one exception the data side raises for bad data or a bad data location."""


class DataError(Exception):
    """The data cannot be used: too many invalid records, nothing left to train on, or no such objects."""
