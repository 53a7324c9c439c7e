"""Thin entry points, run as ``python -m jobs.<name>``."""
