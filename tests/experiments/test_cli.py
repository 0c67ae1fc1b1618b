"""experiments.cli: numeric flags are validated by argparse (finite, in range)."""
import argparse
import math
from pathlib import Path

import pytest

from experiments import cli


def _parse(*argv):
    p = argparse.ArgumentParser()
    cli.add_scaled_model_args(p, Path("results"))
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
    parse = getattr(cli, kind)
    if ok:
        assert math.isfinite(parse(text))
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
