"""The package version, kept in one place so `server_info` never depends on installed metadata."""

__version__ = "0.2.0"
