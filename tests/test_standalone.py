"""The repository stands alone: nothing it ships cites material outside it (notes a session kept elsewhere); facts
users need live in docs/, and every docs/ page a file cites exists."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".sh", ".ipynb", ".toml", ".txt", ".yaml", ".cfg")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith(TEXT) and (ROOT / n).exists()]


def test_no_citation_outside_the_repository():
    outside = re.compile(r"\.\./shared|/work/shared|shared/reference|(?<![/\w])(paper|environment|anchors|style)\.md")
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in tracked_text_files() if p != Path(__file__)
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not bad, f"citations of notes outside the repository (write the fact into docs/): {bad[:20]}"


def test_cited_docs_pages_exist():
    pages = {m for p in tracked_text_files() for m in re.findall(r"docs/[\w-]+\.md", p.read_text(errors="replace"))}
    assert pages and all((ROOT / page).is_file() for page in pages), sorted(pages)
