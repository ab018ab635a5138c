"""docs/architecture.md matches the tree: its module map names every module of the packages,
every file path it names exists, and it names nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("api", "activities", "workflows", "workers", "examples")

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")
FILE_PATH = re.compile(r"^[A-Za-z0-9_.*/-]+\.(py|md)$")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def doc_text() -> str:
    return DOC.read_text()


def module_map(text: str) -> str:
    """Section 3, "Layers and packages": the module map."""
    start = text.index("## 3. ")
    return text[start : text.index("\n## ", start + 1)]


def backticked(text: str) -> set[str]:
    """Every inline code span outside fenced blocks."""
    return {span.strip() for span in INLINE.findall(FENCE.sub("", text))}


def named_files(text: str) -> set[str]:
    """Backticked file paths (`*.py`, `*.md`), as written."""
    return {span for span in backticked(text) if FILE_PATH.match(span)}


def package_modules() -> list[str]:
    """Every module file of the packages, relative to the repository root (packages'
    `__init__.py` left out: the map names them by folder)."""
    found = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "__init__.py" and "__pycache__" not in path.parts:
                found.append(path.relative_to(ROOT).as_posix())
    return sorted(found)


def listing(what: str, items: list[str]) -> str:
    return f"{what}:\n  " + "\n  ".join(items)


def test_the_package_walk_finds_modules_of_every_package() -> None:
    modules = package_modules()
    for package in PACKAGES:
        assert any(m.startswith(f"{package}/") for m in modules), package
    assert "activities/runtime/base.py" in modules
    assert "activities/storage/objectstore/s3.py" in modules


def test_every_module_is_in_the_module_map() -> None:
    named = named_files(module_map(doc_text()))
    missing = [module for module in package_modules() if module not in named]
    what = "modules missing from the module map (docs/architecture.md section 3, backticked)"
    assert not missing, listing(what, missing)


def test_every_path_named_exists() -> None:
    absent = []
    for path in sorted(named_files(doc_text())):
        if "*" in path:
            if not any(ROOT.glob(path)):
                absent.append(f"{path} (matches nothing)")
        elif not (ROOT / path).is_file():
            absent.append(path)
    assert not absent, listing("paths named in docs/architecture.md that do not exist", absent)


def test_nothing_outside_the_repository_is_named() -> None:
    text = doc_text()
    outside = [
        f"line {number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), 1)
        if "../" in line
    ]
    for target in LINK.findall(text):
        if "://" in target or target.startswith("#"):
            continue
        resolved = (DOC.parent / target.split("#")[0]).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            outside.append(f"link {target}")
    assert not outside, listing("docs/architecture.md names paths outside the repository", outside)
