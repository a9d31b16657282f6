"""Run train.main several times in one 2-process DDP launch (gloo on CPU), one run per set of speed flags;
test_train.py::test_two_process_cpu_launch_and_ddp_speed_variants compares the results. Not a test module itself.

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_variants.py OUT NAME=FLAGS... -- TRAIN_ARGV...

Each run writes OUT/NAME/ (train.py's run folder) and OUT/NAME/digest-rank{r}.json: a per-rank digest of the
weights at the checkpoint, so the test can see that the two ranks stayed identical (a skip on one rank only
would make them diverge).
"""
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    from accelerate.state import AcceleratorState
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    sep = rest.index("--")
    variants, base = rest[:sep], rest[sep + 1:]
    save = train.save_checkpoint

    def save_with_digest(accelerator, ckpts, step, model, ema, *args, **kwargs):
        path = ckpts.path.parent / f"digest-rank{accelerator.process_index}.json"
        path.write_text(json.dumps({"model": digest(model), "ema": digest(ema), "step": step}))
        return save(accelerator, ckpts, step, model, ema, *args, **kwargs)

    train.save_checkpoint = save_with_digest
    # one process group for all runs: end_training would close it (re-creating one on the same port races)
    from accelerate import Accelerator
    Accelerator.end_training = lambda self: [t.finish() for t in self.trackers] and None
    for spec in variants:
        name, _, flags = spec.partition("=")
        result = train.main(train.parse_args([*base, "--output-dir", str(out), "--exp-name", name, *flags.split()]))
        if AcceleratorState().is_main_process:
            (out / name / "result.json").write_text(json.dumps({"skipped": result["skipped"], "steps": result["steps"]}))
        AcceleratorState._reset_state()  # the next run builds its own Accelerator (its own DDP settings)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
