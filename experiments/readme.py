"""The READMEs' result tables, generated from the committed results.

    python -m experiments.readme            # rewrite every results block of README.md and experiments/*/README.md
    python -m experiments.readme --check    # exit 1, naming each block that differs from its results file

A block is

    <!-- results: experiments/table2/results/max_length_cpu.md tables=1,2 -->
    (generated: do not edit)
    <!-- /results -->

and holds the named markdown file's tables (all of them, or the 1-based ``tables=`` list), each with the line of
prose above it in the file as its caption; the file's own headings are left out (the README has its own).
Paths are relative to the repository root. ``tests/experiments/test_readme.py`` runs the check, so a README that
disagrees with the results fails the suite.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .results import ROOT, write_text



def readmes() -> list[Path]:
    """README.md and every experiment's README."""
    return [ROOT / "README.md", *sorted((ROOT / "experiments").glob("*/README.md"))]
BLOCK = re.compile(r"(<!-- results: (?P<path>\S+)(?: tables=(?P<tables>[\d,]+))? -->\n)(?P<body>.*?)(<!-- /results -->)",
                   re.S)


def tables(markdown: str) -> list[str]:
    """The tables of ``markdown``, each with the nearest line above it as its caption unless that line is a
    heading or another table."""
    found, lines = [], markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            j = start - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            above = lines[j] if j >= 0 and not lines[j].startswith(("#", "|")) else None
            found.append("\n".join(([above, ""] if above else []) + lines[start:i]))
        else:
            i += 1
    return found


def render(path: str, picks: str | None) -> str:
    """The body of a block: the chosen tables of ``path``, separated by blank lines."""
    found = tables((ROOT / path).read_text())
    chosen = found if picks is None else [found[int(n) - 1] for n in picks.split(",")]
    return "\n\n".join(chosen) + "\n"


def regenerate(text: str) -> tuple[str, list[str]]:
    """``text`` with every block re-rendered, and the paths of the blocks that changed."""
    changed = []

    def fill(match: re.Match) -> str:
        body = render(match["path"], match["tables"])
        if body != match["body"]:
            changed.append(match["path"] + (f" tables={match['tables']}" if match["tables"] else ""))
        return match.group(1) + body + match.group(5)

    return BLOCK.sub(fill, text), changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that differ (exit 1)")
    args = parser.parse_args(argv)
    stale = []
    for path in readmes():
        text, changed = regenerate(path.read_text())
        name = path.relative_to(ROOT)
        stale += [f"{name}: {block}" for block in changed]
        if changed and not args.check:
            write_text(path, text)
            print(f"{name}: {len(changed)} block(s) rewritten ({'; '.join(changed)})")
    if args.check and stale:
        sys.exit("the READMEs disagree with the results: " + "; ".join(stale) + " (python -m experiments.readme "
                 "rewrites them)")


if __name__ == "__main__":
    main()
