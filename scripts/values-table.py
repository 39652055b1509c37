#!/usr/bin/env python3
"""Prints the Markdown table of the Forge chart's values (key, type, default, description) from
charts/forge/values.yaml, whose `# -- description` comments (helm-docs style) document every value.

docs/monitoring.md holds this table between the markers `<!-- values-table:start -->` and `<!-- values-table:end -->`;
`python3 scripts/values-table.py --write` refreshes it, and tests/chart/test_docs.py fails when it is out of date.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
VALUES = ROOT / "charts" / "forge" / "values.yaml"
DOC = ROOT / "docs" / "monitoring.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
KEY = re.compile(r"^( *)([A-Za-z][A-Za-z0-9]*):")


def documented_values(text: str) -> list[tuple[str, str]]:
    """``(dotted key, description)`` of every `# --` documented value, in file order."""
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    out = []
    covered: int | None = None
    for i, line in enumerate(lines):
        m = KEY.match(line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        if covered is not None and indent > covered:
            continue
        covered = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comments: list[str] = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            comments.insert(0, lines[j].strip())
            j -= 1
        start = next((k for k, c in enumerate(comments) if c.startswith("# --")), None)
        if start is None:
            continue
        words = [comments[start].removeprefix("# --").strip()]
        words += [c.removeprefix("#").strip() for c in comments[start + 1 :]]
        out.append((".".join(k for _, k in stack), " ".join(w for w in words if w)))
        covered = indent
    return out


def lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        node = node[part]
    return node


def type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(
        type(value), "any"
    )


def table() -> str:
    text = VALUES.read_text()
    values = yaml.safe_load(text)
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for key, description in documented_values(text):
        value = lookup(values, key)
        default = json.dumps(value, separators=(",", ":"))
        text = description.replace("|", "\\|")
        rows.append(f"| `{key}` | {type_name(value)} | `{default}` | {text} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    rendered = table()
    if "--write" in sys.argv[1:] or "--check" in sys.argv[1:]:
        doc = DOC.read_text()
        before, _, rest = doc.partition(START)
        _, _, after = rest.partition(END)
        if not rest:
            print(f"{DOC}: markers {START} ... {END} not found", file=sys.stderr)
            return 1
        updated = f"{before}{START}\n{rendered}{END}{after}"
        if "--check" in sys.argv[1:]:
            if updated != doc:
                print(
                    f"{DOC}: the values table is out of date: run python3 scripts/values-table.py --write",
                    file=sys.stderr,
                )
                return 1
            return 0
        DOC.write_text(updated)
        return 0
    sys.stdout.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
