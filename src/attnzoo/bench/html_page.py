"""``report.html``: one self-contained page (the overview, every plot embedded as base64 PNG, every table)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from attnzoo.bench.tables import overview, sections

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f0f0f0;position:sticky;top:0}img{max-width:100%;border:1px solid #eee;margin:1em 0}
code{background:#f4f4f4;padding:1px 4px}li{margin:.2em 0}"""


def html_table(header: list[str], body: list[list[str]]) -> str:
    """An HTML table, every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def report_html(results: dict[str, Any], out: Path, images: list[str]) -> str:
    """The page for ``results``, embedding the PNG files ``images`` found under ``out``."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>attnzoo bench</title>",
             f"<style>{CSS}</style></head><body><h1>attnzoo bench</h1><ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in overview(results)]
    parts.append("</ul>")
    for name in images:
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(Path(name).stem)}</h3><img alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{data}'>")
    for title, header, body in sections(results):
        parts.append(f"<h2>{html.escape(title)}</h2>" + html_table(header, body))
    parts.append("</body></html>")
    return "\n".join(parts)
