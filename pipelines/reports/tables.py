"""The report templates (jinja2, under `templates/`) and the tables they lay out.

Templates ending in `.html.j2` are autoescaped: every cell, title and caption that comes
from a run, a tag or the data is escaped by Jinja, never by hand. Markdown templates are
not (HTML entities would show literally); their cells escape `|` through `md_cell`.
"""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


class Table(NamedTuple):
    """A table of text cells, laid out by the `_tables.*.j2` macros."""

    head: list[str]
    rows: list[list[str]]


def md_cell(text: object) -> str:
    """A Markdown table cell: a `|` inside would end the cell."""
    return str(text).replace("|", "\\|")


@cache
def environment() -> Environment:
    """The one Jinja environment of the reports (templates packaged with pipelines.reports)."""
    env = Environment(
        loader=PackageLoader("pipelines.reports", "templates"),
        # select_autoescape matches the end of the name: `.html.j2` must be named to be escaped
        autoescape=select_autoescape(["html", "html.j2"], default_for_string=True),
        undefined=StrictUndefined,       # a missing value fails the report, never renders empty
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md_cell"] = md_cell
    return env


def render(template: str, **context: Any) -> str:
    """Render one report template with its context."""
    return environment().get_template(template).render(**context)
