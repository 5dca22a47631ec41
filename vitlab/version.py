"""The installed vitlab version, read from the package metadata (pyproject.toml is its one source)."""

from importlib import metadata

try:
    __version__ = metadata.version("vitlab")
except metadata.PackageNotFoundError:  # a source tree that was never pip-installed
    __version__ = "0.0.0+unknown"
