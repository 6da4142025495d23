"""Plain tables for the reports stewards and reviewers read: Markdown and escaped HTML."""

from __future__ import annotations

import html


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; `|` inside a cell is escaped."""
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc]


def html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table with every cell escaped; `cls` names its CSS class."""
    th = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f" class='{html.escape(cls)}'" if cls else ""
    return f"<table{attr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"
