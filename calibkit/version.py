"""The calibkit version (a module of its own, so any floor can read it without importing the others)."""

__version__ = "0.1.0"
