"""Structured events on stdout: one JSON object per line, the trainer's log for people and tests."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit(event: str, **fields: Any) -> None:
    """A structured event on stdout (one JSON object per line), from rank 0."""
    sys.stdout.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
    sys.stdout.flush()
