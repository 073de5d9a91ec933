"""The data pipeline's error (neon/errors.py holds every Neon error and its exit status)."""

from neon.errors import DataError

__all__ = ["DataError"]
