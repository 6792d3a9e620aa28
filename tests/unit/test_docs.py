"""The README stays a front door and the guides stay true to the code's layout.

Checks: the README is at most 260 lines; every relative link in README.md and docs/*.md names a file that
exists; every `moeyard <subcommand>` the README mentions is one of launch/cli.py's COMMANDS; no doc spells a
module path of the old layout (`launch/plan/`, `launch.rank` without `moeyard.`, `moeyard_conf`).
Run: .venv/bin/pytest -q tests/unit/test_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeyard.launch.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
MAX_README_LINES = 260  # "at most about 250": a front door, with the depth in docs/

LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
SUBCOMMAND = re.compile(r"\bmoeyard ([a-z][a-z_-]*)\b")
OLD_LAYOUT = {
    "launch/plan/": re.compile(r"launch/plan/"),
    "launch.rank without moeyard.": re.compile(r"(?<!moeyard\.)\blaunch\.rank\b"),
    "moeyard_conf": re.compile(r"moeyard_conf"),
}


def relative_links(text: str) -> list[str]:
    """Link targets that name a file in this repository (no scheme, no pure #anchor), without the anchor."""
    targets = (m.group(1) for m in LINK.finditer(text))
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move depth into docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(doc: Path):
    missing = [t for t in relative_links(doc.read_text()) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_subcommands_exist():
    mentioned = set(SUBCOMMAND.findall(README.read_text()))
    assert mentioned, "README.md mentions no `moeyard <subcommand>`"
    assert mentioned <= set(COMMANDS), f"README.md mentions unknown subcommands: {sorted(mentioned - set(COMMANDS))}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_old_layout_paths(doc: Path):
    text = doc.read_text()
    found = [name for name, pattern in OLD_LAYOUT.items() if pattern.search(text)]
    assert not found, f"{doc.relative_to(ROOT)} still spells the old layout: {found}"
