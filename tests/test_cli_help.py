"""Every command-line tool answers --help, and its help shows every flag's default (in process: each tool's
parse_args, with the parser read back to know every flag and its default)."""
import argparse
import sys

import pytest


def _clis():
    import generate
    import sweep
    import train
    from evaluations import compare, evaluator, plot_losses
    from preprocessing import dataset_tools, synthetic
    return {
        "train.py": (train.parse_args, []),
        "generate.py": (generate.parse_args, []),
        "sweep.py": (sweep.parse_args, []),
        "evaluations/evaluator.py": (evaluator.parse_args, []),
        "evaluations/compare.py": (compare.parse_args, []),
        "preprocessing/dataset_tools.py convert": (dataset_tools.parse_args, ["convert"]),
        "preprocessing/dataset_tools.py encode": (dataset_tools.parse_args, ["encode"]),
        "preprocessing/synthetic.py": (synthetic.parse_args, []),
        "evaluations/plot_losses.py": (plot_losses.parse_args, []),
    }


def _entries(text: str) -> dict[str, str]:
    """First option string -> its help entry (the option lines and their indented continuation), whitespace
    collapsed."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("name", list(_clis()))
def test_help_shows_every_flags_default(name, capsys, monkeypatch):
    parse, prefix = _clis()[name]
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default value
    parsers = []
    real = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    with pytest.raises(SystemExit) as exit_info:
        parse([*prefix, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = parsers[-1]  # the (sub)command's parser, which printed the help
    entries = _entries(text)
    flags = [a for a in parser._actions
             if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
    assert flags, name
    for action in flags:
        entry = entries.get(action.option_strings[0])
        assert entry is not None, f"{name}: {action.option_strings[0]} is not in --help"
        # a None default may instead be explained in words ("None: the newest checkpoint"), as HelpFormatter allows
        shown = f"(default: {action.default})" in entry or (action.default is None and "None" in entry)
        assert shown, f"{name}: {action.option_strings[0]} does not show its default {action.default!r}: {entry}"


def test_benchmark_tools_answer_help(capsys, monkeypatch):
    """The benchmark scripts are developer tools: --help must work (their defaults are not all shown)."""
    from benchmarks import cpu_vs_original, gpu_check, run
    for call in (lambda: run.parse_args(["--help"]), lambda: gpu_check.main(["--help"]), cpu_vs_original.main):
        monkeypatch.setattr(sys, "argv", ["prog", "--help"])
        with pytest.raises(SystemExit) as exit_info:
            call()
        assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
