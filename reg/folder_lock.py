"""One writer per output folder: the lock file `.reg-lock` and its heartbeat.

Every command that writes a folder (train.py's run folder, generate.py's sample folder, sweep.py --out,
dataset_tools encode --dest and convert's folder) calls `hold_folder(path, ...)` before it writes anything
there. The lock is created with O_CREAT|O_EXCL and holds who holds it and a heartbeat that a thread
rewrites; a second writer fails at once naming the holder; a dead holder's lock is replaced (same host: its
process is gone; other host: its heartbeat is older than REG_LOCK_TIMEOUT; the same SLURM job, requeued: its
earlier run). docs/cluster.md describes the protocol and what it relies on.

While it holds the lock, a process checks it before each of its writes into the folder (reg.utils.check_write,
called by the atomic writer and the log appenders): a lock taken over by another run stops it with LockLost,
before it writes. A heartbeat that keeps failing requests a stop (reg.stop_signals), so the run saves its work
and exits while the lock is still its own.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import math
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

from reg import stop_signals
from reg.utils import UserError, add_write_check, env_int, initialized_dist, storage_errors_named

LOCK_NAME = ".reg-lock"  # no .json suffix: never taken for a data or results file by a *.json glob
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_TIMEOUT_S = 300.0  # ten missed heartbeats; well above NFS attribute caching (60 s by default)
MIN_HEARTBEAT_S = 0.1  # below this the heartbeat would only load the file server
MIN_BEATS_PER_TIMEOUT = 3  # a live holder may miss two beats before its lock can look stale


class FolderBusy(UserError):
    """The folder is held by another live run."""


class LockLost(FolderBusy):
    """This run's lock was taken over (or removed): it stops before writing into the folder again."""


# ----------------------------------------------------------------------------- the folder lock

def _env_seconds(name: str, default: float, minimum: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        raise UserError(f"environment variable {name}={text!r} must be a finite number of seconds >= {minimum:g} "
                        f"(default {default:g})")
    return value


def lock_settings() -> tuple[float, float]:
    """(REG_LOCK_TIMEOUT, REG_LOCK_HEARTBEAT) in seconds, checked: finite, the heartbeat at least MIN_HEARTBEAT_S,
    the timeout at least MIN_BEATS_PER_TIMEOUT heartbeats (a shorter one lets a second node take a live lock).
    Anything else is a UserError naming the variable; the commands check this before they start."""
    heartbeat = _env_seconds("REG_LOCK_HEARTBEAT", DEFAULT_HEARTBEAT_S, MIN_HEARTBEAT_S)
    timeout = _env_seconds("REG_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S, MIN_HEARTBEAT_S)
    if timeout < MIN_BEATS_PER_TIMEOUT * heartbeat * (1 - 1e-9):  # (1 - 1e-9): 0.3 is 3 x 0.1
        raise UserError(f"REG_LOCK_TIMEOUT {timeout:g} s must be at least {MIN_BEATS_PER_TIMEOUT} x "
                        f"REG_LOCK_HEARTBEAT ({heartbeat:g} s): a live run's lock would look stale to other nodes")
    return timeout, heartbeat


def lock_timeout_s() -> float:
    return lock_settings()[0]


def heartbeat_s() -> float:
    return lock_settings()[1]


# the fields of a lock file and their types (None allowed for the optional ones)
_FIELDS = {"host": str, "pid": int, "pid_start": (str, type(None)), "boot_id": (str, type(None)),
           "started": (int, float), "heartbeat": (int, float), "command": str, "token": str,
           "user": (str, type(None)), "slurm_job": (str, type(None)), "slurm_restart": int}


def _read(path: Path) -> dict | None:
    """The lock's content; None when there is none. An unreadable, half-written or malformed one (not a JSON
    object, or a field of the wrong type) reads as {}."""
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict):
        return {}
    bad = [k for k, kind in _FIELDS.items()
           if k in info and (not isinstance(info[k], kind) or isinstance(info[k], bool))]
    numbers = [info[k] for k in ("started", "heartbeat") if k in info]
    return {} if bad or not all(map(math.isfinite, numbers)) else info


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
            info.get("slurm_restart", 0) < env_int("SLURM_RESTART_COUNT", 0):
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
        self.roots = {os.path.abspath(folder), os.path.realpath(folder)}  # a write under either is checked
        self.path = self.folder / LOCK_NAME
        self.hint = hint
        self.token = secrets.token_hex(16)
        self.held = False
        self.watching = False  # rank 0's lock, checked before this process writes (_watch)
        self.lost = False
        self.failing = False  # the heartbeat has failed for half the timeout: a stop was requested
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- content
    def _content(self) -> bytes:
        now = time.time()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                "boot_id": _boot_id(), "started": getattr(self, "_started", now), "heartbeat": now,
                "command": shlex.join([os.path.basename(sys.executable), *sys.argv]), "token": self.token,
                "user": os.environ.get("USER"), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart": env_int("SLURM_RESTART_COUNT", 0)}
        self._started = info["started"]
        return (json.dumps(info) + "\n").encode()

    def _create(self) -> bool:
        """O_CREAT|O_EXCL: exactly one creator wins, also on NFSv3+ and Lustre."""
        with storage_errors_named(self.path):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, self._content())
                os.fsync(fd)
            except OSError:  # ours, just created: an empty lock would block every rerun until the timeout
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
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

    def check_before_write(self, path: Path) -> None:
        """Raise LockLost unless the lock file still carries this run's token (read anew: a take-over is seen
        before the write, not at the next heartbeat). An absent or unreadable file is read again a few
        times first, so that a slow file server is not taken for a lost lock."""
        info = _read(self.path)
        for _ in range(3):
            if not self.lost and info and info.get("token") == self.token:
                return
            if self.lost or (info and info.get("token")):
                break
            time.sleep(0.05)
            info = _read(self.path)
        self.lost = True
        holder = f"it now belongs to {describe_holder(info)}" if info else "it was removed"
        raise LockLost(f"{self.folder}: this run's lock {self.path} was taken over by another run ({holder}); "
                       f"stopping without writing {path}")

    def _beat(self) -> None:
        timeout, interval = lock_settings()
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                if not self.still_mine():
                    if self.folder.is_dir() and not self._stop.is_set():
                        self.lost = True
                        print(f"WARNING: {self.folder}: this run's lock {self.path} was removed or replaced by "
                              f"another process; this run stops at its next write there", file=sys.stderr, flush=True)
                    return
                # atomic rewrite; the temporary's name is not one clean_stale_tmp removes
                tmp = self.folder / f"{LOCK_NAME}.hb-{self.token}"
                tmp.write_bytes(self._content())
                os.replace(tmp, self.path)
                last_ok = time.monotonic()
            except Exception as e:  # an OSError, or anything else: the thread must not die silently
                silent = time.monotonic() - last_ok
                print(f"WARNING: {self.folder}: lock heartbeat failed ({type(e).__name__}: {e}), none written for "
                      f"{silent:.0f} s; retrying", file=sys.stderr, flush=True)
                if silent > timeout / 2 and not self.failing:
                    # soon another node may take the lock: save and stop while it is still ours
                    # (the message first, so that it precedes the messages of the stop it causes)
                    self.failing = True
                    print(f"WARNING: {self.folder}: the lock heartbeat has failed for {silent:.0f} s (REG_LOCK_TIMEOUT "
                          f"{timeout:g} s); stopping the run", file=sys.stderr, flush=True)
                    stop_signals.request_stop("a failing lock heartbeat")

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


_HELD: list[FolderLock] = []  # this process's locks, and the locks of rank 0 it watches (hold_folder)


def _check_before_write(path: Path) -> None:
    """reg.utils' write check: a write into a folder whose lock this process holds or watches needs the lock
    to be still this run's."""
    where = os.path.abspath(path)
    for lock in _HELD:
        if (lock.held or lock.watching) and any(where.startswith(root + os.sep) for root in lock.roots):
            lock.check_before_write(path)


add_write_check(_check_before_write)


@atexit.register
def _release_all() -> None:
    while _HELD:
        _HELD.pop().release()


@contextlib.contextmanager
def releasing_new_locks():
    """Release, on leaving, every lock this process took inside the block (a command's scope)."""
    held_before = len(_HELD)
    try:
        yield
    finally:
        while len(_HELD) > held_before:
            _HELD.pop().release()


def _watch(folder: str | os.PathLike, token: str) -> FolderLock:
    """A rank other than 0: rank 0's lock of `folder`, checked (not held) before this process writes there."""
    lock = FolderLock(folder)
    lock.token, lock.watching = token, True
    return lock


def hold_folder(folder: str | os.PathLike, *, hint: str = "", rank: int = 0, world: int = 1) -> FolderLock | None:
    """Take the lock of `folder` for this run, before anything is written there. Rank 0 takes it; the other
    ranks wait for its outcome and fail with the same error, else watch it (their writes there are checked
    too). Released when the enclosing `@command` returns or raises, or at exit; a lock this process already
    holds is returned again."""
    lock_settings()  # malformed REG_LOCK_* values are refused before anything is written
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
    if world > 1 and (dist := initialized_dist()) is not None:
        box = [error, lock.token if lock is not None else None]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
        if error is None and rank != 0:
            lock = _watch(folder, box[1])
            _HELD.append(lock)
    if error is not None:
        raise FolderBusy(error)
    return lock
