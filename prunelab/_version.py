"""The package version, in one place: ``prunelab.__version__``, ``prunelab --version``, the packaging
metadata (pyproject.toml) and the header of every model file read it here."""

__version__ = "0.1.0"
