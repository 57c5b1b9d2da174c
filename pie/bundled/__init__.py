"""Inferlets the daemon ships and launches itself (`--openai`).

These files are guest programs: the daemon reads their source (`source()`)
and runs it as a server instance. The host never imports them.
"""

from __future__ import annotations

from pathlib import Path


def source(name: str) -> bytes:
    """The source of the bundled inferlet `name` (e.g. "openai")."""
    return (Path(__file__).parent / f"{name}.py").read_bytes()
