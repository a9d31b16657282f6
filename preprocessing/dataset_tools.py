"""Dataset preparation CLI with the flags of EDM2's dataset_tool, as shipped by REG and REPA.

convert: an image folder (ImageFolder style: class = sorted top-level directory) or a zip ->
         uncompressed PNGs (00000/img00000000.png ...) plus dataset.json. Multi-process.

    python preprocessing/dataset_tools.py convert --source=ILSVRC/Data/CLS-LOC/train \\
        --dest=DATA/imagenet_256_vae --resolution=256x256 --transform=center-crop-dhariwal

encode:  converted PNGs -> VAE posterior mean||std .npy files plus dataset.json (the vae-sd/ layout).
         Batched; multi-GPU through accelerate (each process takes a disjoint set of shards);
         resumable (a rerun skips shards whose outputs all exist); refuses a destination made
         from another source.

    accelerate launch --num_processes 8 preprocessing/dataset_tools.py encode \\
        --source=DATA/imagenet_256_vae --dest=DATA/vae-sd --model-url=stabilityai/sd-vae-ft-ema

Runs as `python preprocessing/dataset_tools.py ...` (from the repository root, or as
`python dataset_tools.py ...` from inside preprocessing/) and as `python -m preprocessing.dataset_tools`.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file: sys.path[0] is preprocessing/, where the repository's modules cannot be
    # imported. Hand over to the module form with the repository root on PYTHONPATH (same process
    # id and environment, so accelerate / torchrun launches are unaffected); nothing else happens
    # before this line, and importing this module never changes sys.path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p))
    os.execve(sys.executable, [sys.executable, "-m", "preprocessing.dataset_tools", *sys.argv[1:]], _env)

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import re
import shutil
import time
import zipfile
from typing import Callable

import PIL.Image
import numpy as np
import torch
from tqdm import tqdm

from dataset import (LATENT_DIR, FileTree, UnsupportedImageMode, decode_image, find_image_dir, is_image_name,
                     open_listing, parse_labels, read_dataset_json, to_rgb)
from models.vae import load_vae
from preprocessing import image_name
from preprocessing.records import (ENCODE_CONFIG, HASH_DIR, content_hash, first_difference, read_content_records,
                                   write_content_record)
from preprocessing.transforms import TRANSFORMS, check_output_size, make_transform, parse_resolution
from reg import folder_lock, processes, stop_signals
from reg.utils import (ArgumentParser, HelpFormatter, UserError, atomic_json_dump, atomic_write, atomic_write_bytes,
                       clean_stale_tmp, fp32_precision, run_main)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # EDM2 / REG / REPA dataset_tools.py encode default
_SHARD_DIR = re.compile(r"\d+")  # convert's 00000/, 00001/ ... folders: shards, not classes

# ---------------------------------------------------------------------------------------------
# Output names


# ---------------------------------------------------------------------------------------------
# Sources and labels


def source_labels(source: FileTree, names: list[str]) -> dict[str, int] | None:
    """Labels from the source's dataset.json, else from class folders; None when it has neither.

    Class folders are ImageFolder style: class = index of the sorted top-level folder, used only
    when every image sits in one, there are at least two, and none is a numeric shard folder
    (00000/, 00001/ as convert writes them: those are not classes).
    """
    if source.exists("dataset.json"):
        labels = parse_labels(read_dataset_json(source), source.describe("dataset.json"))
        if labels is not None:
            missing = [n for n in names if n not in labels]
            if missing:
                raise UserError(f"{source.describe('dataset.json')} has no label for {len(missing)} "
                                f"image(s), e.g. {missing[0]}")
            return {n: labels[n] for n in names}
    if not names or not all("/" in n for n in names):
        return None
    folders = sorted({n.split("/", 1)[0] for n in names})
    if len(folders) < 2 or any(_SHARD_DIR.fullmatch(f) for f in folders):
        return None
    if isinstance(source, FileTree) and not source.is_zip:
        check_class_folders(source.path, folders)
    index = {c: i for i, c in enumerate(folders)}
    return {n: index[n.split("/", 1)[0]] for n in names}


def check_class_folders(root: str, folders: list[str]) -> None:
    """Refuse a top-level entry that would silently shift the class labels: a broken symbolic link, or a
    folder (symlinked or not) without images. Class = index among the folders with images, so either
    would drop a class and move every later one down by one."""
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_symlink() and not os.path.exists(entry.path):
            raise UserError(f"--source {root}: {entry.path} is a broken symbolic link (-> {os.readlink(entry.path)}); "
                            "as a missing class folder it would shift every later class label: fix or remove it")
        if entry.is_dir() and entry.name not in folders:
            raise UserError(f"--source {root}: class folder {entry.path} holds no images; it would shift every "
                            "later class label: remove it, or put its images back")


def list_source(args: argparse.Namespace) -> tuple[FileTree, list[str], list[str], dict[str, int] | None]:
    """(tree, every image name sorted, the first --max-images of them, labels of all or None)."""
    if not (os.path.isdir(args.source) or (os.path.isfile(args.source) and args.source.lower().endswith(".zip"))):
        raise FileNotFoundError(f"--source {args.source}: no such folder or .zip archive")
    source = FileTree(args.source)
    all_names = [n for n in source.list() if is_image_name(n)]
    names = all_names[: args.max_images] if args.max_images is not None else all_names
    if not names:
        raise UserError(f"no images found in --source {args.source}")
    labels = source_labels(source, all_names)  # classes from every image, as EDM2, not only the first K
    return source, all_names, names, labels


def fingerprint(tree: FileTree, names: list[str]) -> str:
    """sha256 of the file list (names and sizes): cheap, and changes when files are added, removed,
    renamed or rewritten with another size."""
    h = hashlib.sha256()
    for n in names:
        h.update(f"{n}\t{tree.size(n)}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# convert

_WORKER: dict = {}  # per-process state of the convert workers (set by _init_convert_worker)


def _init_convert_worker(source: str, transform: str | None, resolution: tuple[int, int] | None) -> None:
    _WORKER.update(source=FileTree(source), transform=make_transform(transform, resolution))


def _convert_one(task: tuple[int, str]) -> tuple[int, bytes | None, tuple[int, int] | None, str | None]:
    """(idx, source name) -> (idx, PNG bytes, output size, None) or (idx, None, None, why skipped)."""
    idx, name = task
    source: FileTree = _WORKER["source"]
    try:
        with PIL.Image.open(io.BytesIO(source.read(name))) as im:
            img = to_rgb(im, source.describe(name))  # forces the full decode: broken files fail here
    except UnsupportedImageMode as e:  # skipped and listed like a broken file
        return idx, None, None, str(e)
    except Exception as e:  # PIL raises many types for broken files
        return idx, None, None, f"{source.describe(name)}: unreadable: {type(e).__name__}: {e}"
    img = _WORKER["transform"](img)
    if img is None:
        return idx, None, None, f"{source.describe(name)}: too small for --transform=center-crop-wide"
    buf = io.BytesIO()
    img.save(buf, format="png", compress_level=0, optimize=False)  # uncompressed: fast to decode
    return idx, buf.getvalue(), img.size, None


def _convert_into(args: argparse.Namespace, names: list[str], labels: dict[str, int] | None,
                  write: Callable[[str, bytes], None]) -> tuple[list, list[str]]:
    init = (args.source, args.transform, args.resolution)
    tasks = list(enumerate(names))
    written, skipped, size = [], [], None
    pool = None
    try:
        if args.num_workers > 0:
            pool = multiprocessing.Pool(args.num_workers, initializer=_init_convert_worker, initargs=init)
            results = pool.imap(_convert_one, tasks, chunksize=16)
        else:
            _init_convert_worker(*init)
            results = map(_convert_one, tasks)
        for idx, data, out_size, why in tqdm(results, total=len(tasks), desc="convert", unit="img"):
            if why is not None:
                skipped.append(why)
                continue
            if size is None:
                check_output_size(out_size)
                size = out_size
            elif out_size != size:  # EDM2: every image of a dataset has the same size
                raise UserError(f"{names[idx]} becomes {out_size[0]}x{out_size[1]} but earlier images "
                                f"{size[0]}x{size[1]}: set --resolution (and --transform)")
            write(image_name(idx), data)
            written.append([image_name(idx), labels[names[idx]] if labels is not None else None])
        if not written:
            raise RuntimeError(f"convert: no image of --source {args.source} could be converted "
                               f"({len(skipped)} skipped):\n  " + "\n  ".join(skipped[:20]))
        write("dataset.json", json.dumps({"labels": written if labels is not None else None}, allow_nan=False).encode())
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return written, skipped


def convert(args: argparse.Namespace) -> dict:
    make_transform(args.transform, args.resolution)  # flag errors before any work
    source, _all, names, labels = list_source(args)
    if labels is None:
        print(f"convert: {args.source} has no dataset.json labels and no class folders: writing an unlabelled "
              "dataset (\"labels\": null; train it with --num-classes 1)", file=sys.stderr)
    dest = args.dest
    if dest.lower().endswith(".zip"):
        if os.path.exists(dest):
            raise FileExistsError(f"--dest {dest} already exists; remove it or choose another name")

        outcome: dict = {}

        def write_zip(tmp: str) -> None:  # the whole zip under a temporary name, renamed when complete
            with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED) as z:
                outcome["result"] = _convert_into(args, names, labels, z.writestr)

        atomic_write(dest, write_zip)
        written, skipped = outcome["result"]
    else:
        if os.path.isdir(dest) and [n for n in os.listdir(dest) if n != folder_lock.LOCK_NAME]:
            raise FileExistsError(f"--dest folder {dest} is not empty")
        folder_lock.hold_folder(dest, hint="choose another --dest")
        written, skipped = _convert_into(
            args, names, labels, lambda name, data: atomic_write_bytes(os.path.join(dest, name), data))

    if skipped:
        print(f"convert: skipped {len(skipped)} image(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {s}", file=sys.stderr)
    print(f"convert: wrote {len(written)} images ({args.transform or 'scale'}) to {dest}; "
          f"skipped {len(skipped)}")
    return {"written": len(written), "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# encode

_IMG_INDEX = re.compile(r"(?:.*/)?img(\d{8})\.\w+")


def latent_names_for(image_names: list[str]) -> list[str]:
    """Latent file names, in the same sorted order as the (sorted) image names.

    Keep the image's index when the images follow convert's naming (so 00000/img00000041.png
    pairs with 00000/img-mean-std-00000041.npy even after convert skipped broken files); else
    number them in order.
    """
    matches = [_IMG_INDEX.fullmatch(n) for n in image_names]
    if all(matches):
        idx = [m.group(1) for m in matches]
        names = [f"{s[:5]}/img-mean-std-{s}.npy" for s in idx]
        if len(set(names)) == len(names) and names == sorted(names):
            return names
    return [f"{s[:5]}/img-mean-std-{s}.npy" for s in (f"{i:08d}" for i in range(len(image_names)))]


def shards_for_rank(num_items: int, shard_size: int, rank: int, world_size: int) -> list[range]:
    """Contiguous shards of the sorted items, dealt round-robin to the processes."""
    shards = [range(s, min(s + shard_size, num_items)) for s in range(0, num_items, shard_size)]
    return shards[rank::world_size]


class _ImageFiles(torch.utils.data.Dataset):
    """(index, uint8 (3, R, R), sha256 of the file's bytes, its size) for the given indices of a converted dataset."""

    def __init__(self, tree: FileTree, names: list[str], indices: list[int], resolution: int):
        self.tree, self.names, self.indices, self.resolution = tree, names, indices, resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, str, int]:
        i = self.indices[k]
        where = self.tree.describe(self.names[i])
        data = self.tree.read(self.names[i])
        img = decode_image(data, where)
        if img.shape[:2] != (self.resolution, self.resolution):
            raise UserError(f"{where} is {img.shape[1]}x{img.shape[0]}, expected {self.resolution}x{self.resolution} "
                            "like the first image")
        return i, torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), content_hash(data), len(data)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _check_destination(work: str, config: dict, source_info: dict) -> None:
    """Refuse a destination made from another source or with other settings, before touching it."""
    config_path = os.path.join(work, ENCODE_CONFIG)
    if not os.path.isfile(config_path):
        if os.path.isdir(work) and any(n.endswith((".npy", ".json")) for n in FileTree(work).list()):
            raise FileExistsError(f"--dest {work} already holds latents or a dataset.json but no {ENCODE_CONFIG}, "
                                  "so what they were made from is unknown; use another --dest")
        return
    try:
        with open(config_path) as f:
            previous = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {config_path}: {e}") from e
    prev_source = previous.get("source") or {}
    if prev_source.get("fingerprint") != source_info["fingerprint"]:
        raise UserError(
            f"--dest {work} was made from {prev_source.get('path', 'an unrecorded source')} "
            f"({prev_source.get('num_images', '?')} images, file-list fingerprint "
            f"{str(prev_source.get('fingerprint'))[:12]}), not from --source {source_info['path']} "
            f"({source_info['num_images']} images, fingerprint {source_info['fingerprint'][:12]}); "
            "refusing to mix datasets: use another --dest")
    settings = {k: v for k, v in previous.items() if k != "source"}
    if settings != config:
        raise UserError(f"--dest {work} holds latents made with {settings}, but this run uses {config}; "
                        f"use another --dest")


# Content check (docs/data.md#content-check-on-encode-resume): the sha256 of every image's bytes as encode
# read them, its label and size, and the sha256 and size of the latent file written, are stored per shard in
# DEST/image-hashes/ (preprocessing/records.py); a rerun verifies every stored one against --source and DEST
# before it writes anything, so a source replaced by another of the same names and sizes is refused, and so is
# a latent file overwritten since.


def verify_content(work: str, source: FileTree, records: dict, by_latent: dict[str, str],
                   labels: dict[str, int] | None, rank: int, world: int, threads: int) -> str | None:
    """The first difference between --source and what the destination was encoded from, or None; also a
    latent file of the destination that is not what encode wrote.

    Every process checks the names and labels of all records (in memory) and re-hashes its share
    (records[rank::world]) of the images and latent files on `threads` threads."""
    def describe(latent: str, image: str, what: str) -> str:
        return (f"--source {source.path} is not what --dest {work} was encoded from: {source.describe(image)} {what} "
                f"(encoded into {latent}); refusing to mix datasets: use another --dest")
    for latent, rec in records.items():
        if by_latent.get(latent) != rec.image:
            return describe(latent, rec.image, "is no longer the image of that latent file")
        now = None if labels is None else labels[rec.image]
        if now != rec.label:
            return describe(latent, rec.image, f"has label {now} now, {rec.label} when encoded")
    dest_labels = os.path.join(work, "dataset.json")  # the labels already written, if any
    if os.path.isfile(dest_labels):
        with open(dest_labels) as f:
            written = json.load(f).get("labels")
        for latent, label in written or []:
            image = by_latent.get(latent)
            if image is not None and labels is not None and labels[image] != label:
                return describe(latent, image, f"has label {labels[image]} now, {label} in {dest_labels}")

    def differs(item) -> str | None:
        latent, rec = item
        try:
            now = content_hash(source.read(rec.image))
        except OSError as e:
            return describe(latent, rec.image, f"cannot be read ({e})")
        if now != rec.image_sha256:
            return describe(latent, rec.image, f"has other content (sha256 {now[:12]} now, {rec.image_sha256[:12]} "
                                               "when encoded)")
        path = os.path.join(work, latent)
        if rec.latent_sha256 is None or not os.path.isfile(path):  # an older record; a missing file is made again
            return None
        with open(path, "rb") as f:
            now = content_hash(f.read())
        return None if now == rec.latent_sha256 else (
            f"--dest {work}: {path} is not the file encode wrote (sha256 {now[:12]} now, {rec.latent_sha256[:12]} "
            "when written): overwritten since? remove it, and rerun to encode it again")

    return first_difference(differs, sorted(records.items())[rank::world], threads)


def encode(args: argparse.Namespace) -> dict:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=args.cpu)
    world = state.num_processes
    dtype = DTYPES[args.dtype]

    source, all_names, names, labels = list_source(args)
    with source.open(names[0]) as f:
        w, h = PIL.Image.open(f).size
    codec = load_vae(args.model_url, device=state.device, dtype=dtype)
    if w != h or w % codec.downsample:
        raise UserError(f"{source.describe(names[0])} is {w}x{h}; expected square images whose side is a "
                        f"multiple of {codec.downsample} (run convert first)")
    vae_info = {"name": codec.name, "latent_channels": codec.latent_channels,
                "scaling_factor": codec.scaling_factor, "resolution": w}
    config = {**vae_info, "dtype": args.dtype}
    source_info = {"path": os.path.abspath(args.source), "num_images": len(all_names),
                   "fingerprint": fingerprint(source, all_names)}

    # A .zip destination is built in a folder beside it, then packed under a temporary name and renamed.
    to_zip = args.dest.lower().endswith(".zip")
    work = args.dest + ".parts" if to_zip else args.dest
    if to_zip and os.path.exists(args.dest):
        raise FileExistsError(f"--dest {args.dest} already exists; remove it or choose another name")

    records = _prepare_destination(work, config, source_info, source, all_names, labels, state, args.num_workers)
    new, before, seconds = _encode_shards(args, state, work, source, names, labels, records, codec, w)
    if stop_signals.any_rank_stopping(world):
        raise stop_signals.stopped(f"the latents written so far in {work} are complete", is_main=state.is_main_process)
    counts = gather_object([(new, before)])
    state.wait_for_everyone()
    new, before = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if state.is_main_process:
        _finish_destination(args, work, all_names, names, labels, vae_info, codec, w, new, before)
    return {"written": new, "already_done": before, "seconds": seconds}


def _prepare_destination(work: str, config: dict, source_info: dict, source: FileTree, all_names: list[str],
                         labels: dict | None, state, num_workers: int) -> dict:
    """Holds `work`, checks it was made from this source with these settings (every rank) and records
    them (rank 0). Returns the content records of the latents already there."""
    from accelerate.utils import gather_object

    rank, world = state.process_index, state.num_processes
    all_latent_names = latent_names_for(all_names)
    # One encode per destination: its stale temporaries below are then certainly a dead run's.
    folder_lock.hold_folder(work, hint="choose another --dest", rank=rank, world=world)
    # Every rank checks (so that none is left waiting at a barrier); rank 0 records the settings and
    # the source, and removes stale temporaries. Nothing is written before the check passes.
    _check_destination(work, config, source_info)
    records = read_content_records(FileTree(work)) if os.path.isdir(work) else {}
    problem = verify_content(work, source, records, dict(zip(all_latent_names, all_names)), labels, rank, world,
                             threads=max(num_workers, 4))
    problems = [p for p in gather_object([problem]) if p is not None]
    if problems:
        raise UserError(problems[0])
    if state.is_main_process:
        os.makedirs(work, exist_ok=True)
        atomic_json_dump({**config, "source": source_info}, os.path.join(work, ENCODE_CONFIG))
        for folder in {os.path.dirname(os.path.join(work, n)) for n in FileTree(work).list()} | {work}:
            clean_stale_tmp(folder)
    state.wait_for_everyone()
    return records


def _encode_shards(args: argparse.Namespace, state, work: str, source: FileTree, names: list[str],
                   labels: dict | None, records: dict, codec, w: int) -> tuple[int, int, float]:
    """Encodes this rank's shards that are not complete yet, writing each shard's content record when
    its last latent is written; stops after a batch on a stop signal. Returns (encoded, already done,
    seconds)."""
    rank, world = state.process_index, state.num_processes
    dtype = DTYPES[args.dtype]
    latent_names = latent_names_for(names)
    existing = set(FileTree(work).list())
    mine = shards_for_rank(len(names), args.shard_size, rank, world)
    # a latent without a content record (killed before its shard's record, or an older version) is made again
    todo = [s for s in mine if not all(latent_names[i] in existing and latent_names[i] in records for i in s)]
    unrecorded = sum(latent_names[i] in existing and latent_names[i] not in records for s in todo for i in s)
    if unrecorded:
        print(f"encode (rank {rank}): {unrecorded} latent file(s) have no content record (an older version or a "
              f"killed run wrote them): encoded again", file=sys.stderr)
    indices = [i for s in todo for i in s]
    shard_of = {i: k for k, s in enumerate(todo) for i in s}
    pending: dict[int, list] = {}
    num_done_before = sum(len(s) for s in mine) - len(indices)

    loader = torch.utils.data.DataLoader(
        _ImageFiles(source, names, indices, w), batch_size=args.batch_size, shuffle=False,
        num_workers=args.num_workers, pin_memory=state.device.type == "cuda")
    t0 = time.perf_counter()
    bar = tqdm(total=len(indices), desc=f"encode (rank {rank})", unit="img", disable=not state.is_main_process)
    # fp32 means fp32: TF32 convolutions would make the moments depend on the batch size.
    with fp32_precision("ieee") if dtype == torch.float32 else contextlib.nullcontext():
        for idx, images, digests, sizes in loader:
            mean, std = codec.encode_moments(images.to(state.device, non_blocking=True))
            moments = torch.cat([mean, std], dim=1).cpu().numpy()  # (N, 2C, h, w) float32
            for i, m, digest, size in zip(idx.tolist(), moments, digests, sizes.tolist()):
                data = npy_bytes(m)
                atomic_write_bytes(os.path.join(work, latent_names[i]), data)
                rows = pending.setdefault(shard_of[i], [])
                rows.append([latent_names[i], names[i], digest, None if labels is None else labels[names[i]],
                             size, content_hash(data), len(data)])  # preprocessing.records.Record's fields
                if len(rows) == len(todo[shard_of[i]]):  # the shard is complete: record it
                    write_content_record(work, pending.pop(shard_of[i]))
            bar.update(len(idx))
            if stop_signals.stop_requested():  # a signal: this batch is written; a rerun redoes the rest
                break
    bar.close()
    return len(indices), num_done_before, time.perf_counter() - t0


def _finish_destination(args: argparse.Namespace, work: str, all_names: list[str], names: list[str],
                        labels: dict | None, vae_info: dict, codec, w: int, new: int, before: int) -> None:
    """Rank 0, after every rank's shards: checks that every latent is there and none is foreign, writes
    dataset.json (labels of every latent there) and packs a .zip --dest."""
    latent_names, all_latent_names = latent_names_for(names), latent_names_for(all_names)
    to_zip = work != args.dest  # a .zip --dest is built in DEST.parts
    present = {n for n in FileTree(work).list() if n.endswith(".npy")}
    missing = [n for n in latent_names if n not in present]
    if missing:
        raise RuntimeError(f"{len(missing)} latent file(s) are missing after encoding, e.g. {missing[0]}; "
                           "rerun the same command to resume")
    # The label file covers every latent in the destination, also those of an earlier run with a
    # larger --max-images (same source, checked above).
    by_latent = dict(zip(all_latent_names, all_names))
    foreign = sorted(present - set(by_latent))
    if foreign:
        raise RuntimeError(f"{work} holds {len(foreign)} latent file(s) that match no image of --source "
                           f"{args.source}, e.g. {foreign[0]}")
    covered = [n for n in all_latent_names if n in present]
    label_list = [[n, labels[by_latent[n]]] for n in covered] if labels is not None else None
    meta = {"labels": label_list, "vae": vae_info}
    atomic_write_bytes(os.path.join(work, "dataset.json"), json.dumps(meta, allow_nan=False).encode())
    if label_list is None:
        print(f"encode: {args.source} has no dataset.json labels and no class folders: wrote an unlabelled "
              "dataset (\"labels\": null); train it with --num-classes 1", file=sys.stderr)
    if to_zip:
        def write_zip(tmp: str) -> None:
            with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED) as z:
                hashes = os.path.join(work, HASH_DIR)
                records = sorted(f"{HASH_DIR}/{f}" for f in os.listdir(hashes)) if os.path.isdir(hashes) else []
                for n in sorted(covered) + ["dataset.json", ENCODE_CONFIG] + records:
                    z.write(os.path.join(work, n), n)
        atomic_write(args.dest, write_zip)
        shutil.rmtree(work)
    print(f"encode: wrote {new} latent files ({before} already done) to {args.dest}: "
          f"{len(covered)} in all, {codec.name}, {w}x{w} -> {2 * codec.latent_channels}x{w // codec.downsample}"
          f"x{w // codec.downsample}")
    write_index(args.dest, args.source, w)


def write_index(dest: str, source: str, resolution: int) -> None:
    """The training reader's index of DATA (dataset.open_listing, docs/data.md#the-index), when --dest is
    DATA/vae-sd (or .zip) and --source the image folder train.py finds beside it; else train.py builds it at
    its first start."""
    data_dir, base = os.path.split(os.path.abspath(dest))
    later = "encode: no data index written ({}); train.py builds it at its first start"
    if (base[:-4] if base.lower().endswith(".zip") else base) != LATENT_DIR:
        print(later.format(f"--dest is not named {LATENT_DIR}"), file=sys.stderr)
        return
    try:
        image_base, _ = find_image_dir(data_dir, resolution)
        found = next(p for p in (os.path.join(data_dir, image_base), os.path.join(data_dir, image_base + ".zip"))
                     if os.path.exists(p))
        if os.path.realpath(found) != os.path.realpath(source):
            print(later.format(f"train.py would read the images of {found}, not --source"), file=sys.stderr)
            return
        open_listing(data_dir, resolution, report=lambda line: print(f"encode: {line}"))
    except (UserError, OSError) as e:
        print(later.format(e), file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="images -> uncompressed PNGs (+ crop/resize) + dataset.json",
                       formatter_class=HelpFormatter)
    g = p.add_argument_group("input/output (EDM2's flags)")
    g.add_argument("--source", required=True, metavar="PATH",
                   help="input folder (ImageFolder style: class = sorted top-level folder) or .zip")
    g.add_argument("--dest", required=True, metavar="PATH", help="output folder (empty or new) or new .zip")
    g.add_argument("--max-images", type=int, default=None, metavar="INT", help="only the first INT images (sorted)")
    g.add_argument("--transform", choices=TRANSFORMS, default=None, metavar="MODE",
                   help="crop/resize mode: center-crop-dhariwal (ADM's ImageNet crop, the one REG/REPA use), "
                        "center-crop (square centre crop + LANCZOS), center-crop-wide (full width, centred band "
                        "on a square black canvas); none: LANCZOS resize to --resolution, or keep the size")
    g.add_argument("--resolution", type=parse_resolution, default=None, metavar="WxH",
                   help="output size, e.g. 256x256 or 512x512 (outputs must be square)")
    g = p.add_argument_group("performance")
    g.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1), metavar="INT",
                   help="decode/crop processes (0: in the main process)")

    p = sub.add_parser("encode", help="converted PNGs -> VAE posterior mean||std .npy + dataset.json",
                       formatter_class=HelpFormatter)
    g = p.add_argument_group("input/output (EDM2's flags)")
    g.add_argument("--source", required=True, metavar="PATH", help="output of convert (folder or .zip)")
    g.add_argument("--dest", required=True, metavar="PATH",
                   help="output folder (e.g. DATA/vae-sd; a rerun resumes it) or new .zip")
    g.add_argument("--max-images", type=int, default=None, metavar="INT", help="only the first INT images (sorted)")
    g.add_argument("--model-url", default=DEFAULT_VAE, metavar="URL",
                   help="VAE: 'ema', 'mse', an HF hub id, a local AutoencoderKL directory, or 'pixel-unshuffle' / "
                        "'pixel-unshuffle-lowpass' (weight-free demo codecs). sd-vae-ft-ema and -mse share the "
                        "encoder, so their latents are identical")
    g = p.add_argument_group("performance")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="VAE compute dtype (files are float32); fp32 runs with TF32 off")
    g.add_argument("--batch-size", type=int, default=32, metavar="INT", help="images per forward, per process")
    g.add_argument("--num-workers", type=int, default=4, metavar="INT", help="PNG decoding workers per process")
    g.add_argument("--cpu", action="store_true", help="encode on the CPU even if a GPU is present")
    g.add_argument("--shard-size", type=int, default=1000, metavar="INT",
                   help="images per shard; a rerun skips shards whose outputs all exist")
    args = parser.parse_args(argv)
    for flag in ("max_images", "batch_size", "shard_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.command == "convert":
        try:
            make_transform(args.transform, args.resolution)
        except ValueError as e:
            parser.error(str(e))
    return args


@processes.command("preprocessing/dataset_tools.py")
def main(args: argparse.Namespace) -> dict:
    if args.command == "convert":
        return convert(args)
    return encode(args)


if __name__ == "__main__":
    run_main(main, parse_args)
