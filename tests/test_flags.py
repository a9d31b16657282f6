"""Every float flag of every command line is finite and in range; every JSON we write is strict; one reader of
metrics.jsonl that survives a kill; a user's mistake is one line on stderr (utils.run_main)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import generate
import sweep
import train
from evaluations import compare, plot_losses
from helpers import command_line_tools
from preprocessing import dataset_tools
from reg import run_log, utils

ROOT = Path(__file__).resolve().parents[1]

def float_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags that take a number: a plain float, or reg.utils.finite_float(s) (marked by finite_range)."""
    return [action for action in parser._actions if action.option_strings and
            (action.type is float or hasattr(action.type, "finite_range"))]


def test_every_float_flag_of_every_cli_refuses_nan_and_inf(capsys):
    """Every command line, found by reading the repository's files (helpers.command_line_tools: a new tool is
    checked without being listed), as tests/test_cli_help.py's --help tests."""
    checked = []
    for cli in command_line_tools():
        for action in float_flags(cli.parser()):
            flag = action.option_strings[0]
            assert action.type is not float, f"{cli.name} {flag}: a plain float; use reg.utils.finite_float"
            for bad in ("nan", "inf", "-inf"):
                with pytest.raises(SystemExit) as e:
                    cli.parse([f"{flag}={bad}"])  # "=": argparse takes a bare -inf for a flag
                err = capsys.readouterr().err
                assert e.value.code == 2 and flag in err and "finite" in err and err.count("\n") == 1, \
                    (cli.name, flag, err)
            checked.append((cli.name, flag))
    assert len(checked) >= 28, checked  # train 15, generate 4, sweep 4, evaluator 3, benchmarks/run.py 1, reg/export.py 1
    assert ("reg/export.py", "--fid") in checked  # python -m reg.export: its --fid nan was once accepted


@pytest.mark.parametrize("parse_args,argv,message", [
    (train.parse_args, ["--max-grad-norm", "-1"], r"--max-grad-norm: must be in \(0, inf\), got -1"),
    (train.parse_args, ["--max-grad-norm", "0"], r"--max-grad-norm: must be in \(0, inf\), got 0"),
    (train.parse_args, ["--proj-coeff", "nan"], "--proj-coeff: must be a finite number"),
    (train.parse_args, ["--learning-rate", "0"], "--learning-rate: must be in"),
    (train.parse_args, ["--allow-run-change", "lr"], "--allow-run-change lr: --lr is not a run-defining flag"),
    (generate.parse_args, ["--cfg-scale", "inf"], "--cfg-scale: must be a finite number"),
    (generate.parse_args, ["--cls-cfg-scale", "nan"], "--cls-cfg-scale: must be a finite number"),
    (generate.parse_args, ["--guidance-high", "1.5"], r"--guidance-high/--guidance_high: must be in \[0, 1\], got 1.5"),
    (sweep.parse_args, ["--cfg-scale", "1,nan"], "--cfg-scale: must be a finite number, got 'nan'"),
    (sweep.parse_args, ["--cfg-scale", ","], "--cfg-scale: expected comma-separated numbers"),
])
def test_bad_float_flags_are_refused_by_name(capsys, parse_args, argv, message):
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err
    assert __import__("re").search(message, err) and err.count("\n") == 1, err


def test_json_is_strict(tmp_path):
    path = tmp_path / "args.json"
    utils.atomic_json_dump({"a": 1}, path)
    with pytest.raises(ValueError, match="not JSON compliant"):
        utils.atomic_json_dump({"proj_coeff": float("nan")}, path)
    assert json.loads(path.read_text()) == {"a": 1} and not list(tmp_path.glob(".*.tmp"))  # old file intact
    metrics = tmp_path / "metrics.jsonl"
    run_log.append_record(metrics, {"step": 1, "loss": float("nan"), "lr": 1e-4})
    run_log.append_record(metrics, {"step": 1, "fid": float("inf")})
    text = metrics.read_text()
    assert text == '{"step": 1, "loss": null, "lr": 0.0001}\n{"step": 1, "fid": null}\n'
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert compare.read_metrics(str(metrics))[1][0]["fid"] is None  # compare skips it (tested there)
    assert plot_losses.read_metrics(str(metrics))[0]["loss"] is None


def test_torn_metrics_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    run_log.write_records(path, good)
    assert run_log.trim_torn_tail(path) is None
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a kill mid-append
    notes = []
    assert run_log.read_metrics(path, warn=notes.append) == good and "metrics.jsonl:3" in notes[0]
    assert "metrics.jsonl:3" in run_log.trim_torn_tail(path)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in good)
    run_log.append_record(path, {"step": 3, "loss": 0.25})
    assert [r["step"] for r in run_log.read_metrics(path)] == [1, 2, 3]

    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # a bad line elsewhere: not a kill
    for read in (run_log.read_metrics, run_log.trim_torn_tail, plot_losses.read_metrics):
        with pytest.raises(utils.UserError, match=r"metrics.jsonl:2: not a metrics record"):
            read(str(path))
    with pytest.raises(compare.RunError, match=r"metrics.jsonl:2"):
        compare.read_metrics(str(path))


def test_run_main_prints_one_line_for_a_user_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tool.py", "--x", "1"])
    monkeypatch.delenv(utils.DEBUG_ENV, raising=False)

    def fails(exc):
        def main(args):
            raise exc
        return main
    parse = lambda argv: argv  # noqa: E731
    for exc in (utils.UserError("--x 1: bad\nreally"), FileNotFoundError("no such file: a.npz")):
        with pytest.raises(SystemExit) as e:
            utils.run_main(fails(exc), parse)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("tool.py: error: ") and err.count("\n") == 1, err
    with pytest.raises(RuntimeError, match="a bug"):  # bugs keep their traceback
        utils.run_main(fails(RuntimeError("a bug")), parse)
    monkeypatch.setenv("RANK", "1")  # other ranks of a launch exit alike, silently
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        utils.run_main(fails(utils.UserError("bad")), parse)
    assert e.value.code == 2 and capsys.readouterr().err == ""
    for world in (None, "1", "two"):  # no launch that a rank 0 would print for: this process prints
        monkeypatch.delenv("WORLD_SIZE") if world is None else monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(SystemExit) as e:
            utils.run_main(fails(utils.UserError("bad")), parse)
        assert e.value.code == 2 and capsys.readouterr().err.startswith("tool.py: error: bad"), world
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(utils.DEBUG_ENV, "1")
    with pytest.raises(utils.UserError):
        utils.run_main(fails(utils.UserError("bad")), parse)
    assert utils.run_main(lambda: 3) == 3


def test_dataset_tools_and_sweep_mistakes_are_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(utils.DEBUG_ENV, raising=False)
    for argv, main, parse, message in (
            (["encode", "--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "d")], dataset_tools.main,
             dataset_tools.parse_args, "--source"),
            (["--ref-batch", "r.npz", "--out", str(tmp_path), "--num-samples", "1"], sweep.main, sweep.parse_args,
             "--num-samples must be >= 2")):
        monkeypatch.setattr(sys, "argv", ["tool.py", *argv])
        with pytest.raises(SystemExit) as e:
            utils.run_main(main, parse)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_py_user_error_is_one_line(monkeypatch, capsys, tmp_path):
    """A missing --data-dir, met inside main (after the accelerator is up): one line, status 2."""
    monkeypatch.delenv(utils.DEBUG_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py", "--model", "SiT-T/2", "--resolution", "32", "--method", "sit",
                                      "--data-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path),
                                      "--report-to", "none", "--num-workers", "0"])
    with pytest.raises(SystemExit) as e:
        utils.run_main(train.main, train.parse_args, user_errors=(train.CheckpointError,))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("train.py: error: missing data") and err.count("\n") == 1, err


def test_a_script_prints_one_line_and_reg_debug_shows_the_traceback(tmp_path):
    """End to end through a real process (evaluations/plot_losses.py: torch-free, so it starts in a fraction of a second)."""
    argv = [sys.executable, str(ROOT / "evaluations/plot_losses.py"), str(tmp_path / "nope.jsonl")]
    env = {k: v for k, v in os.environ.items() if k != utils.DEBUG_ENV}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("plot_losses.py: error: metrics file ") and "nope.jsonl" in done.stderr
    debug = subprocess.run(argv, capture_output=True, text=True, env={**env, utils.DEBUG_ENV: "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
