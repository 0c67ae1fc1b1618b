"""Command lines of the experiment scripts: numeric argument types that refuse nonsense, and the options of every
scaled-model (CPU) / full-size (GPU) experiment."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch


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


def add_scaled_model_args(parser: argparse.ArgumentParser, results_dir: Path) -> None:
    """--device, --hidden, --layers, --out: the options of every CPU-scaled / full-size GPU experiment."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=positive_int, default=128, help="hidden size of the scaled CPU models")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help="override the layer count (smoke runs only)")
    parser.add_argument("--out", default=str(results_dir))
    add_figures_arg(parser)


def add_figures_arg(parser: argparse.ArgumentParser) -> None:
    """--figures: where the run's figures go (default paper_figures/, their one home; tests and side runs pass
    another folder)."""
    parser.add_argument("--figures", default=None, help="folder for the figures (default paper_figures/)")


def require_device(device: str) -> None:
    """Exit with a clear message when CUDA is asked for but absent."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")


def resolve_device(args: argparse.Namespace) -> Path:
    """``require_device``; set ``args.dtype`` (fp32 on CPU, bf16 on CUDA); return the results folder, created."""
    require_device(args.device)
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out
