"""Several train.py runs in one multi-process launch (used by
tests/test_train.py::test_two_process_run_resumes_with_two_processes_and_with_one; not a test itself).

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... tests/ddp_runs.py RUNS.json

RUNS.json is a list of {"argv": train.py flags, "reads": path with "{rank}"}. Each run is train.main as
`python train.py ARGV` would run it; the process start-up (seconds) is paid once for all of them. Every rank
writes the dataset indices it read, in order, to its "reads" file.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402

READS: list[int] = []


class RecordingDataset(train.CustomDataset):
    def __getitem__(self, idx):
        READS.append(int(idx))
        return super().__getitem__(idx)


def main() -> None:
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    train.CustomDataset = RecordingDataset
    # One process group for all runs: train.main's end_training would close it, and a second
    # init_process_group on the launcher's store hangs.
    PartialState.destroy_process_group = lambda self, group=None: None
    for run in json.loads(Path(sys.argv[1]).read_text()):
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run, as a new process
        READS.clear()
        train.main(train.parse_args(run["argv"]))
        Path(run["reads"].format(rank=os.environ["RANK"])).write_text(json.dumps(READS))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
