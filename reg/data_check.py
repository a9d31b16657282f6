"""train.py --data-check: the training data against what encode recorded in the latent folder
(preprocessing/records.py, docs/data.md#the-data-check), so that an image folder swapped for another one of the
same names, sizes and labels, or a latent file overwritten since, is refused before the first step, naming a file.

By default every item's pairing, label and file sizes are compared (all at once: the arrays of the data index),
and both files of a seeded sample of items are hashed; `full` hashes every file. The data of the authors' tools
has no record: then nothing but the listing's own checks can be done, and the log says so.
"""
from __future__ import annotations

import hashlib
import time
from typing import Sequence

import numpy as np

from dataset import SIDES, CustomDataset
from preprocessing.records import HASH_DIR, first_difference, read_content_records
from reg.utils import UserError

DATA_CHECKS = ("sample", "full", "off")  # train.py --data-check
SAMPLE_SIZE = 1000  # items whose two files the default check hashes (docs/data.md#the-data-check)


def check_content(ds: CustomDataset, mode: str, *, seed: int | Sequence[int] = 0, rank: int = 0, world: int = 1,
                  sample_size: int = SAMPLE_SIZE, threads: int = 8) -> tuple[str | None, str]:
    """The data against what encode recorded in the latent folder (preprocessing/records.py): (the first
    difference, naming a file, or None; what was checked, for the log).

    "sample": every item's pairing, label and both file sizes, and the sha256 of both files of
    `sample_size` items drawn with `seed` (process `rank` of `world` hashes every world-th of them);
    "full": the sha256 of every file; "off": nothing. A file that differs but cannot be read at all is let
    through with `skip_bad_samples` (training replaces it); a readable one is never."""
    if mode not in DATA_CHECKS:
        raise UserError(f"data check {mode!r}: choose from {', '.join(DATA_CHECKS)}")
    if mode == "off":
        return None, "data check off (--data-check off): the files are not compared with the encode record"
    t0 = time.perf_counter()
    arrays = ds.listing.stored_arrays()
    if "record_status" not in arrays:
        if mode == "full":
            raise UserError(f"--data-check full: {ds.latents.path} has no encode record ({HASH_DIR}/), so there is "
                            "nothing to check the files against; use --data-check sample")
        return None, (f"data check: {ds.latents.path} has no encode record (data written by the authors' tools, or a "
                      ".zip of an older encode): the images cannot be checked against what the latents were "
                      "encoded from; their pairing and labels were checked as listed")
    n = len(ds)
    items = (np.arange(n) if mode == "full"
             else np.sort(np.random.default_rng(seed).choice(n, min(sample_size, n), replace=False)))
    problem = _record_difference(ds, arrays) or _hash_difference(ds, arrays, items[rank::world], threads)
    hashed = f"all {n} items" if mode == "full" else f"{len(items)} of {n} items (seed {seed})"
    return problem, (f"data check ({mode}): the pairing, labels and sizes of all {n} items, and the sha256 of both "
                     f"files of {hashed}, over {world} process(es), match the encode record in {ds.latents.path} "
                     f"({time.perf_counter() - t0:.1f} s)")


def _record_difference(ds: CustomDataset, arrays: dict[str, np.ndarray]) -> str | None:
    """The first item whose pairing, label or file sizes differ from the record (compared over all at once)."""
    status = arrays["record_status"]
    labels = np.asarray(ds.labels) if ds.listing.labelled else np.full(len(ds), -1)
    checks = [("pairing", status != 0), ("label", arrays["record_label"] != labels)]
    for side in SIDES:
        recorded = arrays[f"record_{side}_size"]
        checks.append((side, (recorded >= 0) & (recorded != arrays[f"{side}_size"])))
    for i in np.flatnonzero(np.logical_or.reduce([bad for _, bad in checks])).tolist():
        what = next(what for what, bad in checks if bad[i])
        if what in SIDES and ds.skip_bad_samples and not ds.readable(i):
            continue  # unreadable: replaced in training (--skip-bad-samples), never mixed in
        return _record_message(ds, arrays, i, what, labels)
    return None


def _record_message(ds: CustomDataset, arrays: dict[str, np.ndarray], i: int, what: str, labels: np.ndarray) -> str:
    latent, image = ds.latents.describe(ds.latent_names[i]), ds.images.describe(ds.image_names[i])
    if what == "pairing" and arrays["record_status"][i] == 1:
        return f"{latent} has no row in the encode record ({HASH_DIR}/): written by an interrupted encode? rerun it"
    if what == "pairing":
        encoded_from = read_content_records(ds.latents)[ds.latent_names[i]].image
        return f"{latent} was encoded from {encoded_from}, but pairs with {image}: not the images encode read"
    if what == "label":
        return (f"{ds.latents.describe('dataset.json')} gives {ds.latent_names[i]} the label "
                f"{labels[i] if labels[i] >= 0 else None}, but it was encoded with "
                f"{arrays['record_label'][i] if arrays['record_label'][i] >= 0 else None}")
    where = image if what == "image" else latent
    return (f"{where} is {arrays[f'{what}_size'][i]} bytes, but {arrays[f'record_{what}_size'][i]} when encoded: "
            f"{_not_encoded(what)}")


def _not_encoded(side: str) -> str:
    return ("not the image its latent was encoded from; put back the images encode read, or encode these into a new "
            "latent folder" if side == "image" else
            "not the file encode wrote (overwritten since?); re-encode into a new latent folder")


def _hash_difference(ds: CustomDataset, arrays: dict[str, np.ndarray], items: np.ndarray, threads: int) -> str | None:
    """The first of `items` whose image or latent bytes are not the ones encode hashed."""
    def differs(i: int) -> str | None:
        for side in SIDES:
            if side == "latent" and arrays["record_latent_size"][i] < 0:
                continue  # an older encode recorded no latent hashes
            want = arrays[f"record_{side}_sha256"][i].tobytes()
            try:
                now = hashlib.sha256(ds.read_bytes(side, i)).digest()
            except OSError:
                now = b""
            if now == want or (ds.skip_bad_samples and not ds.readable(i)):  # unreadable: replaced in training
                continue
            where = ds.describe(side, i)
            return f"{where} has other content than when encoded (sha256 {now.hex()[:12] or 'unreadable'} now, " \
                   f"{want.hex()[:12]} then): {_not_encoded(side)}"
        return None

    return first_difference(differs, items.tolist(), threads)
