"""reg/folder_lock.py: one writer per folder (train, encode, generate): the lock itself, stale locks, a race to
replace one, and a second encode into a held folder. A second train.py run into a running one's folder:
tests/test_stop_signals.py; SLURM: tests/test_slurm.py."""
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocessing import dataset_tools
from reg import folder_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from reg import folder_lock; folder_lock.hold_folder(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def start_holder(folder) -> subprocess.Popen:
    """Another process holding `folder`'s lock (as a running train/encode would), until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def fabricate_lock(folder, *, host="node-other", age_s=0.0, pid=12345, token="t0"):
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    info = {"host": host, "pid": pid, "started": now - age_s - 60, "heartbeat": now - age_s,
            "command": "python train.py --exp-name x", "token": token}
    (folder / folder_lock.LOCK_NAME).write_text(json.dumps(info))
    os.utime(folder / folder_lock.LOCK_NAME, (now - age_s, now - age_s))


# ----------------------------------------------------------------------------- the lock itself

def test_lock_excludes_names_the_holder_and_releases_only_its_own(tmp_path):
    with folder_lock.FolderLock(tmp_path / "f") as first:
        with pytest.raises(folder_lock.FolderBusy) as e:
            folder_lock.FolderLock(tmp_path / "f").acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"host {socket.gethostname()}" in msg and f"pid {os.getpid()}" in msg
        assert "started 20" in msg and "command: " in msg and isinstance(e.value, ValueError)  # a UserError
        assert first.still_mine()
    assert not (tmp_path / "f" / folder_lock.LOCK_NAME).exists()
    # a lock that was taken over by another process is never removed by the one that lost it
    lost = folder_lock.FolderLock(tmp_path / "g")
    lost.acquire()
    fabricate_lock(tmp_path / "g", token="someone-else")
    lost.release()
    assert json.loads((tmp_path / "g" / folder_lock.LOCK_NAME).read_text())["token"] == "someone-else"


def test_stale_locks_other_host_by_heartbeat_same_host_by_pid(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REG_LOCK_TIMEOUT", "100")
    fabricate_lock(tmp_path / "fresh", age_s=30)
    with pytest.raises(folder_lock.FolderBusy, match="host node-other, pid 12345.*heartbeat 30 s ago"):
        folder_lock.FolderLock(tmp_path / "fresh").acquire()
    fabricate_lock(tmp_path / "old", age_s=150)
    with folder_lock.FolderLock(tmp_path / "old") as lock:
        assert lock.still_mine()
    assert "heartbeat is 150 s old (REG_LOCK_TIMEOUT 100 s)" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fabricate_lock(tmp_path / "dead", host=socket.gethostname(), pid=int(done.stdout))  # fresh heartbeat, no process
    with folder_lock.FolderLock(tmp_path / "dead"):
        pass
    assert f"process {int(done.stdout)} no longer exists on this host" in capsys.readouterr().err
    # a requeued SLURM job replaces its own earlier run's lock at once
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    info = {"host": "node-other", "pid": 1, "heartbeat": time.time(), "token": "x", "slurm_job": "77", "slurm_restart": 0}
    assert "earlier run of this requeued SLURM job" in folder_lock.stale_reason(info)


def _race(folder, barrier, results):
    barrier.wait()
    try:
        lock = folder_lock.FolderLock(folder)
        lock.acquire()
        results.put("won")
        time.sleep(1.0)  # hold it while the others decide
        lock.release()
    except folder_lock.FolderBusy:
        results.put("busy")


def test_processes_racing_to_replace_one_stale_lock_one_wins(tmp_path):
    fabricate_lock(tmp_path / "f", age_s=10_000)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "f", barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["busy"] * 5 + ["won"]
    assert not list((tmp_path / "f").iterdir())  # no lock and no set-aside leftovers
    # the slow loser's case, made deterministic: it judged the stale lock "t0" but finds a fresh one in its place
    fabricate_lock(tmp_path / "g", host=socket.gethostname(), pid=os.getpid(), token="fresh")
    assert folder_lock.FolderLock(tmp_path / "g")._displace("t0") is None
    assert [p.name for p in (tmp_path / "g").iterdir()] == [folder_lock.LOCK_NAME]
    assert json.loads((tmp_path / "g" / folder_lock.LOCK_NAME).read_text())["token"] == "fresh"  # put back untouched


# ----------------------------------------------------------------------------- encode: the FileNotFoundError race

def test_second_encode_into_a_held_dest_fails_and_touches_nothing(data_dir, tmp_path, capsys):
    dest = tmp_path / "vae-sd"
    argv = ["encode", "--source", str(data_dir / "imagenet_32_vae"), "--dest", str(dest), "--model-url",
            "pixel-unshuffle", "--batch-size", "32", "--num-workers", "0"]
    holder = start_holder(dest)
    try:
        inflight = dest / "00000" / ".img-mean-std-00000003.npy.abc123.tmp"  # the holder's write in progress
        inflight.parent.mkdir(parents=True)
        inflight.write_bytes(b"half")
        before = sorted(p.name for p in dest.rglob("*"))
        start = time.time()
        with pytest.raises(folder_lock.FolderBusy, match=f"pid {holder.pid}.*choose another --dest"):
            dataset_tools.main(dataset_tools.parse_args(argv))
        assert time.time() - start < 20 and inflight.exists() and sorted(p.name for p in dest.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder was SIGKILLed: the rerun takes over with a warning, and only now its temporary is removed
    dataset_tools.main(dataset_tools.parse_args(argv))
    assert f"process {holder.pid} no longer exists" in capsys.readouterr().err
    assert not inflight.exists() and len(list(dest.rglob("*.npy"))) == 64
    assert not (dest / folder_lock.LOCK_NAME).exists()
