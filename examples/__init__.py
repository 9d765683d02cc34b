"""Runnable examples for tvlang; each subpackage runs with ``python -m examples.<name>``."""
