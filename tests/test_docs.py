"""Every citation of a section of docs/methods.md or docs/design.md, in the code, the tests,
the README or the docs themselves, names a heading that exists (docs/ is where the
project documents itself; a renamed heading must not leave dangling citations)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*ROOT.glob("rope/**/*.py"), *ROOT.glob("patches/*.py"), *ROOT.glob("evals/*.py"),
           *ROOT.glob("tests/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]
# `methods.md, "A heading"` or `design.md ("A heading")`, possibly broken over lines
CITATION = re.compile(r"\b(methods|design)\.md,?\s*\(?\"([^\"]+)\"")


def headings(name: str) -> list[str]:
    text = (ROOT / "docs" / f"{name}.md").read_text(encoding="utf-8")
    return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]


def citations() -> list[tuple[str, str, str]]:
    found = []
    for path in SOURCES:
        if path == Path(__file__).resolve():
            continue  # its own comment shows the pattern
        text = " ".join(path.read_text(encoding="utf-8").split())  # one line: citations wrap
        found += [(path.relative_to(ROOT).as_posix(), doc, title) for doc, title in CITATION.findall(text)]
    return found


def test_every_cited_section_exists():
    known = {name: headings(name) for name in ("methods", "design")}
    found = citations()
    assert len(found) >= 10, found  # the code cites both files in many places; zero means the pattern broke
    missing = [(path, f"{doc}.md", title) for path, doc, title in found
               if not any(h.startswith(title) for h in known[doc])]
    assert not missing, f"citations of sections that do not exist: {missing}"
