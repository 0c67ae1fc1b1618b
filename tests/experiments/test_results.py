"""experiments.results: results are replaced atomically (a kill mid-write keeps the old files), the environment
header every results file starts with, the one home of figures."""
import json
from pathlib import Path

import pytest

from experiments import results
from tests.experiments.train.test_resume import Killed, dying_open


def test_write_results_killed_midway_keeps_the_old_files(tmp_path, monkeypatch):
    stem = tmp_path / "table_cpu"
    results.write_results(stem, {"old": 1}, "# old\n")
    with monkeypatch.context() as m:
        m.setattr(Path, "open", dying_open())
        with pytest.raises(Killed):
            results.write_results(stem, {"new": "x" * 10_000}, "# new\n")
    assert json.loads(stem.with_suffix(".json").read_text()) == {"old": 1}
    assert stem.with_suffix(".md").read_text() == "# old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table_cpu.json", "table_cpu.md"]  # no temporary left
    results.write_results(stem, {"new": 2}, "# new\n")
    assert json.loads(stem.with_suffix(".json").read_text()) == {"new": 2}


def test_failed_serialisation_keeps_the_old_file(tmp_path):
    """json raising midway (a value it cannot write) leaves the previous results, not a cut file."""
    stem = tmp_path / "r"
    results.write_results(stem, {"old": 1}, "# old\n")
    with pytest.raises(TypeError):
        results.write_results(stem, {"a": list(range(1000)), "b": object()}, "# new\n")
    assert json.loads(stem.with_suffix(".json").read_text()) == {"old": 1}
    assert stem.with_suffix(".md").read_text() == "# old\n"


def test_atomic_output_keeps_the_suffix_and_replaces_only_on_success(tmp_path):
    """The temporary file keeps the suffix (``savefig`` picks the format from it) and sits next to the target."""
    out = tmp_path / "sub" / "fig.png"
    with results.atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp.suffix == ".png" and not out.exists()
        tmp.write_bytes(b"png")
    assert out.read_bytes() == b"png"
    with pytest.raises(RuntimeError), results.atomic_output(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("plotting failed")
    assert out.read_bytes() == b"png" and [p.name for p in out.parent.iterdir()] == ["fig.png"]


def test_save_figure_killed_midway_keeps_the_old_png(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    out = tmp_path / "fig.png"
    out.write_bytes(b"old png")
    fig = plt.figure()

    def dying_savefig(path, **kwargs):
        Path(path).write_bytes(b"half a png")
        raise Killed

    monkeypatch.setattr(fig, "savefig", dying_savefig)
    with pytest.raises(Killed):
        results.save_figure(fig, out)
    assert out.read_bytes() == b"old png" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def test_environment_names_device_versions_and_commit():
    env = results.environment("cpu")
    assert env["device"].startswith("CPU (") and env["device_type"] == "cpu"
    assert set(env["versions"]) == {"torch", "transformers", "mst", "python"}
    assert env["git_sha"] is None or len(env["git_sha"].removesuffix("-dirty")) == 12
    assert env["date"][:2] == "20"


def test_figures_live_in_paper_figures():
    assert results.figure_path("fig1c_max_length") == results.ROOT / "paper_figures" / "fig1c_max_length.png"
    assert results.figure_path("x", "cuda", "/tmp/f") == Path("/tmp/f/x_cuda.png")
