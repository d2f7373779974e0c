"""The installed hc-retrofit version (written into every checkpoint and output manifest)."""

__version__ = "0.1.0"
