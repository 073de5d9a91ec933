"""The converters' error (neon/errors.py holds every Neon error and its exit status)."""

from neon.errors import ConversionError

__all__ = ["ConversionError"]
