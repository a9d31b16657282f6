"""Running on a shared cluster: one writer per output folder, SLURM launch checks, stop signals, and the
process setup of the sampling commands (DistInfo, init_distributed).

Every command that writes a folder (train.py's run folder, generate.py's sample folder, sweep.py --out,
dataset_tools encode --dest) runs as `@command("name")` and calls `hold_folder(path, ...)` before it
writes anything there. docs/cluster.md describes the protocol and what it relies on.

  * folder lock: `.reg-lock` in the folder, created with O_CREAT|O_EXCL, holding who holds it and a
    heartbeat that a thread rewrites; a second writer fails at once naming the holder; a dead holder's
    lock is replaced (same host: its process is gone; other host: its heartbeat is older than
    REG_LOCK_TIMEOUT; the same SLURM job, requeued: its earlier run).
  * SLURM: `srun --ntasks N python X.py` without a launcher would start N independent copies: refused,
    with the command that works.
  * stop signals: SIGTERM and SIGUSR1 set a flag; the commands finish their current unit (a training
    step plus a full checkpoint, a batch of PNGs, a batch of latents; a sweep setting is discarded) and
    exit with EXIT_STOPPED, so that the same command, rerun, resumes.
"""
from __future__ import annotations

import atexit
import datetime
import functools
import json
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils import UserError, atomic_write_bytes

LOCK_NAME = ".reg-lock"  # no .json suffix: never taken for a data or results file by a *.json glob
EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal after a clean unit; rerun to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_TIMEOUT_S = 300.0  # ten missed heartbeats; well above NFS attribute caching (60 s by default)


class FolderBusy(UserError):
    """The folder is held by another live run."""


class SlurmLaunchError(UserError):
    """Started by srun as several independent tasks instead of through a launcher."""


class Stopped(SystemExit):
    """Stopped by SIGTERM/SIGUSR1 after a clean unit of work; the process exits with EXIT_STOPPED."""

    def __init__(self, message: str):
        super().__init__(EXIT_STOPPED)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------- the folder lock

def lock_timeout_s() -> float:
    return float(os.environ.get("REG_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S))


def heartbeat_s() -> float:
    return float(os.environ.get("REG_LOCK_HEARTBEAT", DEFAULT_HEARTBEAT_S))


def _read(path: Path) -> dict | None:
    """The lock's content; None when there is none. An unreadable or half-written one reads as {}."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot): tells a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    now = _process_start(pid)
    return start is None or now is None or now == start


def describe_holder(info: dict) -> str:
    if not info:
        return "an unreadable lock file"
    started = datetime.datetime.fromtimestamp(info.get("started", 0), datetime.timezone.utc)
    age = time.time() - info.get("heartbeat", 0)
    job = f", SLURM job {info['slurm_job']}" if info.get("slurm_job") else ""
    command = info.get("command", "?")
    command = command if len(command) <= 240 else command[:237] + "..."
    return (f"host {info.get('host')}, pid {info.get('pid')}, started {started:%Y-%m-%d %H:%M:%S} UTC{job}, "
            f"heartbeat {age:.0f} s ago, command: {command}")


def stale_reason(info: dict, *, timeout: float | None = None, mtime: float = 0.0) -> str | None:
    """Why the holder described by `info` is certainly gone (None: it may be alive)."""
    timeout = lock_timeout_s() if timeout is None else timeout
    if info.get("slurm_job") and info["slurm_job"] == os.environ.get("SLURM_JOB_ID") and \
            int(info.get("slurm_restart", 0)) < int(os.environ.get("SLURM_RESTART_COUNT", 0)):
        return "it is an earlier run of this requeued SLURM job"
    if info.get("host") == socket.gethostname():
        if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
            return "its host has rebooted since"
        if isinstance(info.get("pid"), int) and not _pid_alive(info["pid"], info.get("pid_start")):
            return f"process {info['pid']} no longer exists on this host"
        return None
    age = time.time() - max(float(info.get("heartbeat", 0)), mtime)  # both: either clock may be the fresher
    if age > timeout:
        return f"its heartbeat is {age:.0f} s old (REG_LOCK_TIMEOUT {timeout:.0f} s)"
    return None


class FolderLock:
    """The lock of one folder, held by this process (see the module docstring and docs/cluster.md)."""

    def __init__(self, folder: str | os.PathLike, hint: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.hint = hint
        self.token = secrets.token_hex(16)
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- content
    def _content(self) -> bytes:
        now = time.time()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                "boot_id": _boot_id(), "started": getattr(self, "_started", now), "heartbeat": now,
                "command": shlex.join([os.path.basename(sys.executable), *sys.argv]), "token": self.token,
                "user": os.environ.get("USER"), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}
        self._started = info["started"]
        return (json.dumps(info) + "\n").encode()

    def _create(self) -> bool:
        """O_CREAT|O_EXCL: exactly one creator wins, also on NFSv3+ and Lustre."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _displace(self, expect_token: str | None) -> dict | None:
        """Move the lock file aside if it still carries `expect_token` (None: an unreadable one); returns
        what was moved, or None when the file was not that one (then it is put back untouched)."""
        aside = self.folder / f"{LOCK_NAME}.aside-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        moved = _read(aside) or {}
        if moved.get("token") == expect_token:
            return moved
        try:  # another process's fresh lock: put it back, unless yet another one was created meanwhile
            os.link(aside, self.path)
        except (FileExistsError, FileNotFoundError):
            pass  # that holder's heartbeat finds its lock gone and stops (docs/cluster.md)
        try:
            os.unlink(aside)
        except FileNotFoundError:
            pass
        return None

    # -- acquire / release
    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            if self._create():
                self.held = True
                self._clean_leftovers()
                self._start_heartbeat()
                return
            info = _read(self.path)
            if info is None:
                continue  # released meanwhile: try again
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            reason = stale_reason(info, mtime=mtime) if info else (
                "its lock file is unreadable and older than REG_LOCK_TIMEOUT"
                if time.time() - mtime > lock_timeout_s() else None)
            if reason is None:
                raise FolderBusy(f"{self.folder} is being written by another run ({describe_holder(info)}); "
                                 f"wait for it to finish{', or ' + self.hint if self.hint else ''}. If that run is "
                                 f"dead, delete {self.path}")
            if self._displace(info.get("token")) is not None:
                print(f"WARNING: {self.folder}: replacing the lock of a run that is gone ({reason}): "
                      f"{describe_holder(info)}", file=sys.stderr, flush=True)
                (self.folder / f"{LOCK_NAME}.aside-{self.token}").unlink(missing_ok=True)
        raise FolderBusy(f"{self.folder}: could not take its lock {self.path} after 20 attempts (other runs "
                         "keep taking it)")

    def _clean_leftovers(self) -> None:
        """Heartbeat temporaries and set-aside locks of earlier holders (all gone: we hold the lock)."""
        for f in self.folder.glob(f"{LOCK_NAME}.*"):
            try:  # not one that a racing process is handling right now
                if self.token not in f.name and time.time() - f.stat().st_mtime > 60:
                    f.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    def still_mine(self) -> bool:
        info = _read(self.path)
        return bool(info) and info.get("token") == self.token

    def _beat(self) -> None:
        interval = heartbeat_s()
        while not self._stop.wait(interval):
            if not self.still_mine():
                if self.folder.is_dir() and not self._stop.is_set():
                    self.lost = True
                    print(f"WARNING: {self.folder}: this run's lock {self.path} was removed or replaced by "
                          f"another process; two runs may now write this folder", file=sys.stderr, flush=True)
                return
            try:  # atomic rewrite; the temporary's name is not one clean_stale_tmp removes
                tmp = self.folder / f"{LOCK_NAME}.hb-{self.token}"
                tmp.write_bytes(self._content())
                os.replace(tmp, self.path)
            except OSError as e:
                print(f"WARNING: {self.folder}: lock heartbeat failed ({e}); retrying", file=sys.stderr)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.folder}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock, only if it is still this process's (a lock taken over is left alone)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self.folder.is_dir() and self._displace(self.token) is not None:
            (self.folder / f"{LOCK_NAME}.aside-{self.token}").unlink(missing_ok=True)
        (self.folder / f"{LOCK_NAME}.hb-{self.token}").unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: list[FolderLock] = []


@atexit.register
def _release_all() -> None:
    while _HELD:
        _HELD.pop().release()


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def hold_folder(folder: str | os.PathLike, *, hint: str = "", rank: int = 0, world: int = 1) -> FolderLock | None:
    """Take the lock of `folder` for this run, before anything is written there. Rank 0 takes it; the other
    ranks wait for its outcome and fail with the same error. Released when the enclosing `@command`
    returns or raises, or at exit; a lock this process already holds is returned again."""
    real = os.path.realpath(folder)
    lock, error = None, None
    if rank == 0:
        lock = next((h for h in _HELD if os.path.realpath(h.folder) == real and h.held), None)
        if lock is None:
            lock = FolderLock(folder, hint)
            try:
                lock.acquire()
                _HELD.append(lock)
            except FolderBusy as e:
                error = str(e)
    if world > 1 and (dist := _dist()) is not None:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise FolderBusy(error)
    return lock


# ----------------------------------------------------------------------------- SLURM

def slurm_launch_problem(command: str, launcher: str = "accelerate", env: dict | None = None) -> str | None:
    """A message when srun started several tasks that do not form one distributed job, else None."""
    env = os.environ if env is None else env
    if "SLURM_PROCID" not in env or any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if tasks <= 1:
        return None
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    per_node = max(tasks // nodes, 1)
    args = shlex.join(sys.argv[1:])
    if launcher == "torchrun":
        inner = (f"exec torchrun --nnodes {nodes} --nproc-per-node {per_node} --node-rank $SLURM_NODEID "
                 f"--master-addr $(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) --master-port 29500 "
                 f"{command} \"$@\"")
    else:
        multi = "--multi_gpu " if tasks > 1 else ""
        inner = (f"exec accelerate launch {multi}--num_machines {nodes} --num_processes {tasks} --machine_rank "
                 f"$SLURM_NODEID --main_process_ip $(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) "
                 f"--main_process_port 29500 {command} \"$@\"")
    return (f"{command}: srun started {tasks} separate tasks (SLURM_PROCID set, no RANK/WORLD_SIZE/LOCAL_RANK): they "
            f"would be {tasks} independent runs writing the same folders. Start one launcher per node instead: "
            f"srun --ntasks-per-node=1 bash -c '{inner}' bash {args}" + (
                " (or: sbatch slurm/train.sbatch ...)" if command.endswith("train.py") else ""))


def check_slurm_launch(command: str, launcher: str = "accelerate") -> None:
    if (problem := slurm_launch_problem(command, launcher)) is not None:
        raise SlurmLaunchError(problem)


# ----------------------------------------------------------------------------- stop signals

_STOP: dict = {"signal": None}


def _on_signal(signum, frame) -> None:
    if _STOP["signal"] is None:
        name = signal.Signals(signum).name
        _STOP["signal"] = name
        print(f"received {name}: stopping after the current unit of work (exit status {EXIT_STOPPED}; "
              "rerun the same command to resume)", file=sys.stderr, flush=True)


def stop_requested() -> str | None:
    """The name of the stop signal this process received, or None."""
    return _STOP["signal"]


def request_stop(name: str = "request") -> None:
    """As if a stop signal had arrived (tests, and callers that decide to stop)."""
    _STOP["signal"] = _STOP["signal"] or name


_GLOO: dict = {}


def _cpu_group(dist):
    """A gloo group for CPU flags (the default group may be NCCL); made once, by every rank together."""
    if "group" not in _GLOO:
        _GLOO["group"] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _GLOO["group"]


def any_rank_stopping(world: int = 1) -> bool:
    """Whether any rank received a stop signal. Every rank must call it at the same point."""
    flag = stop_requested() is not None
    if world <= 1 or (dist := _dist()) is None:
        return flag
    import torch
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group(dist))
    return bool(t.item())


class StepStop:
    """For a loop whose ranks run the same steps: `due(step)` after each step says, alike on every rank,
    whether to stop there. Ranks agree through an all-reduce (max) of a one-element CPU flag over gloo,
    started after every `every`-th step and read after the next one: no step waits for it (it has long
    finished), the GPU is never synchronised, and a stop lags the signal by at most `every` + 1 steps."""

    def __init__(self, world: int, every: int = 10):
        self.dist = _dist() if world > 1 else None
        self.every = every
        self.work, self.flag = None, None

    def due(self, step: int) -> bool:
        if self.dist is None:
            return stop_requested() is not None
        if self.work is not None:
            self.work.wait()
            self.work = None
            return bool(self.flag.item())
        if step % self.every == 0:
            import torch
            self.flag = torch.tensor([int(stop_requested() is not None)])
            self.work = self.dist.all_reduce(self.flag, op=self.dist.ReduceOp.MAX, group=_cpu_group(self.dist),
                                             async_op=True)
        return False

    def close(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


def stopped(message: str, *, is_main: bool = True) -> Stopped:
    """The exception to raise once the current unit is complete: prints the message (main process) and,
    when REG_STOP_FILE is set, writes the exit status there: launchers (accelerate, torchrun) turn a
    worker's status into 1, so slurm/train.sbatch reads this file to decide on requeueing."""
    signame = stop_requested() or "a stop request"
    text = f"stopped by {signame}: {message}; rerun the same command to resume (exit status {EXIT_STOPPED})"
    if is_main:
        print(text, file=sys.stderr, flush=True)
        if os.environ.get("REG_STOP_FILE"):
            atomic_write_bytes(os.environ["REG_STOP_FILE"], f"{EXIT_STOPPED}\n".encode())
    return Stopped(text)


# ----------------------------------------------------------------------------- the command scope

def command(name: str, launcher: str = "accelerate") -> Callable:
    """Decorator for a command's main(): refuses a bad SLURM launch, turns SIGTERM/SIGUSR1 into a stop
    request for the duration of the call, and releases the folder locks taken during it."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            check_slurm_launch(name, launcher)
            held_before = len(_HELD)
            previous = {}
            if threading.current_thread() is threading.main_thread():
                for s in STOP_SIGNALS:
                    previous[s] = signal.signal(s, _on_signal)
            _STOP["signal"] = None
            try:
                return fn(*args, **kwargs)
            finally:
                while len(_HELD) > held_before:
                    _HELD.pop().release()
                for s, handler in previous.items():
                    signal.signal(s, handler)
                _STOP["signal"] = None
        return run

    return wrap


# ----------------------------------------------------------------------------------------------
# Process setup of generate.py and sweep.py (every process does its share of the work)


@dataclass
class DistInfo:
    """This process's rank, the number of processes and its device (world_size 1 without a launcher)."""

    rank: int
    world_size: int
    device: "torch.device"  # noqa: F821 (torch is imported where a DistInfo is made)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        """End the process group init_distributed started (at the end of a command, error or not)."""
        import torch.distributed as dist
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def main_first(self, fn: Callable[[], None]) -> None:
        """Run fn on rank 0; if it raises, every rank raises (instead of waiting at a barrier forever)."""
        error = None
        if self.is_main:
            try:
                fn()
            except Exception as e:
                error = e
        if self.world_size > 1:
            import torch.distributed as dist
            message = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(message, src=0)
            if message[0] is not None and error is None:
                raise RuntimeError(f"rank 0 stopped: {message[0]}")
        if error is not None:
            raise error

    def run_together(self, fn: Callable[[], None]) -> None:
        """Run fn on every rank; if it raises on one, every rank raises (none is left waiting at the next
        collective). The others raise a UserError when the first failing rank's error was one."""
        error = None
        try:
            fn()
        except Exception as e:
            error = e
        if self.world_size > 1:
            import torch.distributed as dist
            mine = None if error is None else (f"{type(error).__name__}: {error}", isinstance(error, UserError))
            messages: list = [None] * self.world_size
            dist.all_gather_object(messages, mine)
            failed = [(r, m) for r, m in enumerate(messages) if m is not None]
            if failed and error is None:
                rank, (text, user) = failed[0]
                raise (UserError if user else RuntimeError)(f"rank {rank} stopped: {text}")
        if error is not None:
            raise error


def init_distributed(device_flag: str | None, local_rank_flag: int = -1) -> DistInfo:
    """Plain torch.distributed from the env:// variables that torch.distributed.launch, torchrun
    and accelerate launch set; a single process without them."""
    import torch
    import torch.distributed as dist
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", max(local_rank_flag, 0)))
    if device_flag is None:
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_flag)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank=rank, world_size=world_size, device=device)
