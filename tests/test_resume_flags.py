"""Resuming with a changed command line (reg/resume_flags.py): every train.py flag classed, run-defining changes
refused, hyperparameters applied after the optimizer state and recorded; divergence never checkpointed;
a torn metrics.jsonl line trimmed on resume."""
import argparse
import json
import os
import re
from pathlib import Path

import pytest
import torch

import train
from helpers import parser_of, tiny_argv
from reg import resume_flags, train_step
from reg.resume_flags import FLAG_CLASSES, HYPER, OPERATIONAL, RUN
from reg.utils import UserError

ROOT = Path(__file__).resolve().parents[1]
# conftest.py: a fresh accelerate state per test (train.main runs in process), the FLOP count kept per architecture
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state", "flops_counted_once_per_architecture")


def test_every_train_flag_has_a_resume_class():
    dests = {a.dest for a in parser_of(train.parse_args)._actions if a.dest != "help"}
    missing = sorted(dests - set(FLAG_CLASSES))
    assert not missing, (f"train.py flag(s) {['--' + d.replace('_', '-') for d in missing]} have no resume class: "
                         f"add each to FLAG_CLASSES in reg/resume_flags.py (run / hyper / operational, with why) and its "
                         f"row to docs/resuming.md (`python reg/resume_flags.py` prints the table)")
    stale = sorted(set(FLAG_CLASSES) - dests)
    assert not stale, f"FLAG_CLASSES in reg/resume_flags.py names flags train.py no longer has: {stale}"
    assert {k for k, _ in FLAG_CLASSES.values()} == {RUN, HYPER, OPERATIONAL}


def test_docs_table_is_the_code_table():
    doc = (ROOT / "docs/resuming.md").read_text()
    assert resume_flags.markdown_table() in doc, "docs/resuming.md: paste the output of `python reg/resume_flags.py`"


def test_official_and_old_args_are_compared_by_their_names():
    """The authors' checkpoints hold an argparse.Namespace (their --sampling-steps is our --sample-every);
    flags an older checkpoint does not record are not compared."""
    args = train.parse_args(["--model", "SiT-B/2", "--path-type", "cosine", "--sample-every", "5"])
    theirs = argparse.Namespace(model="SiT-B/2", path_type="linear", sampling_steps=10000, encoder_depth=4)
    with pytest.raises(UserError, match=r"--path-type 'linear' -> 'cosine'\. Restore") as e:
        resume_flags.check_resume(theirs, args, step=4, where="ckpt.pt")
    assert "\n" not in str(e.value) and "--sample-every" not in str(e.value)
    assert resume_flags.check_resume({"model": "SiT-B/2"}, train.parse_args(["--model", "SiT-B/2"]), step=4,
                                  where="x") == []
    with pytest.raises(UserError, match="--learning-rate is not a run-defining flag"):
        resume_flags.parse_allow_run_change("path-type,learning-rate")


def test_resume_with_changed_flags(data_dir, tmp_path, monkeypatch):
    common = ("--checkpointing-steps", "2")
    run = tmp_path / "chg"
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "chg", "--max-train-steps", "2", *common)))
    files = sorted(p.name for p in (run / "checkpoints").iterdir())

    # run-defining: refused, naming each old -> new, nothing written
    with pytest.raises(UserError) as e:
        train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "chg", "--max-train-steps", "4", *common,
                                              "--path-type", "cosine", "--cls", "0.5")))
    assert "--path-type 'linear' -> 'cosine'" in str(e.value) and "--cls 0.03 -> 0.5" in str(e.value)
    assert "--allow-run-change path-type,cls" in str(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == files

    # hyperparameters: applied (lr in the param groups and the log, EMA decay and clipping in the step)
    # and recorded once; operational flags (--log-every) accepted; a torn last metrics line trimmed
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')
    seen = []
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: seen.append(k["step_cfg"]) or real_step(*a, **k))
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "chg", "--max-train-steps", "4", *common,
                                          "--learning-rate", "0.01", "--adam-beta2", "0.99", "--ema-decay", "0.5",
                                          "--max-grad-norm", "2", "--log-every", "1")))
    assert {(c.ema_decay, c.max_grad_norm) for c in seen} == {(0.5, 2.0)}
    opt = torch.load(run / "checkpoints/0000004.opt.pt", weights_only=True)["opt"]
    assert {(g["lr"], tuple(g["betas"])) for g in opt["param_groups"]} == {(0.01, (0.9, 0.99))}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 3, 4] and [r["lr"] for r in lines] == [1e-4, 0.01, 0.01]
    log = (run / "log.txt").read_text()
    assert "metrics.jsonl:2: skipped an unfinished last line" in log
    assert log.count("--learning-rate 0.0001 -> 0.01") == 1 and "--log-every" not in log
    history = json.loads((run / "args.json").read_text())["history"]
    assert history == [{"step": 2, "flag": f, "old": o, "new": n} for f, o, n in (
        ("--learning-rate", 1e-4, 0.01), ("--adam-beta2", 0.999, 0.99), ("--max-grad-norm", 1.0, 2.0),
        ("--ema-decay", 0.9999, 0.5))]

    # a run-defining change on purpose: applied and recorded; the history carries over
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "chg", "--max-train-steps", "6", *common,
                                          "--learning-rate", "0.01", "--adam-beta2", "0.99", "--ema-decay", "0.5",
                                          "--max-grad-norm", "2", "--cls", "0.5", "--allow-run-change", "cls")))
    ckpt_args = torch.load(run / "checkpoints/0000006.pt", weights_only=True)["args"]
    assert ckpt_args["history"][:4] == history and ckpt_args["history"][4:] == [
        {"step": 4, "flag": "--cls", "old": 0.03, "new": 0.5}]
    assert json.loads((run / "args.json").read_text())["history"] == ckpt_args["history"]


def test_divergence_is_never_checkpointed(data_dir, tmp_path, monkeypatch):
    """Steps 1-3 update, every later step is non-finite. Checkpoint 4 holds step 3's update; 6 would hold
    nothing new and is not written; the stop at step 8 names checkpoint 2, from before the first skip."""
    real_step = train.train_step
    calls = []

    def step(*a, **k):
        calls.append(1)
        if len(calls) <= 3:
            return real_step(*a, **k)
        return train_step.StepResult(torch.full((5,), float("nan")), False)
    monkeypatch.setattr(train, "train_step", step)
    argv = tiny_argv(data_dir, tmp_path, "div", "--max-train-steps", "10", "--checkpointing-steps", "2",
                     "--max-bad-steps", "5")
    with pytest.raises(RuntimeError, match=r"5 consecutive non-finite losses at step 8") as e:
        train.main(train.parse_args(argv))
    assert re.search(r"before step 4, the first skipped one, is \S*0000002\.pt", str(e.value))
    assert sorted(p.name for p in (tmp_path / "div/checkpoints").glob("0*.pt")) == [
        "0000002.opt.pt", "0000002.pt", "0000004.opt.pt", "0000004.pt"]
    assert "not saving checkpoint 6" in (tmp_path / "div/log.txt").read_text()


def test_resume_short_form_reads_the_run_folder(data_dir, tmp_path, capsys):
    """`train.py --resume RUN_DIR` resumes with the flags of RUN_DIR/args.json, the command line's winning, in the
    folder as it is now (moved here); --resume-step is not carried over."""
    first = tiny_argv(data_dir, tmp_path / "old", "run", "--max-train-steps", "2", "--checkpointing-steps", "2",
                      "--cls", "0.05", "--learning-rate", "2e-4", "--qk-norm", "--skip-bad-samples", "--resume-step",
                      "0")
    started = train.main(train.parse_args(first))
    moved = tmp_path / "new" / "run"
    moved.parent.mkdir()
    os.replace(tmp_path / "old" / "run", moved)
    saved = json.loads((moved / "args.json").read_text())
    (moved / "args.json").write_text(json.dumps({**saved, "resume_step": 2}))  # as a run started with --resume-step 2

    args = train.parse_args(["--resume", str(moved), "--max-train-steps", "4", "--learning-rate", "1e-4"])
    expected = {**saved, "max_train_steps": 4, "learning_rate": 1e-4, "resume": str(moved), "resume_step": 0,
                "output_dir": str(moved.parent), "exp_name": "run"}
    assert vars(args) == {k: v for k, v in expected.items() if k != "history"}
    assert (args.cls, args.qk_norm, args.skip_bad_samples) == (0.05, True, True)
    result = train.main(args)
    assert started["steps"] == 2 and result["steps"] == 4 and result["run_dir"] == str(moved)
    log = (moved / "log.txt").read_text()
    assert f"resumed from {moved / 'checkpoints' / '0000002.pt'} at step 2" in log
    assert "--learning-rate 0.0002 -> 0.0001" in log and not list((moved / "checkpoints").glob("abandoned-*"))
    # the command line's run-defining flags are checked as on any resume
    with pytest.raises(UserError, match=r"--path-type 'linear' -> 'cosine'"):
        train.main(train.parse_args(["--resume", str(moved), "--path-type", "cosine", "--max-train-steps", "6"]))


@pytest.mark.parametrize("argv, message", [
    (["--resume", "{tmp}/nothing"], "no args.json there, so it is no run folder of train.py"),
    (["--resume", "400000"], "to resume from step 400000, use --resume-step"),
    (["--resume", "{tmp}/run", "--exp-name", "other"], "name different run folders"),
    (["--resume", "{tmp}/broken"], "cannot read"),
])
def test_resume_short_form_refusals(tmp_path, capsys, argv, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.json").write_text(json.dumps({"model": "SiT-B/2"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "args.json").write_text('{"model": ')
    with pytest.raises(SystemExit) as e:
        train.parse_args([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_resume_short_form_reads_the_authors_args_json(tmp_path):
    """Their args.json: their names (--sampling-steps is our --sample-every), keys that are no flag of ours skipped;
    the same folder named again by --output-dir/--exp-name is accepted."""
    run = tmp_path / "exps" / "theirs"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"model": "SiT-B/2", "encoder_depth": 4, "sampling_steps": 500,
                                               "mixed_precision": "fp16", "exp_name": "elsewhere", "ops_head": 16,
                                               "resume_step": 100, "their_own_key": [1, 2]}))
    args = train.parse_args(["--resume", str(run), "--output-dir", str(tmp_path / "exps"), "--exp-name", "theirs"])
    assert (args.model, args.encoder_depth, args.sample_every, args.mixed_precision) == ("SiT-B/2", 4, 500, "fp16")
    assert (args.exp_name, args.resume_step) == ("theirs", 0) and not hasattr(args, "their_own_key")
