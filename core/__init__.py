"""Weightsmith's UI-agnostic core (docs/method.md, "Layout"). Importing it loads nothing heavy."""

__version__ = "0.1.0"
