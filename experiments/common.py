"""What the experiment scripts share: the scaled-model command line, writing results, reading them, saving figures.

Run scripts and plot modules are imported by notebooks with their own folder on ``sys.path``, so each puts this
folder (experiments/) on the path before importing it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import matplotlib

matplotlib.use("Agg")  # headless: run scripts, CI and nbclient
import matplotlib.pyplot as plt  # noqa: E402


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def save_figure(fig, out: str | Path, title: str | None = None, dpi: int = 120) -> Path:
    """Title, tight layout, PNG (folders created), and the figure closed so notebooks and loops do not pile up."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def add_scaled_model_args(parser: argparse.ArgumentParser, results_dir: Path) -> None:
    """--device, --hidden, --layers, --out: the options of every CPU-scaled / full-size GPU experiment."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the scaled CPU models")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (smoke runs only)")
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
    """``stem``.json (everything) and ``stem``.md (the README table)."""
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown)
