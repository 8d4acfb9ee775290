"""Exceptions raised by the data loaders."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """Files of a dataset are missing (and were not, or could not be, downloaded).

    A subclass of :class:`FileNotFoundError` so generic handlers still catch it; the
    message lists every missing file, where it belongs and how to get it.
    """


class ChecksumError(ValueError):
    """A file's bytes do not match the checksum they were published with."""
