"""Training throughput: the model FLOPs per image, the device's peak, and the averaged log line with
images per second and MFU (`Meter`)."""
from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from reg.train_step import STEP_TERMS

# ----------------------------------------------------------------------------- FLOPs and MFU

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against the CUDA device name.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("RTX 4090", 165.0), ("L4", 121.0),
]


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: `override` if given, else looked up from the GPU's name;
    None when unknown (then no MFU is logged)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training_flops_per_image(model: torch.nn.Module, encoders: Sequence[torch.nn.Module], *,
                             cls_dim: int | None, resolution: int, backward: bool = True) -> float:
    """Model FLOPs (2 per multiply-add) of one training image: the SiT forward + backward and the frozen
    encoders' forward, counted on meta-device copies with FlopCounterMode (no memory, no time).
    SiT-XL/2 + REG at 256 px: 727 GFLOPs for the SiT, 46 for DINOv2-B."""
    meta = copy.deepcopy(model).to("meta").train(backward)
    size = meta.input_size
    x = torch.zeros(1, meta.in_channels, size, size, device="meta")
    t = torch.zeros(1, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    c = torch.zeros(1, cls_dim, device="meta") if cls_dim else None

    def sit_step() -> None:
        v, zs, v_cls = meta(x, t, y, cls_token=c)
        if backward:
            total = v.sum() + sum(z.sum() for z in zs) + (v_cls.sum() if v_cls is not None else 0)
            total.backward()

    with torch.set_grad_enabled(backward):
        flops = count_flops(sit_step)
    images = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8, device="meta")
    for enc in encoders:
        meta_enc = copy.deepcopy(enc).to("meta")
        flops += count_flops(lambda: meta_enc(images))
    return float(flops)


# ----------------------------------------------------------------------------- the log line

class Meter:
    """Sums the step terms on the device; one host sync per log interval gives the averages, the
    throughput and the MFU, and the original's metric keys (so curves overlay with REG runs)."""

    def __init__(self, accelerator, *, images_per_step: int, flops_per_image: float, peak: float | None,
                 proj_coeff: float, cls_coeff: float, step: int):
        self.acc, self.images_per_step, self.flops, self.peak = accelerator, images_per_step, flops_per_image, peak
        self.proj_coeff, self.cls_coeff = proj_coeff, cls_coeff
        self.sums = torch.zeros(len(STEP_TERMS) + 2, device=accelerator.device)  # terms, updates, bad samples
        self.skipped_total, self.skipped_run, self.updates_total = 0, 0, 0
        # device-side skips (StepResult.finite a tensor): skipped steps, current run of consecutive skips,
        # longest run since the last sync; read at the log interval (sync_counts), the same on every rank
        self.pending = torch.zeros(3, device=accelerator.device)
        self.longest_run = 0  # longest run of consecutive skips in the last log interval (set by flush)
        self._longest = 0     # the same, accumulated over the syncs of the current interval
        self.device_counts = False  # set by the first add() of a device-side decision
        self.last_time, self.last_step = time.time(), step

    def add(self, terms: torch.Tensor, finite: bool | torch.Tensor, bad_samples: torch.Tensor | int = 0) -> None:
        if isinstance(finite, torch.Tensor):  # decided on the device: count there, no host sync
            self.device_counts, ok = True, finite.to(self.sums.dtype)
            self.sums[:len(STEP_TERMS)] += torch.where(finite, terms, 0.0)
            self.sums[len(STEP_TERMS)] += ok
            self.pending[0] += 1 - ok
            self.pending[1] = (self.pending[1] + 1) * (1 - ok)
            self.pending[2] = torch.maximum(self.pending[2], self.pending[1])
            self.updates_total += 1  # corrected by the skips in sync_counts
        elif finite:
            self.sums[:len(STEP_TERMS)] += terms
            self.sums[len(STEP_TERMS)] += 1
            self.skipped_run, self.updates_total = 0, self.updates_total + 1
        else:
            self.skipped_run, self.skipped_total = self.skipped_run + 1, self.skipped_total + 1
        self.sums[-1] += bad_samples

    def sync_counts(self) -> None:
        """Bring the device-side skip counts to the host (one small sync): skipped_total, updates_total and
        skipped_run (consecutive skips up to the last step). flush() also sets longest_run."""
        if not self.device_counts:
            return
        skipped, run, longest = (int(v) for v in self.pending.tolist())
        self.skipped_total += skipped
        self.updates_total -= skipped
        self.skipped_run, self._longest = run, max(self._longest, longest)
        self.pending[0], self.pending[2] = 0, run  # a run of skips carries into the next interval

    def flush(self, step: int, lr: float) -> dict:
        stats = self.acc.reduce(self.sums, "sum").tolist()  # the one host sync per interval
        self.sync_counts()
        self.longest_run, self._longest = self._longest, 0
        updates = stats[len(STEP_TERMS)]
        now = time.time()
        seconds, steps = now - self.last_time, max(step - self.last_step, 1)
        record: dict = {"step": step}
        if updates:  # an interval in which every step was skipped logs no loss value
            avg = {k: v / stats[len(STEP_TERMS)] for k, v in zip(STEP_TERMS, stats)}  # per rank and update
            record.update(avg)
            record.update(loss_final=avg["loss"], loss_mean=avg["loss_denoise"],
                          proj_loss=self.proj_coeff * avg["loss_proj"], loss_mean_cls=self.cls_coeff * avg["loss_cls"])
        img_s = steps * self.images_per_step / seconds
        record.update(lr=lr, img_per_s=img_s, step_time_s=seconds / steps, skipped_steps=self.skipped_total,
                      bad_samples=int(stats[-1]))
        record["tflops"] = img_s * self.flops / 1e12
        if self.peak:
            record["mfu"] = record["tflops"] / (self.peak * self.acc.num_processes)
        if torch.cuda.is_available():
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
        self.sums.zero_()
        self.last_time, self.last_step = now, step
        return record
