"""What the registries say, rendered: `byztrain list` text and the generated tables in docs/.

Everything here reads `byztrain.registry`; nothing names a plugin. The generated blocks in docs/*.md sit
between ``<!-- registry:KIND -->`` and ``<!-- /registry:KIND -->``; `make docs` rewrites them and
tests/test_config_doc.py fails when they drift from the code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from byztrain.registry import DEFENSES, KINDS, SERVER, Entry, Param, Registry


def default_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if not isinstance(value, str) else value


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _entries(registry: Registry) -> list[Entry]:
    return [e for e in registry.values() if not (registry is DEFENSES and e.name == SERVER)]


# ---- markdown --------------------------------------------------------------------------------------


def params_table(registry: Registry, title: str, intro: str) -> list[str]:
    """One row per (plugin, parameter): accepted values, default, meaning."""
    lines = [f"## {title}", "", intro, "", "| name | parameter | accepted | default | meaning |", "|---|---|---|---|---|"]
    for e in _entries(registry):
        rows = [
            f"| `{e.name}` | `{p.name}` | {_cell(p.accepted())} | `{default_text(p.default)}` | {_cell(p.meaning)} |"
            for p in e.params
        ]
        lines += rows or [f"| `{e.name}` | none | | | |"]
    return lines


def catalog_table(registry: Registry) -> list[str]:
    """One row per plugin: what it does, variant, preconditions, parameters (defaults), reference; attacks
    also list the hooks they override. Columns no entry fills are left out."""
    rows = []
    for e in _entries(registry):
        params = ", ".join(f"`{p.name}` ({default_text(p.default)})" for p in e.params)
        rows.append({
            "name": f"`{e.name}`",
            "hooks": ", ".join(e.extra.get("hooks", [])),
            "does": e.summary,
            "variant": e.variant,
            "preconditions": e.preconditions,
            "params (defaults)": params,
            "reference": e.reference,
        })
    head = [c for c in rows[0] if any(r[c] for r in rows)] if rows else ["name"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(r[c] or "—") for c in head) + " |" for r in rows]
    return lines


_BLOCK = re.compile(r"(<!-- registry:([a-z-]+) -->\n).*?(<!-- /registry:\2 -->)", re.S)


def fill_blocks(text: str) -> str:
    """``text`` with every registry block regenerated from the registries."""

    def table(match: re.Match) -> str:
        kind = match.group(2)
        if kind not in KINDS:
            raise ValueError(f"unknown registry block {kind!r}; known: {', '.join(KINDS)}")
        body = "\n".join(catalog_table(KINDS[kind]))
        return f"{match.group(1)}{body}\n{match.group(3)}"

    return _BLOCK.sub(table, text)


def generated_docs(root: Path) -> dict[Path, str]:
    """Every docs/*.md that holds a registry block, with its blocks regenerated."""
    out = {}
    for path in sorted((root / "docs").glob("*.md")):
        text = path.read_text()
        if "<!-- registry:" in text:
            out[path] = fill_blocks(text)
    return out


# ---- `byztrain list` -----------------------------------------------------------------------------


def _param_line(p: Param) -> str:
    return f"      {p.name} = {default_text(p.default)}  ({p.accepted()}): {p.meaning}"


def describe(entry: Entry) -> list[str]:
    lines = [f"  {entry.name}: {entry.summary}"]
    for label, value in (("variant", entry.variant), ("needs", entry.preconditions), ("reference", entry.reference)):
        if value:
            lines.append(f"      {label}: {value}")
    return lines + [_param_line(p) for p in entry.params]


def render(kind: str) -> str:
    """The text of `byztrain list KIND`: every entry with its parameters, defaults and reference."""
    registry = KINDS[kind]
    head = f"{kind} ({registry.field})"
    if registry is DEFENSES:
        head += ": these, or any name in `byztrain list aggregators` (on a trusted server, with defense.pre)"
    lines = [head]
    for e in _entries(registry):
        lines += describe(e)
    return "\n".join(lines)
