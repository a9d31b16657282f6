"""Tests for evaluations/compare.py (run comparison table and figure) and the paper's numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from evaluations import compare as cmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(folder, args, train, evals, config=None, tail=""):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(args))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    lines = [json.dumps(r) for r in train + evals]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)


def _train_lines(steps, seed, cls=True, proj=True, absent_as_zero=False):
    """Training records; a term the run lacks is missing, or 0 as train.py logs it (absent_as_zero)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in steps:
        r = {"step": s, "loss": float(rng.uniform(0.5, 1)), "loss_denoise": float(rng.uniform(0.2, 0.5)),
             "grad_norm": 1.0, "lr": 1e-4}
        if proj or absent_as_zero:
            r["loss_proj"] = float(rng.uniform(-0.8, -0.3)) if proj else 0.0
        if cls or absent_as_zero:
            r["loss_cls"] = float(rng.uniform(0.01, 0.1)) if cls else 0.0
        out.append(r)
    return out


def _eval_line(step, fid, cfg=1.0, samples=10000):
    return {"step": step, "fid": fid, "sfid": fid * 1.5, "inception_score": 50.0, "precision": 0.6, "recall": 0.6,
            "eval_time_s": 12.0, "eval_samples": samples, "eval_mode": "sde", "eval_steps": 50, "eval_cfg": cfg}


@pytest.fixture()
def two_runs(tmp_path):
    rng = np.random.default_rng(0)
    fids = [float(x) for x in rng.uniform(10, 40, 3)]  # not monotone in general: best != latest is possible
    reg = tmp_path / "exps" / "reg-b2"
    _write_run(reg, {"model": "SiT-B/2", "method": "reg", "enc_type": "dinov2-vit-b", "encoder_depth": 4,
                     "cls": 0.03, "proj_coeff": 0.5},
               _train_lines(range(100, 1100, 100), 1),
               [_eval_line(s, f) for s, f in zip((300, 600, 900), fids)] + [_eval_line(900, 7.5, cfg=2.3)],
               config={"use_cls_token": True, "z_dims": [768]})
    sit = tmp_path / "exps" / "sit-b2"  # no evaluations yet; loss_proj and loss_cls logged as 0 (as train.py does)
    _write_run(sit, {"model": "SiT-B/2", "method": "sit", "enc_type": "dinov2-vit-b", "encoder_depth": 4, "cls": 0.03},
               _train_lines(range(100, 600, 100), 2, cls=False, proj=False, absent_as_zero=True), [])
    return reg, sit, fids


def test_table_and_figure_hold_the_runs_numbers(two_runs, tmp_path, capsys):
    reg, sit, fids = two_runs
    out = tmp_path / "cmp"
    result = cmp.main([str(reg), str(sit), "--out", str(out)])
    printed = capsys.readouterr().out
    md = (out / "comparison.md").read_text()
    assert printed == md == result["table"]
    saved = json.loads((out / "comparison.json").read_text())["rows"]

    reg_rows = [r for r in saved if r["run"] == "reg-b2"]
    assert [r["eval"] for r in reg_rows] == ["sde, 50 steps, cfg 1.0, 10000 samples",
                                             "sde, 50 steps, cfg 2.3, 10000 samples"]
    plain = reg_rows[0]
    best = int(np.argmin(fids))
    assert plain["latest_fid"] == fids[-1] and plain["latest_step"] == 900
    assert plain["best_fid"] == min(fids) and plain["best_step"] == (300, 600, 900)[best]
    assert plain["fid_curve"] == [[300, fids[0]], [600, fids[1]], [900, fids[2]]]
    assert reg_rows[1]["best_fid"] == 7.5  # the guided FID is not mixed into the unguided curve
    assert (plain["method"], plain["model"], plain["encoder"], plain["encoder_depth"], plain["cls_weight"],
            plain["steps"]) == ("reg", "SiT-B/2", "dinov2-vit-b", 4, 0.03, 1000)

    sit_row, = [r for r in saved if r["run"] == "sit-b2"]
    assert sit_row["latest_fid"] is None and sit_row["steps"] == 500
    assert (sit_row["encoder"], sit_row["encoder_depth"], sit_row["cls_weight"]) == ("–",) * 3

    md_lines = md.splitlines()
    reg_line = next(line for line in md_lines if line.startswith("| reg-b2 |") and "cfg 1.0" in line)
    assert f"{fids[-1]:.2f} (900)" in reg_line
    assert f"{min(fids):.2f} ({(300, 600, 900)[best]})" in reg_line
    sit_line = next(line for line in md_lines if line.startswith("| sit-b2 |"))
    assert sit_line.endswith("| – | – |")  # FID "–" for a run without evaluations

    # The figure: one PNG, two panels sharing x, the FID panel drawn from these numbers.
    png = out / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))


def test_figure_axes_data(two_runs, tmp_path, monkeypatch):
    """Check what is drawn (not just that a file appears): FID points per run, loss terms below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    reg, sit, fids = two_runs
    captured = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: captured.setdefault("fig", fig))
    try:
        cmp.compare([str(reg), str(sit)], str(tmp_path / "out"))
    finally:
        monkeypatch.setattr(plt, "close", real_close)
    ax_fid, ax_loss = captured["fig"].axes
    assert ax_fid.get_shared_x_axes().joined(ax_fid, ax_loss)
    lines = {line.get_label(): line for line in ax_fid.get_lines()}
    assert list(lines["reg-b2 (sde, 50 steps, cfg 1.0, 10000 samples)"].get_ydata()) == fids
    assert list(lines["reg-b2 (sde, 50 steps, cfg 1.0, 10000 samples)"].get_xdata()) == [300, 600, 900]
    losses = {line.get_label() for line in ax_loss.get_lines()}
    # no flat line at 0 for the terms the plain SiT does not have (train.py logs them as 0)
    assert {"reg-b2: loss_denoise", "reg-b2: loss_proj", "reg-b2: loss_cls", "sit-b2: loss_denoise"} == losses
    real_close(captured["fig"])


SETTINGS = {"eval_ref_sha256": "a" * 64, "eval_mode": "ode", "eval_steps": 50, "eval_cfg": 1.0, "eval_cls_cfg": 0.0,
            "eval_guidance_low": 0.0, "eval_guidance_high": 1.0, "eval_vae": "stabilityai/sd-vae-ft-ema",
            "eval_samples": 10000, "eval_inception": "sha256:6726825d", "eval_seed": 0, "eval_dtype": "bf16"}


@pytest.mark.parametrize("change,label", [
    ({"eval_ref_sha256": "b" * 64}, "reference bbbbbbbb"),
    ({"eval_guidance_high": 0.85}, "guidance in [0.0, 0.85]"),
    ({"eval_vae": "stabilityai/sd-vae-ft-mse"}, "VAE stabilityai/sd-vae-ft-mse"),
    ({"eval_inception": "random"}, "Inception random"),
    ({"eval_seed": 1}, "seed 1"),
    ({"eval_dtype": "fp32"}, "precision fp32"),
    ({k: None for k in SETTINGS if k not in ("eval_mode", "eval_steps", "eval_cfg", "eval_samples")},
     "reference unknown"),  # a record of an older version: a series of its own
])
def test_fids_measured_differently_are_never_one_curve(tmp_path, change, label):
    """Same sampler, steps, guidance scale and count: only the reference, the interval, the VAE, ... differ."""
    first = [dict(_eval_line(s, f), **SETTINGS) for s, f in ((100, 30.0), (200, 20.0))]
    later = [{**_eval_line(s, f), **SETTINGS, **change} for s, f in ((200, 5.0), (300, 4.0))]
    _write_run(tmp_path / "run", {"model": "SiT-B/2", "method": "reg"}, _train_lines([100, 200, 300], 0), first + later)
    rows = cmp.compare([str(tmp_path / "run")], str(tmp_path / "out"))["rows"]
    assert [(r["best_fid"], r["fid_curve"]) for r in rows] == [(20.0, [[100, 30.0], [200, 20.0]]),
                                                              (4.0, [[200, 5.0], [300, 4.0]])]
    assert label in rows[1]["eval"] and label not in rows[0]["eval"] and rows[0]["eval"] != rows[1]["eval"]


@pytest.mark.parametrize("args,config,records,terms", [
    ({"method": "repa", "proj_coeff": 0.5}, None, dict(cls=False, absent_as_zero=True), ["loss_denoise", "loss_proj"]),
    ({"method": "reg", "proj_coeff": 0.0, "cls": 0.03}, None, dict(proj=False, absent_as_zero=True),
     ["loss_denoise", "loss_cls"]),
    # the method from config.json alone (a plain SiT), and from the authors' args.json (REPA: no cls weight)
    ({}, {"use_cls_token": False, "z_dims": []}, dict(cls=False, proj=False, absent_as_zero=True), ["loss_denoise"]),
    ({"proj_coeff": 0.5}, None, dict(cls=False), ["loss_denoise", "loss_proj"]),
])
def test_only_the_loss_terms_a_run_trains_with_are_drawn(tmp_path, monkeypatch, args, config, records, terms):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = tmp_path / "run"
    _write_run(run, {"model": "SiT-B/2", **args}, _train_lines([100, 200], 4, **records), [], config=config)
    assert cmp.loss_terms(cmp.load_run(str(run))) == tuple(terms)
    captured = {}
    monkeypatch.setattr(plt, "close", lambda fig=None: captured.setdefault("fig", fig))
    cmp.compare([str(run)], str(tmp_path / "out"))
    monkeypatch.undo()
    _, ax_loss = captured["fig"].axes
    assert sorted(line.get_label() for line in ax_loss.get_lines()) == sorted(f"run: {t}" for t in terms)
    plt.close(captured["fig"])


def test_broken_lines(tmp_path):
    run = tmp_path / "run"
    _write_run(run, {"model": "SiT-B/2"}, _train_lines([100, 200], 3), [_eval_line(200, 20.0)], tail='{"step": 3')
    train, evals, notes = cmp.read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in train] == [100, 200] and evals[0]["fid"] == 20.0
    assert "unfinished last line" in notes[0]
    text = (run / "metrics.jsonl").read_text().replace('"step": 200, "fid"', '"step": "x", "fid"')
    (run / "metrics.jsonl").write_text(text)
    with pytest.raises(cmp.RunError, match=r"metrics.jsonl:3: not a metrics record"):
        cmp.read_metrics(str(run / "metrics.jsonl"))
    with pytest.raises(cmp.RunError, match="not a training run folder"):
        cmp.load_run(str(tmp_path))


def test_method_inferred_for_the_authors_args_json(tmp_path):
    """REG's train.py writes args.json without --method, and no metrics.jsonl."""
    run = tmp_path / "official"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"model": "SiT-XL/2", "enc_type": "dinov2-vit-b", "encoder_depth": 8,
                                               "cls": 0.03, "proj_coeff": 0.5}))
    row, = cmp.summarise([cmp.load_run(str(run))])
    assert (row["method"], row["steps"], row["latest_fid"]) == ("reg", None, None)


def test_paper_reference():
    with open(cmp.PAPER_RESULTS) as f:
        data = json.load(f)
    assert all(r["source"] in data["sources"] for r in data["results"])
    xl = cmp.paper_reference("SiT-XL/2")
    assert xl == cmp.paper_reference("SiT-XL-2")
    # the shape paper_reference promises (the numbers themselves are the file's, not restated here)
    assert xl and all(set(r) >= {"method", "model", "iterations", "guidance", "cfg", "fid", "sfid", "inception_score",
                                 "precision", "recall", "source"} for r in xl)
    assert all(r["model"] == "SiT-XL/2" and isinstance(r["fid"], float) for r in xl)
    assert any(r["method"] == "reg" and r["guidance"] and "2507.01467" in r["source"] for r in xl)
    assert cmp.paper_reference("SiT-Q/2") == []  # a size the paper does not report


def test_cli_as_a_script(two_runs, tmp_path):
    reg, sit, _ = two_runs
    done = subprocess.run([sys.executable, "evaluations/compare.py", str(reg), str(sit), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| run | method |")
    bad = subprocess.run([sys.executable, "-m", "evaluations.compare", str(tmp_path / "missing")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing: not a folder" in bad.stderr and "Traceback" not in bad.stderr
