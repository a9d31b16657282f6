"""Stop signals: SIGTERM and SIGUSR1 (SLURM's warning before the time limit, a preemption) set a flag.

The commands finish their current unit (a training step plus a full checkpoint, a batch of PNGs, a batch of
latents; a sweep setting and an evaluation during training are discarded after their current batch) and exit
with EXIT_STOPPED, so that the same command, rerun, resumes.
Ranks agree on when to stop through a CPU all-reduce (`any_rank_stopping`, `StepStop`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from reg.utils import UserError, atomic_write_bytes, initialized_dist

EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal after a clean unit; rerun to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(SystemExit):
    """Stopped by SIGTERM/SIGUSR1 after a clean unit of work; the process exits with EXIT_STOPPED."""

    def __init__(self, message: str):
        super().__init__(EXIT_STOPPED)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------- stop signals

_STOP: dict = {"signal": None}


def _on_signal(signum, frame) -> None:
    if _STOP["signal"] is None:
        name = signal.Signals(signum).name
        _STOP["signal"] = name
        print(f"received {name}: stopping after the current unit of work (exit status {EXIT_STOPPED}; "
              "rerun the same command to resume)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_requests():
    """Inside the block, SIGTERM and SIGUSR1 request a stop instead of ending the process (main thread
    only: signal handlers cannot be set elsewhere). The request is cleared on entry and on leaving."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            previous[s] = signal.signal(s, _on_signal)
    _STOP["signal"] = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STOP["signal"] = None


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


def max_over_ranks(value: int, world: int = 1) -> int:
    """The largest of every rank's `value` (a CPU all-reduce over gloo). Every rank must call it at the same point."""
    if world <= 1 or (dist := initialized_dist()) is None:
        return value
    import torch
    t = torch.tensor([int(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group(dist))
    return int(t.item())


def any_rank_stopping(world: int = 1) -> bool:
    """Whether any rank received a stop signal. Every rank must call it at the same point."""
    return bool(max_over_ranks(int(stop_requested() is not None), world))


class StepStop:
    """For a loop whose ranks run the same steps: `due(step)` after each step says, alike on every rank,
    whether to stop there. Ranks agree through an all-reduce (max) of a one-element CPU flag over gloo,
    started after every `every`-th step and read after the next one: no step waits for it (it has long
    finished), the GPU is never synchronised, and a stop lags the signal by at most `every` + 1 steps."""

    def __init__(self, world: int, every: int = 10):
        self.dist = initialized_dist() if world > 1 else None
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


def stop_file() -> str | None:
    """REG_STOP_FILE (where a stopped command writes its exit status for slurm/*.sbatch), checked: its folder must
    exist and the path must not be a folder. The commands check this before they start, since the file is only
    written at the stop, when a bad path would cost the job its requeue."""
    path = os.environ.get("REG_STOP_FILE")
    if not path:
        return None
    if os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"environment variable REG_STOP_FILE={path!r} must name a file in an existing folder")
    return path


def stopped(message: str, *, is_main: bool = True) -> Stopped:
    """The exception to raise once the current unit is complete: prints the message (main process) and,
    when REG_STOP_FILE is set, writes the exit status there: launchers (accelerate, torchrun) turn a
    worker's status into 1, so slurm/train.sbatch reads this file to decide on requeueing."""
    signame = stop_requested() or "a stop request"
    text = f"stopped by {signame}: {message}; rerun the same command to resume (exit status {EXIT_STOPPED})"
    if is_main:
        print(text, file=sys.stderr, flush=True)
        if path := stop_file():
            atomic_write_bytes(path, f"{EXIT_STOPPED}\n".encode())
    return Stopped(text)
