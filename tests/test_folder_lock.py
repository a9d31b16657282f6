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


# ----------------------------------------------------------------------------- a lock lost, a heartbeat failing

def test_a_holder_whose_lock_was_taken_over_stops_before_its_next_write(tmp_path):
    from reg.utils import append_text, atomic_write_bytes
    folder = tmp_path / "run"
    with folder_lock.releasing_new_locks():
        folder_lock.hold_folder(folder)
        atomic_write_bytes(folder / "a.json", b"1")  # still ours: written
        fabricate_lock(folder, token="new-holder")  # taken over between two heartbeats (a frozen holder)
        lost = r"taken over .*host node-other, pid 12345.*without writing .*b\.json"
        with pytest.raises(folder_lock.LockLost, match=lost):
            atomic_write_bytes(folder / "b.json", b"2")
        with pytest.raises(folder_lock.LockLost, match="log.txt"):
            append_text(folder / "log.txt", "a line\n")
        with pytest.raises(folder_lock.LockLost):  # a subfolder is the folder's too
            atomic_write_bytes(folder / "checkpoints" / "0000010.pt", b"3")
        atomic_write_bytes(tmp_path / "elsewhere.json", b"4")  # writes outside the folder are not its business
    assert sorted(p.name for p in folder.iterdir()) == [folder_lock.LOCK_NAME, "a.json"]
    assert json.loads((folder / folder_lock.LOCK_NAME).read_text())["token"] == "new-holder"  # left alone
    with folder_lock.releasing_new_locks():  # a removed lock counts as lost too
        folder_lock.hold_folder(tmp_path / "other")
        (tmp_path / "other" / folder_lock.LOCK_NAME).unlink()
        with pytest.raises(folder_lock.LockLost, match="it was removed"):
            atomic_write_bytes(tmp_path / "other" / "x", b"")


def _watcher(rank, port, out):
    """Rank 0 holds the lock, rank 1 watches it; after a take-over neither writes into the folder."""
    import torch.distributed as dist

    from reg.utils import atomic_write_bytes
    folder = Path(os.environ["REG_TEST_FOLDER"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    outcome = []
    with folder_lock.releasing_new_locks():
        folder_lock.hold_folder(folder, rank=rank, world=2)
        atomic_write_bytes(folder / f"before-{rank}", b"")
        dist.barrier()
        if rank == 0:
            fabricate_lock(folder, token="new-holder")
        dist.barrier()
        try:
            atomic_write_bytes(folder / f"after-{rank}", b"")
            outcome.append("wrote")
        except folder_lock.LockLost:
            outcome.append("lost")
        dist.barrier()
    out.put((rank, outcome[0]))
    dist.destroy_process_group()


def test_every_rank_checks_rank_0s_lock_before_writing(tmp_path, monkeypatch):
    from helpers import run_two_processes
    monkeypatch.setenv("REG_TEST_FOLDER", str(tmp_path / "f"))
    assert sorted(run_two_processes(_watcher)) == [(0, "lost"), (1, "lost")]
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [folder_lock.LOCK_NAME, "before-0", "before-1"]


def test_a_failing_heartbeat_requests_a_stop_while_the_lock_is_still_ours(tmp_path, monkeypatch, capsys):
    from reg import stop_signals
    monkeypatch.setenv("REG_LOCK_HEARTBEAT", "0.1")
    monkeypatch.setenv("REG_LOCK_TIMEOUT", "0.6")
    real = folder_lock.FolderLock._content

    def full_disk_once_held(self):
        if self.held:  # the heartbeat's rewrites fail, the first write of the lock did not
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(folder_lock.FolderLock, "_content", full_disk_once_held)
    with stop_signals.stop_requests(), folder_lock.releasing_new_locks():
        lock = folder_lock.hold_folder(tmp_path / "f")
        deadline = time.time() + 10
        while stop_signals.stop_requested() is None and time.time() < deadline:
            time.sleep(0.05)
        assert stop_signals.stop_requested() == "a failing lock heartbeat" and lock.failing
        assert lock.still_mine() and not lock.lost  # stopped well before another node may take it
    err = capsys.readouterr().err
    assert "lock heartbeat failed (OSError: [Errno 28] No space left on device)" in err and "stopping the run" in err


def test_a_lock_that_cannot_be_written_names_it_and_leaves_no_empty_lock(tmp_path, monkeypatch):
    from reg.utils import StorageError

    def full(self):  # what os.write meets on a full disk, after the exclusive create succeeded
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder_lock.FolderLock, "_content", full)
    with pytest.raises(StorageError, match=r"cannot write .*\.reg-lock: no space left on the device"):
        folder_lock.FolderLock(tmp_path / "f").acquire()
    assert list((tmp_path / "f").iterdir()) == []  # an empty lock would block every rerun until the timeout
