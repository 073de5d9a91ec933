"""The one error type of the data pipeline."""


class DataError(ValueError):
    """A data file or data setting Neon cannot train from; the message names the file and the fix."""
