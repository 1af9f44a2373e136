"""The ``lsun-hitl`` command line: one module per group of commands (``cli.main`` assembles them)."""

from cli.main import build_parser, main

__all__ = ["build_parser", "main"]
