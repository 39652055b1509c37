"""The field reference of docs/user-guide.md, generated from the CRD schema (and so from the API models).

``python -m forge_operator.reference docs/user-guide.md`` rewrites the block between the two markers; a test
fails when the guide and the models disagree.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forge_operator.crd import openapi_schema

BEGIN = "<!-- BEGIN GENERATED FIELD REFERENCE (python -m forge_operator.reference docs/user-guide.md) -->"
END = "<!-- END GENERATED FIELD REFERENCE -->"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = str(node.get("type", ""))
    if kind == "array":
        return f"list of {_type(node['items'])}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type(node['additionalProperties'])}"
    if "enum" in node:
        return " \\| ".join(f"`{value}`" for value in node["enum"])
    return kind


def _bounds(node: dict[str, Any]) -> str:
    parts = []
    if "minimum" in node or "maximum" in node:
        parts.append(f"{node.get('minimum', '')}..{node.get('maximum', '')}")
    if "minItems" in node or "maxItems" in node:
        parts.append(f"{node.get('minItems', 0)}..{node.get('maxItems', '')} items")
    if "maxLength" in node:
        parts.append(f"length {node.get('minLength', 0)}..{node['maxLength']}")
    if "pattern" in node and not node.get("x-kubernetes-int-or-string"):
        parts.append("pattern")
    return ", ".join(parts)


def rows(node: dict[str, Any], path: str, required: bool) -> Iterator[str]:
    default = json.dumps(node["default"]) if "default" in node else ("required" if required else "")
    description = node.get("description", "").replace("|", "\\|").replace("\n\n", " ")
    yield f"| `{path}` | {_type(node)} | {default} | {_bounds(node)} | {description} |"
    children = node.get("properties") or {}
    if not children and node.get("type") == "array":
        children = node["items"].get("properties") or {}
        node, path = node["items"], f"{path}[]"
    needed = set(node.get("required") or [])
    for name, child in children.items():
        yield from rows(child, f"{path}.{name}", name in needed)


def field_reference() -> str:
    spec = openapi_schema()["properties"]["spec"]
    header = ["| Field | Type | Default | Bounds | Description |", "| --- | --- | --- | --- | --- |"]
    needed = set(spec.get("required") or [])
    body = [row for name, child in spec["properties"].items() for row in rows(child, f"spec.{name}", name in needed)]
    return "\n".join([BEGIN, *header, *body, END])


def rewrite(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + field_reference() + text[end:]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m forge_operator.reference docs/user-guide.md\n")
        return 2
    path = Path(argv[0])
    path.write_text(rewrite(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
