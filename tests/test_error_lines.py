"""A user's mistake ends in one line naming the file, flag or environment variable, never in a traceback, and
before any work: every entry point (train.py, generate.py, sweep.py, python -m reg.export) is run here as its
command line runs it (its `__main__` block, in this process) on the mistakes that ended in a traceback, or in
silence, before: unreadable and mismatched weights, malformed environment values and lock files, a storage
that refuses writes, flags that were only checked after the work."""
import errno
import json
import os
import runpy
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

import reg.utils
from helpers import save_tiny_reg_checkpoint, tiny_argv
from reg import folder_lock

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NNODES",
              "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES", "REG_LOCK_TIMEOUT", "REG_LOCK_HEARTBEAT", "REG_DEBUG",
              "WANDB_RUN_ID", "WANDB_RESUME")

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def run_entry(monkeypatch, capsys):
    """run_entry(script, argv, env) runs `python script argv` (script: a file, or a module for -m) in this
    process with these environment variables (None: unset) and returns (exit status, stderr)."""
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)

    def run(script: str, argv: list, env: dict | None = None) -> tuple[int, str]:
        for k, v in (env or {}).items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            if script.endswith(".py"):
                runpy.run_path(str(ROOT / script), run_name="__main__")
            else:  # imported anew, as `python -m` does
                monkeypatch.delitem(sys.modules, script, raising=False)
                runpy.run_module(script, run_name="__main__", alter_sys=True)
        return e.value.code, capsys.readouterr().err

    return run


def one_line(status: int, err: str, *names: str) -> str:
    """The error line, after checking it is the only one, without a traceback, and names every one of `names`."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- checkpoints that cannot be read

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny REG export (ema.safetensors + .json), a truncated and a garbage copy, and Hub folders: intact,
    with truncated weights, with a config.json that is not JSON, that states other classes, another size."""
    root = tmp_path_factory.mktemp("weights")
    ckpt = save_tiny_reg_checkpoint(root / "ema.safetensors", perturb=0.05)
    data = ckpt.read_bytes()
    (root / "trunc.safetensors").write_bytes(data[:len(data) // 2])
    shutil.copy(root / "ema.json", root / "trunc.json")
    (root / "garbage.safetensors").write_bytes(b"not a safetensors file " * 8)
    from reg.export import export
    export(str(ckpt), root / "hub")
    for name, change in [("hub_trunc", None), ("hub_garbage_config", None),
                         ("hub_classes", {"num_classes": 10}), ("hub_size", {"model": "SiT-B/2", "hidden_size": 768})]:
        shutil.copytree(root / "hub", root / name)
        if change:
            config = json.loads((root / name / "config.json").read_text())
            (root / name / "config.json").write_text(json.dumps({**config, **change}))
    (root / "hub_trunc" / "model.safetensors").write_bytes((root / "hub" / "model.safetensors").read_bytes()[:1000])
    (root / "hub_garbage_config" / "config.json").write_text("[1, 2")
    return root


@pytest.mark.parametrize("ckpt,names", [
    ("trunc.safetensors", ["trunc.safetensors", "unreadable"]),
    ("garbage.safetensors", ["garbage.safetensors", "unreadable"]),
    ("hub_trunc", ["hub_trunc/model.safetensors", "unreadable"]),
    ("hub_garbage_config", ["hub_garbage_config/config.json", "not valid JSON"]),
    ("hub_classes", ["hub_classes", "10 classes"]),
    ("hub_size", ["hub_size", "model: config 'SiT-B/2', weights 'SiT-T/2'", "hidden_size"]),
])
def test_generate_names_weights_it_cannot_use(run_entry, weights, tmp_path, ckpt, names):
    status, err = run_entry("generate.py", ["--ckpt", weights / ckpt, "--sample-dir", tmp_path / "s",
                                            "--num-fid-samples", "2", "--num-steps", "2", "--device", "cpu"])
    one_line(status, err, *names)
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, weights):
    """.pt files generate.py refuses: REPA's old decoder_blocks.* keys, and no SiT at all."""
    from safetensors.torch import load_file
    root = tmp_path_factory.mktemp("foreign")
    state = load_file(str(weights / "ema.safetensors"))
    torch.save({"ema": {k.replace("blocks.5.", "decoder_blocks.0."): v for k, v in state.items()}}, root / "legacy.pt")
    torch.save({"ema": {"foo.weight": torch.zeros(2)}}, root / "notsit.pt")
    return root


@pytest.mark.parametrize("ckpt,extra,names", [
    ("trunc.safetensors", [], ["trunc.safetensors", "unreadable"]),
    ("ema.safetensors", ["--fid", "nan"], ["--fid", "finite"]),
    ("ema.safetensors", ["--push-to-hub", "a/b/c"], ["--push-to-hub 'a/b/c'"]),
    ("legacy.pt", [], ["legacy.pt", "--legacy"]),
    ("notsit.pt", [], ["notsit.pt", "does not look like a SiT"]),
    ("ema.safetensors", ["--private"], ["--private applies to --push-to-hub"]),
])
def test_export_errors_are_one_line(run_entry, weights, foreign, tmp_path, ckpt, extra, names):
    source = foreign / ckpt if ckpt.endswith(".pt") else weights / ckpt
    one_line(*run_entry("reg.export", [source, tmp_path / "out", *extra]), *names)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_export_into_a_file_is_refused_before_reading_the_checkpoint(run_entry, weights, tmp_path, monkeypatch):
    import reg.loading
    monkeypatch.setattr(reg.loading, "read_weights", lambda *a, **k: pytest.fail("the checkpoint was read first"))
    one_line(*run_entry("reg.export", [weights / "ema.safetensors", weights / "ema.json"]), "ema.json", "not a folder")


def test_debug_keeps_the_traceback(run_entry, weights, tmp_path):
    from reg.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        run_entry("reg.export", [weights / "trunc.safetensors", tmp_path / "out"], {"REG_DEBUG": "1"})


# ----------------------------------------------------------------------------- the environment and lock files

GEN = ["--num-fid-samples", "2", "--num-steps", "2", "--device", "cpu", "--run-name", "r"]


@pytest.mark.parametrize("env,names", [
    ({"RANK": "1"}, ["RANK='1' is set without WORLD_SIZE"]),
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE='2' is set without RANK"]),
    ({"RANK": "2", "WORLD_SIZE": "2"}, ["RANK=2 is not below WORLD_SIZE=2"]),
    ({"RANK": "0", "WORLD_SIZE": "two"}, ["WORLD_SIZE='two' is not an integer"]),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "abc"}, ["SLURM_NTASKS='abc'"]),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "0"}, ["SLURM_NNODES='0' must be >= 1"]),
    ({"REG_LOCK_TIMEOUT": "0"}, ["REG_LOCK_TIMEOUT='0'"]),
    ({"REG_LOCK_TIMEOUT": "-1"}, ["REG_LOCK_TIMEOUT='-1'"]),
    ({"REG_LOCK_TIMEOUT": "nan"}, ["REG_LOCK_TIMEOUT='nan'"]),
    ({"REG_LOCK_HEARTBEAT": "abc"}, ["REG_LOCK_HEARTBEAT='abc'"]),
    ({"REG_LOCK_HEARTBEAT": "0"}, ["REG_LOCK_HEARTBEAT='0'"]),
    ({"REG_LOCK_HEARTBEAT": "inf"}, ["REG_LOCK_HEARTBEAT='inf'"]),
    ({"REG_LOCK_TIMEOUT": "60", "REG_LOCK_HEARTBEAT": "30"}, ["REG_LOCK_TIMEOUT 60 s must be at least 3 x"]),
    ({"REG_STOP_FILE": "/no-such-folder-of-reg/.reg-stop-1"}, ["REG_STOP_FILE='/no-such-folder-of-reg/.reg-stop-1'"]),
    ({"REG_STOP_FILE": "/"}, ["REG_STOP_FILE='/'", "in an existing folder"]),
])
def test_malformed_environment_is_refused_before_anything_is_written(run_entry, weights, tmp_path, env, names):
    status, err = run_entry("generate.py", ["--ckpt", weights / "ema.safetensors", "--sample-dir", tmp_path / "s",
                                            *GEN], env)
    one_line(status, err, *names)  # printed although RANK is not 0: no other rank would print it
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("content", [
    "[1, 2]", "7", '"text"', '{"host": "node-x", "heartbeat": "abc"}', '{"host": "node-x", "started": "x"}',
    '{"host": "node-x", "slurm_restart": "x"}', '{"host": "node-x", "pid": "12"}', '{"host": 3}',
    '{"host": "node-x", "heartbeat": NaN}', "\x00\xff garbage",
])
def test_garbage_in_a_lock_file_is_one_line(run_entry, weights, tmp_path, content):
    folder = tmp_path / "s" / "r"
    folder.mkdir(parents=True)
    (folder / folder_lock.LOCK_NAME).write_text(content)  # fresh: counts as live until REG_LOCK_TIMEOUT
    status, err = run_entry("generate.py", ["--ckpt", weights / "ema.safetensors", "--sample-dir", tmp_path / "s",
                                            *GEN])
    one_line(status, err, str(folder), "an unreadable lock file")
    assert [p.name for p in folder.iterdir()] == [folder_lock.LOCK_NAME]
    old = time.time() - 400  # older than the timeout: replaced with a warning, and the run goes on
    os.utime(folder / folder_lock.LOCK_NAME, (old, old))
    import generate
    result = generate.main(generate.parse_args(["--ckpt", str(weights / "ema.safetensors"), "--sample-dir",
                                                str(tmp_path / "s"), *GEN]))
    assert result["generated"] == 2


# ----------------------------------------------------------------------------- flags checked before the work

@pytest.mark.parametrize("argv,names", [
    (["--grid", "-3"], ["--grid must be >= 0"]),
    (["--class-labels", "1,2", "--grid", "2", "--class-names", "nope.txt"], ["--class-names", "nope.txt"]),
    (["--npz-path-file", "."], ["--npz-path-file", "is a folder"]),
    (["--projector-embed-dims", "abc"], ["--projector-embed-dims", "'abc'"]),
    (["--device", "gpu"], ["--device 'gpu'"]),
    (["--run-name", ".."], ["--run-name '..'"]),
])
def test_generate_checks_every_flag_before_sampling(run_entry, weights, tmp_path, monkeypatch, argv, names):
    monkeypatch.chdir(tmp_path)
    status, err = run_entry("generate.py", ["--ckpt", weights / "ema.safetensors", "--sample-dir", tmp_path / "s",
                                            "--num-fid-samples", "2", "--num-steps", "2", "--device", "cpu", *argv])
    one_line(status, err, *names)
    assert not (tmp_path / "s").exists()  # nothing sampled, nothing written


@pytest.mark.parametrize("argv,names", [
    (["--eval-batch-size", "0"], ["--eval-batch-size"]),
    (["--global-seed", "-1"], ["--global-seed must be >= 0"]),
    (["--ref-batch", "nope.npz"], ["--ref-batch nope.npz"]),
])
def test_sweep_checks_its_flags_before_sampling(run_entry, weights, tmp_path, monkeypatch, argv, names):
    import numpy as np
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 16, 16, 3), dtype=np.uint8))
    base = ["--ckpt", weights / "ema.safetensors", "--ref-batch", tmp_path / "ref.npz", "--out", tmp_path / "out",
            "--device", "cpu", "--inception-weights", "random", "--num-samples", "4", "--num-steps", "2"]
    one_line(*run_entry("sweep.py", base + argv), *names)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- storage that refuses a write

@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_or_quota_names_the_file(run_entry, weights, tmp_path, monkeypatch, code, words):
    real_open = open

    class Full:
        """A file on a full disk: opening works, writing does not (what the kernel does)."""

        def __init__(self, path, mode="r", *a, **k):
            self.f = real_open(path, mode, *a, **k)

        def write(self, data):
            raise OSError(code, os.strerror(code))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(reg.utils, "open", Full, raising=False)  # the atomic writer's own open(), not the loaders'
    status, err = run_entry("generate.py", ["--ckpt", weights / "ema.safetensors", "--sample-dir", tmp_path / "s",
                                            *GEN])
    one_line(status, err, f"cannot write {tmp_path / 's' / 'r' / 'settings.json'}: {words}")
    assert not list((tmp_path / "s" / "r").glob("*.tmp")) and not list((tmp_path / "s" / "r").glob(".*.tmp"))


def test_a_read_only_file_system_names_the_path(run_entry, weights, tmp_path, monkeypatch):
    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(reg.utils.tempfile, "mkstemp", read_only)
    status, err = run_entry("generate.py", ["--ckpt", weights / "ema.safetensors", "--sample-dir", tmp_path / "s",
                                            *GEN])
    one_line(status, err, f"cannot write {tmp_path / 's' / 'r' / 'settings.json'}: read-only file system")
    # an OSError of the storage raised anywhere else is named by its own path
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "s"))

    monkeypatch.setattr(folder_lock.Path, "mkdir", refuse)
    status, err = run_entry("generate.py", ["--ckpt", weights / "ema.safetensors", "--sample-dir", tmp_path / "s",
                                            *GEN])
    one_line(status, err, f"cannot write {tmp_path / 's'}: read-only file system")


def test_a_full_disk_during_a_checkpoint_names_the_checkpoint(tmp_path, monkeypatch):
    """torch.save given a path reports a full disk as "unexpected pos"; the atomic writer gives it a file."""
    real_open = open
    written = []

    def full_after_1kb(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:
            def write(data, _write=f.write):
                written.append(len(data))
                if sum(written) > 1024:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return _write(data)
            f.write = write
        return f

    monkeypatch.setattr(reg.utils, "open", full_after_1kb, raising=False)
    with pytest.raises(reg.utils.StorageError, match=r"cannot write .*0000002\.pt: no space left") as e:
        reg.utils.atomic_torch_save({"w": torch.zeros(4096)}, tmp_path / "0000002.pt")
    assert e.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []  # no temporary left behind


# ----------------------------------------------------------------------------- train.py

@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A 2-step tiny run (SiT-T/2, 4 classes, projector 256): OUT/run/checkpoints/0000002.pt."""
    import train
    from accelerate.state import AcceleratorState
    out = tmp_path_factory.mktemp("runs")
    AcceleratorState._reset_state(reset_partial_state=True)
    train.main(train.parse_args(tiny_argv(data_dir, out, "run", "--max-train-steps", "2")))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


@pytest.mark.parametrize("extra,names", [
    (["--model", "SiT-S/2", "--allow-run-change", "model"], ["0000002.pt", "shape mismatches", "--allow-run-change"]),
    (["--num-classes", "5", "--allow-run-change", "num_classes"], ["0000002.pt", "y_embedder.embedding_table"]),
    (["--projector-dim", "128", "--allow-run-change", "projector_dim"], ["0000002.pt", "projectors.0.0.weight"]),
])
def test_resuming_weights_that_do_not_fit_is_one_line(run_entry, data_dir, trained, tmp_path, extra, names):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    status, err = run_entry("train.py", tiny_argv(data_dir, tmp_path, "run", "--max-train-steps", "4", *extra))
    one_line(status, err, *names)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_file())[-1] == "ema_0000002.safetensors"


@pytest.mark.parametrize("init,extra,names", [
    ("run/checkpoints/0000002.pt", ["--model", "SiT-S/2"], ["--init-from", "0000002.pt", "shape mismatches"]),
    ("trunc.safetensors", [], ["trunc.safetensors", "unreadable"]),
])
def test_init_from_weights_that_cannot_be_used_is_one_line(run_entry, data_dir, trained, weights, tmp_path, init,
                                                           extra, names):
    source = trained / init if init.startswith("run/") else weights / init
    status, err = run_entry("train.py", tiny_argv(data_dir, tmp_path, "new", "--max-train-steps", "2",
                                                  "--init-from", source, *extra))
    one_line(status, err, *names)
    assert not (tmp_path / "new" / "checkpoints" / "0000002.pt").exists()


@pytest.mark.parametrize("extra,env,names", [
    (["--wandb-id", "../../x"], {}, ["--wandb-id '../../x' is not a wandb run id"]),
    (["--report-to", "wandb"], {"WANDB_RUN_ID": "a/b", "WANDB_MODE": "offline"}, ["WANDB_RUN_ID 'a/b'"]),
    (["--report-to", "wandb"], {"WANDB_RESUME": "sometimes", "WANDB_MODE": "offline"}, ["WANDB_RESUME='sometimes'"]),
    ([], {"RANK": "1"}, ["RANK='1' is set without WORLD_SIZE"]),
    ([], {"REG_LOCK_TIMEOUT": "0"}, ["REG_LOCK_TIMEOUT='0'"]),
    (["--exp-name", ""], {}, ["--exp-name ''"]),
])
def test_train_refuses_bad_flags_and_environment_before_the_run(run_entry, data_dir, tmp_path, extra, env, names):
    argv = tiny_argv(data_dir, tmp_path / "out", "run", "--max-train-steps", "2", *extra)  # the last --report-to wins
    one_line(*run_entry("train.py", argv, env), *names)
    assert not (tmp_path / "out").exists()  # nothing saved: a rerun is not refused for the same reason


def test_an_accelerate_config_that_is_a_list_is_one_line(run_entry, data_dir, tmp_path):
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("- mixed_precision: bf16\n- num_processes: 2\n")
    status, err = run_entry("train.py", tiny_argv(data_dir, tmp_path / "out", "run", "--max-train-steps", "2"),
                            {"HF_HOME": str(tmp_path / "hf"), "ACCELERATE_MIXED_PRECISION": None})
    one_line(status, err, str(config), "not a mapping")


def test_a_full_disk_during_training_names_the_checkpoint(run_entry, data_dir, tmp_path, monkeypatch):
    real_open = open

    def full_for_checkpoints(path, mode="r", *a, **k):
        if "w" in mode and ".pt." in os.path.basename(path):  # the temporaries of {step}.pt and {step}.opt.pt
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(reg.utils, "open", full_for_checkpoints, raising=False)
    status, err = run_entry("train.py", tiny_argv(data_dir, tmp_path, "run", "--max-train-steps", "2"))
    one_line(status, err, f"cannot write {tmp_path / 'run' / 'checkpoints' / '0000002.opt.pt'}: disk quota exceeded")
