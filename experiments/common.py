"""What the experiment scripts share: the scaled-model command line and argument checks, writing results
(atomically), reading them, saving figures.

Every results file is written with ``atomic_output``: to a temporary file in the same folder, renamed over the old
one only once complete (``os.replace``), so a run killed or failing while writing leaves the previous file whole,
never half a JSON. Run scripts and plot modules are imported by notebooks with their own folder on ``sys.path``, so
each puts this folder (experiments/) on the path before importing it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import matplotlib

matplotlib.use("Agg")  # headless: run scripts, CI and nbclient
import matplotlib.pyplot as plt  # noqa: E402


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix, so ``savefig`` picks the same format) to write the new file
    to; it replaces ``path`` when the block ends without an error, else it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _number(text: str, kind: type, low: float, strict: bool):
    """``text`` as a finite ``kind`` above ``low`` (``strict``) or at least it, else an argparse error."""
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, 0, strict=True)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, 0, strict=False)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (no nan / inf)."""
    return _number(text, float, 0.0, strict=True)


def save_figure(fig, out: str | Path, title: str | None = None, dpi: int = 120) -> Path:
    """Title, tight layout, PNG (folders created, replaced atomically), and the figure closed so notebooks and loops
    do not pile up."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return out


def add_scaled_model_args(parser: argparse.ArgumentParser, results_dir: Path) -> None:
    """--device, --hidden, --layers, --out: the options of every CPU-scaled / full-size GPU experiment."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=positive_int, default=128, help="hidden size of the scaled CPU models")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help="override the layer count (smoke runs only)")
    parser.add_argument("--out", default=str(results_dir))


def resolve_device(args: argparse.Namespace) -> Path:
    """Exit clearly when CUDA is asked for but absent; set ``args.dtype`` (fp32 on CPU, bf16 on CUDA); return the
    results folder, created."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_results(stem: Path, results: dict, markdown: str) -> None:
    """``stem``.json (everything) and ``stem``.md (the README table), each replaced atomically."""
    with atomic_output(stem.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    with atomic_output(stem.with_suffix(".md")) as tmp:
        tmp.write_text(markdown)
