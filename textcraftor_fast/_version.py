"""The package version (one place: the public API and the PNG settings of `generate` read it)."""
__version__ = "0.1.0"
