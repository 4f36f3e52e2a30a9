"""``weightsmith bench``: each sub-command parses only its own options, and the sweeps' old spellings
(``bench erase --sweep …``, ``bench merge --sweep …``) reach the same bench with the same options."""

from __future__ import annotations

import pytest

from weightsmith.core.cli import build_parser, resolve_aliases
from weightsmith.core.lab import erase_bench, erase_sweep, merge_bench, merge_sweep


def parse(argv):
    return build_parser().parse_args(resolve_aliases(argv))


def test_each_bench_runs_its_own_module():
    assert parse(["bench", "erase"]).func is erase_bench.run
    assert parse(["bench", "erase-sweep"]).func is erase_sweep.run
    assert parse(["bench", "merge"]).func is merge_bench.run
    assert parse(["bench", "merge-sweep"]).func is merge_sweep.run


@pytest.mark.parametrize(
    "old, new",
    [
        (
            ["bench", "erase", "--sweep", "--family", "world", "--quick", "--samples", "2", "--json"],
            ["bench", "erase-sweep", "--family", "world", "--quick", "--samples", "2", "--json"],
        ),
        (
            ["bench", "merge", "--pair", "clean", "--sweep", "--images", "3", "--eval-seed", "7"],
            ["bench", "merge-sweep", "--pair", "clean", "--images", "3", "--eval-seed", "7"],
        ),
    ],
)
def test_the_old_spelling_is_the_sweep(old, new):
    assert resolve_aliases(old) == new
    assert vars(parse(old)) == vars(parse(new))


def test_other_command_lines_are_left_alone():
    for argv in (["bench", "erase", "--json"], ["erase", "--sweep"], ["bench", "quality", "--quick"], []):
        assert resolve_aliases(argv) == argv


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "erase", "--samples", "4"],  # a sweep option on the timing bench (both have --family)
        ["bench", "erase", "--quick"],
        ["bench", "merge", "--images", "4"],
        ["bench", "merge", "--quick"],
        ["bench", "erase-sweep", "--repeats", "2"],  # a timing option on the sweep
        ["bench", "merge-sweep", "--latent-size", "8"],
    ],
)
def test_a_bench_refuses_another_benchs_options(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
