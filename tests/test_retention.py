"""The retention policy of model checkpoints (train.py --keep-weights-every / --keep-weights-last,
reg.checkpoints.CheckpointDir.prune_weights) and the pins that keep a checkpoint from it (pin_checkpoint, taken by
generate.py and sweep.py): what is kept, a kill at every moment of a pruning, a reader racing the pruner, and the
disk figures of docs/training.md."""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import generate
import train
from helpers import checkpoint_sit, run_sweep, tiny_argv
from reg import checkpoints
from reg.checkpoints import CheckpointDir, CheckpointError, pin_checkpoint, unpin_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = {"w": torch.ones(3)}


def files_of(ckpts: CheckpointDir, step: int) -> list[Path]:
    return [ckpts.pt(step), ckpts.opt_path(step), ckpts.path / f"ema_{step:07d}.safetensors",
            ckpts.path / f"ema_{step:07d}.json"]


def folder(tmp_path, steps) -> CheckpointDir:
    ckpts = CheckpointDir(tmp_path / "run" / "checkpoints")
    for s in steps:
        ckpts.save(s, model=TINY, ema=TINY, opt={}, config={}, args={})
    return ckpts


def state(ckpts: CheckpointDir, steps) -> dict[int, str]:
    """Per step: 'complete' (all four files), 'gone' (none), else the files left (a half-pruned checkpoint)."""
    out = {}
    for s in steps:
        present = [f.name for f in files_of(ckpts, s) if f.exists()]
        out[s] = "complete" if len(present) == 4 else "gone" if not present else present
    return out


def test_policy_keeps_multiples_newest_protected_and_pinned(tmp_path):
    steps = list(range(10, 130, 10))
    ckpts = folder(tmp_path, steps)
    (ckpts.path / "0000070.keep").touch()  # a user's pin
    aside = ckpts.path / "abandoned-x"
    aside.mkdir()
    (aside / "0000020.pt").write_bytes(b"old lineage")
    removed = ckpts.prune_weights(50, 2, protect=[30])
    assert removed == [10, 20, 40, 60, 80, 90]
    assert ckpts.steps() == [30, 50, 70, 100, 110, 120]
    assert {s for s, v in state(ckpts, steps).items() if v == "gone"} == set(removed)  # every file of them
    assert (ckpts.path / "0000070.keep").exists() and (aside / "0000020.pt").read_bytes() == b"old lineage"
    assert ckpts.prune_weights(50, 2, protect=[30]) == []  # nothing more to do: the same policy is stable
    assert ckpts.prune_weights(1000, 1) == [30, 50, 100, 110] and ckpts.steps() == [70, 120]  # pinned, newest


@pytest.mark.parametrize("crash_at", range(13))
def test_a_kill_at_any_moment_of_a_pruning_loses_nothing_kept(tmp_path, monkeypatch, crash_at):
    """The process dies before file operation number `crash_at` of a pruning (every mark and delete in turn);
    the next start (clean_stale) leaves every checkpoint complete or entirely gone, never half of one, and the
    kept ones untouched."""
    steps = [10, 20, 30]
    ckpts = folder(tmp_path, steps)
    ops = []

    class Killed(BaseException):
        pass

    def counting(real):
        def op(*a, **k):
            if len(ops) == crash_at:
                raise Killed
            ops.append(a[0] if a else None)
            return real(*a, **k)
        return op
    with monkeypatch.context() as m:
        m.setattr(Path, "touch", counting(Path.touch))
        m.setattr(Path, "unlink", counting(Path.unlink))
        try:
            ckpts.prune_weights(30, 1)  # prunes 10 and 20: a mark, four deletes and the mark's, each
        except Killed:
            pass
    assert len(ops) == min(crash_at, 12)  # it died where it was meant to (12: it finished)
    after = CheckpointDir(ckpts.path)
    after.clean_stale()  # what train.py does at start, under the run lock
    left = state(after, steps)
    assert left[30] == "complete" and all(v in ("complete", "gone") for v in left.values()), left
    assert not list(after.path.glob("*.pruning")) and after.steps() == [s for s in steps if left[s] == "complete"]
    assert after.prune_weights(30, 1) == [s for s in (10, 20) if left[s] == "complete"]
    assert after.steps() == [30]


def test_a_kill_after_the_mark_is_cancelled_by_a_pin_taken_since(tmp_path):
    """Killed after marking checkpoint 10 (nothing deleted yet), then pinned: the next start keeps it whole;
    marked and already without its .pt: finished, pin or not."""
    ckpts = folder(tmp_path, [10, 20, 30])
    for step in (10, 20):
        ckpts.pruning_path(step).touch()
        (ckpts.path / f"{step:07d}.keep").touch()
    ckpts.pt(20).unlink()  # the pruning of 20 had begun deleting
    assert ckpts.finish_pruning() == [10, 20]
    assert state(ckpts, [10, 20, 30]) == {10: "complete", 20: "gone", 30: "complete"}
    assert not list(ckpts.path.glob("*.pruning"))


def test_a_pin_taken_during_a_pruning_cancels_it(tmp_path, monkeypatch):
    """The reader pins between the pruner's two pin checks: the pruning is cancelled, the .pt never leaves, and
    the reader, which found the mark, waits and then holds a complete checkpoint."""
    ckpts = folder(tmp_path, [10, 20])
    spec = str(ckpts.path / "ema_0000010.safetensors")
    real_touch, result = Path.touch, {}

    def mark_then_pin(path, *a, **k):
        real_touch(path, *a, **k)
        if path.name.endswith(".pruning"):  # the reader's turn, between the mark and the re-check
            reader = threading.Thread(target=lambda: result.update(pin=pin_checkpoint(spec, tmp_path / "out", by="t")))
            reader.start()
            while not ckpts.pins(10):
                time.sleep(0.01)
            assert ckpts.pt(10).exists()
            result["thread"] = reader
    monkeypatch.setattr(Path, "touch", mark_then_pin)
    assert ckpts.prune_weights(20, 1) == []
    monkeypatch.setattr(Path, "touch", real_touch)
    result["thread"].join(10)
    assert state(ckpts, [10, 20]) == {10: "complete", 20: "complete"} and not ckpts.pruning_path(10).exists()
    assert result["pin"] == ckpts.pin_path(10, tmp_path / "out") and result["pin"].exists()
    assert ckpts.prune_weights(20, 1) == []  # pinned: kept at every later pruning
    unpin_checkpoint(spec, tmp_path / "out")
    assert ckpts.prune_weights(20, 1) == [10] and ckpts.steps() == [20]


def test_a_pin_after_the_pruning_decided_is_refused(tmp_path):
    """The pruner passed its second check: the reader finds the mark, waits, and is refused once the files are
    gone (its pin removed); a checkpoint deleted after it was loaded is refused too."""
    ckpts = folder(tmp_path, [10, 20])
    spec = str(ckpts.path / "0000010.pt")
    ckpts.pruning_path(10).touch()  # what _prune does first
    threading.Timer(0.3, ckpts._delete, args=(10,)).start()
    with pytest.raises(CheckpointError, match="was pruned by its training run"):
        pin_checkpoint(spec, tmp_path / "out", by="t")
    assert not ckpts.pins(10) and state(ckpts, [10]) == {10: "gone"}
    with pytest.raises(CheckpointError, match="was deleted after it was loaded"):
        pin_checkpoint(spec, tmp_path / "out", by="t")
    ckpts.pruning_path(20).touch()  # a pruning that never ends (its run was killed): refused after wait_s
    with pytest.raises(CheckpointError, match="or a pruning of it was interrupted"):
        pin_checkpoint(str(ckpts.pt(20)), tmp_path / "out", by="t", wait_s=0.2)
    assert not ckpts.pins(20)


def test_pins_only_for_checkpoints_of_a_training_folder(tmp_path, monkeypatch):
    ckpts = folder(tmp_path, [10])
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "0000010.pt").write_bytes((ckpts.pt(10)).read_bytes())
    assert pin_checkpoint(str(other / "0000010.pt"), tmp_path / "o", by="t") is None  # not in a checkpoints/ folder
    assert pin_checkpoint("hf:someone/model/0000010.pt", tmp_path / "o", by="t") is None
    ckpts.pt(10).unlink()  # only the export was kept by hand: no pruning removes it, no pin needed
    assert pin_checkpoint(str(ckpts.path / "ema_0000010.safetensors"), tmp_path / "o", by="t") is None
    ckpts = folder(tmp_path, [20])
    pin = pin_checkpoint(str(ckpts.path / "ema_0000020.safetensors"), tmp_path / "o", by="generate.py")
    info = json.loads(pin.read_text())
    assert info["by"] == "generate.py" and info["for"] == str(tmp_path / "o") and info["pid"] == os.getpid()
    assert pin_checkpoint(str(ckpts.pt(20)), tmp_path / "o", by="t") == pin  # the same owner: the same pin
    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(checkpoints, "atomic_json_dump", read_only)
    with pytest.warns(UserWarning, match="cannot pin"):
        assert pin_checkpoint(str(ckpts.pt(20)), tmp_path / "other-owner", by="t") is None


def _reader(path: str, owner: str, stop, failures) -> None:
    """Pin, check the checkpoint is complete while pinned, unpin; count what went wrong."""
    while not stop.is_set():
        try:
            pin_checkpoint(path, owner, by="race", wait_s=5)
        except CheckpointError:
            continue  # refused: it was being pruned, or is gone
        ckpts = CheckpointDir(Path(path).parent)
        if not all(f.exists() for f in files_of(ckpts, 10)):
            failures.value += 1
        unpin_checkpoint(path, owner)


def test_two_processes_racing_a_reader_never_loses_its_pinned_checkpoint(tmp_path):
    """A reader process pins and checks checkpoint 10 in a loop while this process rewrites and prunes it."""
    ckpts = folder(tmp_path, [10, 20])
    ctx = multiprocessing.get_context("fork")
    stop, failures = ctx.Event(), ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(str(ckpts.pt(10)), str(tmp_path / "o"), stop, failures), daemon=True)
    reader.start()
    pruned = kept = 0
    start = time.monotonic()
    try:  # 3 s of racing, longer on a loaded machine until both outcomes were seen (at most 60 s)
        while time.monotonic() - start < (3 if pruned and kept else 60):
            if not ckpts.pt(10).exists() and not ckpts.pruning_path(10).exists():
                ckpts.save(10, model=TINY, ema=TINY, opt={}, config={}, args={})
            if ckpts.prune_weights(20, 1):
                pruned += 1
            else:
                kept += 1
    finally:
        stop.set()
        reader.join(20)
    assert reader.exitcode == 0 and failures.value == 0
    assert pruned and kept  # both outcomes happened: the race was run, not avoided


def test_train_prunes_by_the_policy_and_keeps_pinned_best_fid_and_newest(data_dir, tmp_path, fresh_accelerate_state,
                                                                          flops_counted_once_per_architecture):
    common = ("--checkpointing-steps", "1", "--log-every", "1")
    run = tmp_path / "keep"
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "keep", "--max-train-steps", "2", *common)))
    with open(run / "metrics.jsonl", "a") as f:  # in-training FIDs: step 1 the best
        f.write(json.dumps({"step": 1, "fid": 3.0}) + "\n" + json.dumps({"step": 2, "fid": 4.0}) + "\n")
    ckpts = CheckpointDir(run / "checkpoints")
    pin = pin_checkpoint(str(ckpts.path / "ema_0000002.safetensors"), tmp_path / "samples", by="generate.py")
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "keep", "--max-train-steps", "5", *common,
                                          "--keep-weights-every", "3", "--keep-weights-last", "1")))
    assert ckpts.steps() == [1, 2, 3, 5] and pin.exists()  # best FID, pinned, a multiple of 3, the newest
    assert state(ckpts, [4]) == {4: "gone"}
    assert "pruned checkpoints 4 (--keep-weights-every 3, --keep-weights-last 1)" in (run / "log.txt").read_text()
    # the default keeps every checkpoint, as before
    train.main(train.parse_args(tiny_argv(data_dir, tmp_path, "keep", "--max-train-steps", "7", *common)))
    assert ckpts.steps() == [1, 2, 3, 5, 6, 7]


@pytest.mark.parametrize("flags, message", [
    (["--keep-weights-every", "25", "--checkpointing-steps", "10"], "multiple of --checkpointing-steps 10"),
    (["--keep-weights-every", "-10"], "must be 0"),
    (["--keep-weights-every", "20", "--checkpointing-steps", "10", "--keep-weights-last", "0"], "must be >= 1")])
def test_bad_retention_flags_are_one_line(capsys, flags, message):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_generate_and_sweep_pin_while_their_results_are_unfinished(tmp_path, tiny_reg_ckpt, monkeypatch,
                                                                   sweep_setup):
    ckpts = CheckpointDir(tmp_path / "run" / "checkpoints")
    ckpts.path.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        (ckpts.path / f"ema_0000010{suffix}").write_bytes(Path(str(tiny_reg_ckpt).replace(".safetensors", suffix))
                                                          .read_bytes())
    ckpts.pt(10).write_bytes(b"the training checkpoint (not read here)")
    spec = str(ckpts.path / "ema_0000010.safetensors")
    argv = ["--ckpt", spec, "--sample-dir", str(tmp_path / "s"), "--run-name", "r", "--num-fid-samples", "3",
            "--num-steps", "2", "--device", "cpu", "--per-proc-batch-size", "1"]
    real_save, seen = generate.save_png, []

    def killed_after_two(image, path):
        seen.append(len(ckpts.pins(10)))
        if len(seen) == 2:
            raise KeyboardInterrupt  # a kill mid-run: the pin stays for the requeued job
        real_save(image, path)
    monkeypatch.setattr(generate, "save_png", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate.main(generate.parse_args(argv))
    assert seen == [1, 1] and ckpts.pins(10) == [ckpts.pin_path(10, tmp_path / "s" / "r")]
    ckpts.pt(20).write_bytes(b"a newer checkpoint")
    assert ckpts.prune_weights(100, 1) == [] and ckpts.pt(10).exists()  # pinned: kept for the rerun
    monkeypatch.setattr(generate, "save_png", real_save)
    generate.main(generate.parse_args(argv))  # the rerun completes the npz and releases the pin
    assert (tmp_path / "s" / "r.npz").exists() and ckpts.pins(10) == []

    import sweep
    real_run, during = sweep._run_setting, []
    monkeypatch.setattr(sweep, "_run_setting", lambda *a, **k: during.append(len(ckpts.pins(10))) or real_run(*a, **k))
    run_sweep(sweep_setup, "--ckpt", spec, "--cfg-scale", "1", "--guidance-high", "1.0")
    assert during == [1] and ckpts.pins(10) == []


def test_docs_give_the_disk_of_the_papers_run(tmp_path):
    """The checkpoint files of a real (tiny) run weigh what the formula of docs/training.md says (4 bytes a
    parameter: .pt = model + EMA, the safetensors = EMA, .opt.pt = AdamW's two moments of the trained
    parameters), and the figures there are that formula at SiT-XL/2's parameter count."""
    from models.sit import SiT_models
    from reg.train_step import make_optimizer
    model = checkpoint_sit()
    opt = make_optimizer(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, impl="foreach")
    sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
    opt.step()
    sd = model.state_dict()
    ema = {k: v.clone() for k, v in sd.items()}  # its own tensors, as in training (shared ones are stored once)
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(1, model=sd, ema=ema, opt=opt.state_dict(), config={}, args={})
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for path, expected in ((ckpts.pt(1), 8 * params), (tmp_path / "ema_0000001.safetensors", 4 * params),
                           (ckpts.opt_path(1), 8 * trained)):
        assert expected <= path.stat().st_size <= 1.03 * expected, path.name

    with torch.device("meta"):
        xl = SiT_models["SiT-XL/2"](input_size=32, z_dims=[768], encoder_depth=8)
    p_xl = sum(p.numel() for p in xl.parameters())
    t_xl = sum(p.numel() for p in xl.parameters() if p.requires_grad)
    per_ckpt, opt_state = 12 * p_xl / 1e9, 8 * t_xl / 1e9  # GB
    steps = range(10_000, 4_000_001, 10_000)
    policy = len({s for s in steps if s % 500_000 == 0} | set(list(steps)[-3:]))
    doc = (ROOT / "docs" / "training.md").read_text()
    for figure in (f"{p_xl:,}", f"{per_ckpt:.2f} GB", f"{opt_state:.2f} GB",
                   f"{(len(steps) * per_ckpt + 3 * opt_state) / 1000:.2f} TB",
                   f"{policy} checkpoints", f"{policy * per_ckpt + 3 * opt_state:.0f} GB"):
        assert figure in doc, figure
