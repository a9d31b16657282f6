"""How a command's processes start, share work and end.

- `command(name)`: the scope of a command's main(): refuses a bad launch (malformed RANK / WORLD_SIZE /
  LOCAL_RANK, srun without a launcher: reg.slurm) and malformed lock settings (reg.folder_lock), turns SIGTERM/
  SIGUSR1 into a stop request (reg.stop_signals) and releases the folder locks taken (reg.folder_lock);
- `DistInfo`, `init_distributed`: the process setup of generate.py, sweep.py and the encoder (every process
  does its share of the work; one plain process without a launcher);
- `gather_features`: every process's per-image features, in index order on rank 0.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from reg.folder_lock import lock_settings, releasing_new_locks
from reg.slurm import check_slurm_launch
from reg.stop_signals import stop_file, stop_requests
from reg.utils import UserError, env_int

# ----------------------------------------------------------------------------- the command scope

def launch_env() -> tuple[int, int, int | None]:
    """(RANK, WORLD_SIZE, LOCAL_RANK or None) as a launcher (torchrun, accelerate launch,
    torch.distributed.launch) sets them: all unset for one plain process. A malformed value, a rank outside
    the world, or RANK without WORLD_SIZE (or the reverse) is a UserError naming the variables."""
    has_rank, has_world = (bool(os.environ.get(k, "").strip()) for k in ("RANK", "WORLD_SIZE"))
    if has_rank != has_world:
        given, missing = ("RANK", "WORLD_SIZE") if has_rank else ("WORLD_SIZE", "RANK")
        raise UserError(f"environment variable {given}={os.environ[given].strip()!r} is set without {missing}: a "
                        f"launcher sets both; unset {given} for one process, or start through torchrun / "
                        f"accelerate launch")
    world = env_int("WORLD_SIZE", 1, minimum=1)
    rank = env_int("RANK", 0, minimum=0)
    if rank >= world:
        raise UserError(f"environment variable RANK={rank} is not below WORLD_SIZE={world}")
    local = env_int("LOCAL_RANK", -1, minimum=0) if os.environ.get("LOCAL_RANK", "").strip() else None
    return rank, world, local


def command(name: str, launcher: str = "accelerate") -> Callable:
    """Decorator for a command's main(): refuses a bad launch, bad lock settings and a bad REG_STOP_FILE, turns
    SIGTERM/SIGUSR1 into a stop request for the duration of the call, and releases the folder locks taken during
    it."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            launch_env()
            check_slurm_launch(name, launcher)
            lock_settings()
            stop_file()
            with releasing_new_locks(), stop_requests():
                return fn(*args, **kwargs)
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


def parse_device(flag: str | None) -> "torch.device":  # noqa: F821
    """--device: cpu, cuda or cuda:N (None: cuda when there is a GPU, else cpu); a UserError otherwise."""
    import torch
    if flag is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError as e:
        raise UserError(f"--device {flag!r} is not a device (cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {flag}: no CUDA GPU is available here")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {flag}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def init_distributed(device_flag: str | None, local_rank_flag: int = -1) -> DistInfo:
    """Plain torch.distributed from the env:// variables that torch.distributed.launch, torchrun
    and accelerate launch set; a single process without them."""
    import torch
    import torch.distributed as dist
    rank, world_size, local_rank = launch_env()
    local_rank = max(local_rank_flag, 0) if local_rank is None else local_rank
    device = parse_device(device_flag)
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


def gather_features(indices: Sequence[int], features: dict[str, np.ndarray], world_size: int
                    ) -> dict[str, np.ndarray] | None:
    """Each process's features of its own images (rows in `indices` order) -> every image's features in
    index order on rank 0; None on the other ranks. A collective: every rank calls it."""
    shards = [(np.asarray(indices, dtype=np.int64), features)]
    if world_size > 1:
        is_main = dist.get_rank() == 0
        gathered = [None] * world_size if is_main else None
        dist.gather_object(shards[0], gathered, dst=0)
        if not is_main:
            return None
        shards = gathered
    order = np.argsort(np.concatenate([i for i, _ in shards]), kind="stable")
    return {k: np.concatenate([f[k] for _, f in shards])[order] for k in features}
