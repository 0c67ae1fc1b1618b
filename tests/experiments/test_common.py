"""experiments/common.py: results are replaced atomically (a kill mid-write keeps the old files), numeric flags
are validated by argparse."""
import argparse
import json
import math
import sys
from pathlib import Path

import pytest

from tests.convergence.test_train_resume import Killed, dying_open

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402


def test_write_results_killed_midway_keeps_the_old_files(tmp_path, monkeypatch):
    stem = tmp_path / "table_cpu"
    common.write_results(stem, {"old": 1}, "# old\n")
    with monkeypatch.context() as m:
        m.setattr(Path, "open", dying_open())
        with pytest.raises(Killed):
            common.write_results(stem, {"new": "x" * 10_000}, "# new\n")
    assert json.loads(stem.with_suffix(".json").read_text()) == {"old": 1}
    assert stem.with_suffix(".md").read_text() == "# old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table_cpu.json", "table_cpu.md"]  # no temporary left
    common.write_results(stem, {"new": 2}, "# new\n")
    assert json.loads(stem.with_suffix(".json").read_text()) == {"new": 2}


def test_failed_serialisation_keeps_the_old_file(tmp_path):
    """json raising midway (a value it cannot write) leaves the previous results, not a cut file."""
    stem = tmp_path / "r"
    common.write_results(stem, {"old": 1}, "# old\n")
    with pytest.raises(TypeError):
        common.write_results(stem, {"a": list(range(1000)), "b": object()}, "# new\n")
    assert json.loads(stem.with_suffix(".json").read_text()) == {"old": 1}
    assert stem.with_suffix(".md").read_text() == "# old\n"


def test_atomic_output_keeps_the_suffix_and_replaces_only_on_success(tmp_path):
    """The temporary file keeps the suffix (``savefig`` picks the format from it) and sits next to the target."""
    out = tmp_path / "sub" / "fig.png"
    with common.atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp.suffix == ".png" and not out.exists()
        tmp.write_bytes(b"png")
    assert out.read_bytes() == b"png"
    with pytest.raises(RuntimeError), common.atomic_output(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("plotting failed")
    assert out.read_bytes() == b"png" and [p.name for p in out.parent.iterdir()] == ["fig.png"]


def _parse(*argv):
    p = argparse.ArgumentParser()
    common.add_scaled_model_args(p, Path("results"))
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv", [["--hidden", "0"], ["--hidden", "-128"], ["--hidden", "x"],
                                  ["--layers", "0"], ["--layers", "-1"]])
def test_scaled_model_args_refuse_bad_numbers(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(*argv)
    assert info.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_scaled_model_args_accept_good_numbers():
    args = _parse("--hidden", "64", "--layers", "1")
    assert (args.hidden, args.layers) == (64, 1)
    assert _parse().layers is None


@pytest.mark.parametrize("text, kind, ok", [
    ("3", "positive_int", True), ("0", "positive_int", False), ("1.5", "positive_int", False),
    ("0", "nonnegative_int", True), ("-1", "nonnegative_int", False),
    ("0.5", "positive_float", True), ("0", "positive_float", False), ("nan", "positive_float", False),
    ("inf", "positive_float", False), ("-inf", "positive_float", False), ("1e-300", "positive_float", True),
])
def test_argument_types(text, kind, ok):
    parse = getattr(common, kind)
    if ok:
        assert math.isfinite(parse(text))
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


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
        common.save_figure(fig, out)
    assert out.read_bytes() == b"old png" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
