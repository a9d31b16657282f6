"""Every command-line tool answers --help, and its help shows every flag's default (in process: each tool's
parse_args, with the parser read back to know every flag and its default). The tools are found by reading
the repository's files (helpers.command_line_tools), the same list tests/test_flags.py checks."""
import argparse

import pytest

from helpers import Cli, command_line_tools

CLIS = {cli.name: cli for cli in command_line_tools()}
# and a tool with subcommands on its own ("preprocessing/dataset_tools.py --help")
TOOLS = {**{cli.path: Cli(cli.path, ()) for cli in CLIS.values()}, **CLIS}
# the developer tools under benchmarks/ answer --help, but need not show every default
USER_CLIS = [name for name, cli in CLIS.items() if not cli.path.startswith("benchmarks/")]


def test_the_tools_are_found():
    """A floor for the file scan: the tools we know of are among those it finds."""
    assert {"train.py", "generate.py", "sweep.py", "reg/export.py", "evaluations/evaluator.py",
            "evaluations/compare.py", "evaluations/plot_losses.py", "preprocessing/dataset_tools.py encode",
            "preprocessing/dataset_tools.py convert", "preprocessing/synthetic.py", "benchmarks/run.py",
            "benchmarks/gpu_check.py report", "benchmarks/cpu_vs_original.py"} <= set(CLIS)


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


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_tool_answers_help(name, capsys, monkeypatch):
    """Through the tool's own entry (parse_args, or main for a tool that builds its parser there)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[name].run(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", USER_CLIS)
def test_help_shows_every_flags_default(name, capsys, monkeypatch):
    cli = CLIS[name]
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default value
    parsers = []
    real = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["--help"])
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
        # a None default may instead be explained in words ("None: the newest checkpoint", "(default: the
        # checkpoint's)"), as HelpFormatter allows; then "(default: None)" is not added after it
        worded = action.default is None and ("None" in entry or "(default: " in entry)
        shown = f"(default: {action.default})" in entry or worded
        assert entry.count("(default: ") <= 1, f"{name}: {action.option_strings[0]} states two defaults: {entry}"
        assert shown, f"{name}: {action.option_strings[0]} does not show its default {action.default!r}: {entry}"
