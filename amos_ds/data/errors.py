"""The one exception the data pipeline raises for bad input: a one-line message naming the file and the fix."""


class DataError(Exception):
    """Bad input data (missing, unreadable, binary, empty, mismatched or corrupt); `amos-ds` prints it and exits 2."""
