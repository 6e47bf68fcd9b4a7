"""A tiny library for the demo's tests."""

from __future__ import annotations

import re


def slugify(text: str) -> str:
    """Lower-case words joined by dashes."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))
