"""The commands as a whole: `python -m xlmr_mini` lists them, one version, one spelling per concept
across commands (old spellings still accepted, hidden), and help on every flag."""
import argparse
import re
import subprocess
import sys

import pytest

import xlmr_mini
from conftest import REPO
from xlmr_mini import check, copy_weights, evaluate, predict, study, trim
from xlmr_mini.data import __main__ as data_cli
from xlmr_mini.train_config import _parser as train_parser, parse_config

PARSERS = {"train": train_parser, "evaluate": evaluate._parser, "copy_weights": copy_weights._parser,
           "trim": trim._parser, "study": study._parser, "check": check._parser, "data": data_cli._parser,
           "predict": predict._parser}
OLD_SPELLINGS = ("--train-langs", "--seeds", "--fraction")


def test_python_m_xlmr_mini_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "xlmr_mini"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    listed = re.findall(r"^  (\w+)  ", r.stdout, re.M)
    assert set(PARSERS) <= set(listed), listed
    assert xlmr_mini.__version__ in r.stdout


def test_one_version_read_by_setup_py():
    r = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == xlmr_mini.__version__, r.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+", xlmr_mini.__version__)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_has_help_and_old_spellings_are_hidden(command):
    parser = PARSERS[command]()
    for action in parser._actions:
        if any(s in OLD_SPELLINGS for s in action.option_strings):
            assert action.help == argparse.SUPPRESS, action.option_strings
        else:
            assert action.help and action.help != argparse.SUPPRESS, (command, action.option_strings or action.dest)
    shown = parser.format_help()
    assert not any(old in shown for old in OLD_SPELLINGS), command


def test_old_spellings_still_parse_with_a_note(capsys):
    new = parse_config(["--langs", "seen", "--seed", "1", "2", "--subset", "0.5", "--layer-map", "0", "2"])
    old = parse_config(["--train-langs", "seen", "--seeds", "1", "2", "--fraction", "0.5", "--layer-map", "0,2"])
    assert old == new and new.seeds == (1, 2) and new.layer_map == (0, 2) and new.train_langs == "seen"
    err = capsys.readouterr().err
    assert all(f"note: {o} is deprecated; use {n}" in err
               for o, n in (("--train-langs", "--langs"), ("--seeds", "--seed"), ("--fraction", "--subset")))
    assert data_cli._parser().parse_args(["--fraction", "0.1"]).subset == 0.1
    assert study._parser().parse_args(["all", "--seeds", "4"]).seeds == [4]


def test_one_spelling_per_concept_across_commands():
    """A concept two commands share has one flag name, and --layer-map one format."""
    flags = {name: {s for a in make()._actions for s in a.option_strings if a.help != argparse.SUPPRESS}
             for name, make in PARSERS.items()}
    assert "--langs" in flags["train"] and "--langs" in flags["evaluate"] and "--langs" in flags["data"]
    assert "--subset" in flags["train"] and "--subset" in flags["data"]
    assert all("--seed" in flags[c] for c in ("train", "study", "copy_weights", "data"))
    assert copy_weights._parser().parse_args(["--out", "x", "--layer-map", "0", "2", "4"]).layer_map == [0, 2, 4]
    assert parse_config(["--layer-map", "0", "2", "4"]).layer_map == (0, 2, 4)
