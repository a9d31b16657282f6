"""The encode record: what `preprocessing/dataset_tools.py encode` wrote into a latent folder, and from what
(docs/data.md#the-encode-record). encode's resume and train.py's data check both read it back.

    vae-sd/encode_config.json                        the VAE, --dtype, the source (path, image count,
                                                     sha256 of its names and sizes)
    vae-sd/image-hashes/img-mean-std-00000000.json   one per shard, written after its latents:
        {"algorithm": "sha256", "images": [[latent, image, image sha256, label, image size,
                                            latent sha256, latent size], ...]}

Rows written before the sizes and latent hashes were recorded have the first four fields only.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, NamedTuple, Sequence, TypeVar

import numpy as np

from reg.utils import UserError, atomic_json_dump

T = TypeVar("T")
ENCODE_CONFIG = "encode_config.json"  # what the destination was made from and with, checked on every rerun
HASH_DIR = "image-hashes"
RECORD_KEYS = ("record_status", "record_image_sha256", "record_latent_sha256", "record_image_size",
               "record_latent_size", "record_label")  # record_arrays's, as the data index stores them


class Record(NamedTuple):
    """One latent file's row; None where an older encode did not record the field."""
    image: str
    image_sha256: str
    label: int | None
    image_size: int | None = None
    latent_sha256: str | None = None
    latent_size: int | None = None


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_content_record(work: str, rows: list[list]) -> None:
    """One shard's rows (Record's fields, in order), written atomically after its latents."""
    name = os.path.join(work, HASH_DIR, os.path.basename(rows[0][0])[:-len(".npy")] + ".json")
    atomic_json_dump({"algorithm": "sha256", "images": rows}, name)


def read_content_records(tree) -> dict[str, Record]:
    """{latent name: Record} of every shard recorded in `tree` (a dataset.FileTree: folder or zip)."""
    records: dict[str, Record] = {}
    for name in tree.list(under=HASH_DIR):
        if not name.endswith(".json"):
            continue
        try:
            rows = json.loads(tree.read(name))["images"]
            records.update({row[0]: Record(*row[1:]) for row in rows})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read the encode record {tree.describe(name)} ({type(e).__name__}: {e})") from e
    return records


def record_arrays(tree, latent_names: Sequence[str], image_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The record of each item (latent_names[i] paired with image_names[i]) in `tree` (a dataset.FileTree) as the
    arrays RECORD_KEYS: `record_status` (0: recorded from this image, 1: no row, 2: recorded from another image),
    the sha256s (zeros when not recorded), sizes (-1: not recorded) and label (-1: unlabelled). Empty when the
    folder holds no per-file record (data of the authors' tools; encode_config.json alone: an older encode's zip)."""
    records = read_content_records(tree) if tree.exists(ENCODE_CONFIG) else {}
    if not records:
        return {}
    rows = [records.get(n) for n in latent_names]
    n = len(rows)
    status = [0 if r is not None and r.image == image else 1 if r is None else 2 for r, image in zip(rows, image_names)]

    def field(attr: str) -> list:
        return [getattr(r, attr) if r is not None else None for r in rows]

    def sha(attr: str) -> np.ndarray:
        return np.frombuffer(bytes.fromhex("".join(v or "0" * 64 for v in field(attr))), np.uint8).reshape(n, 32).copy()

    def number(attr: str) -> np.ndarray:
        return np.array([-1 if v is None else v for v in field(attr)], np.int64)
    return dict(zip(RECORD_KEYS, (np.array(status, np.int8), sha("image_sha256"), sha("latent_sha256"),
                                  number("image_size"), number("latent_size"), number("label"))))


def first_difference(differs: Callable[[T], str | None], items: Iterable[T], threads: int) -> str | None:
    """The first non-None differs(item), in the order of items, computed on `threads` threads (file reads and
    sha256 release the GIL), in chunks: not a million futures at once."""
    items = list(items)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, len(items), 1024):
            found = next((p for p in pool.map(differs, items[start:start + 1024]) if p is not None), None)
            if found is not None:
                return found
    return None
