"""Results files: the environment header every experiment records, atomic writes, figures.

Every results file is written with ``atomic_output``: to a temporary file in the same folder, renamed over the old
one only once complete (``os.replace``), so a run killed or failing while writing leaves the previous file whole,
never half a JSON.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import matplotlib

matplotlib.use("Agg")  # headless: run scripts, CI and nbclient
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU's model with the threads torch uses (what a reader needs to compare numbers)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"CPU ({names[0] if names else platform.machine()}, {torch.get_num_threads()} threads)"


def git_sha() -> str | None:
    """The repository's commit, with "-dirty" when tracked files differ from it; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: str | torch.device) -> dict:
    """The header of every results file, stored under its "environment" key: where and with what it ran (device
    name and type, torch / transformers / mst / python versions, git SHA, date, host)."""
    import transformers

    import mst

    return {"device": device_name(device), "device_type": torch.device(device).type,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "mst": mst.__version__, "python": platform.python_version()},
            "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node()}


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


def write_text(path: str | Path, text: str) -> None:
    """``text`` as ``path``, replaced atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: dict) -> None:
    """``data`` as indented JSON at ``path``, replaced atomically."""
    write_text(path, json.dumps(data, indent=1))


def write_results(stem: Path, results: dict, markdown: str) -> None:
    """``stem``.json (everything) and ``stem``.md (the README table), each replaced atomically."""
    write_json(stem.with_suffix(".json"), results)
    write_text(stem.with_suffix(".md"), markdown)


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


def figure_path(name: str, device: str | torch.device = "cpu", folder: str | Path | None = None) -> Path:
    """``paper_figures/<name>.png`` (``<name>_cuda.png`` for a GPU run): the one home of every figure, drawn by the
    run scripts and redrawn by the notebooks from the committed results. ``folder`` replaces paper_figures/ (tests,
    side runs)."""
    device = torch.device(device).type
    return Path(folder or ROOT / "paper_figures") / f"{name}{'' if device == 'cpu' else f'_{device}'}.png"
