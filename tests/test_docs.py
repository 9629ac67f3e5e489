"""The generated documentation is up to date with the registry."""

from __future__ import annotations

from pathlib import Path

from attnzoo.cli import methods_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_methods_table_is_up_to_date():
    path = ROOT / "docs" / "methods.md"
    assert path.read_text() == methods_markdown(), "docs/methods.md is stale: run `attnzoo list --markdown`"
