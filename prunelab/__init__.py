"""prunelab: neural-network pruning and compression for PyTorch."""

from prunelab._version import __version__

__all__ = ["__version__"]
