"""via-tunnel: run a program so that all of its traffic leaves through one chosen interface."""

__version__ = "0.1.0"
