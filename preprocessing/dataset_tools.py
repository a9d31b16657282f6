"""Dataset preparation CLI, keeping the flags of EDM2/REPA's dataset_tool (SPEC §4).

convert: an ImageNet-style folder (class = sorted top-level directory) or a zip -> uncompressed
         PNGs at R x R with ADM's centre crop, plus dataset.json. Multi-process.

    python preprocessing/dataset_tools.py convert --source=ILSVRC/Data/CLS-LOC/train \
        --dest=DATA/imagenet_256_vae --resolution=256x256 --transform=center-crop-dhariwal

encode:  a converted dataset -> posterior mean||std .npy files plus dataset.json (vae-sd/ layout).
         Batched; multi-GPU through accelerate (each process takes a disjoint set of shards);
         resumable (a rerun skips shards whose outputs all exist).

    accelerate launch --num_processes 8 preprocessing/dataset_tools.py encode \
        --source=DATA/imagenet_256_vae --dest=DATA/vae-sd --model-url=stabilityai/sd-vae-ft-ema

Also runs as `python -m preprocessing.dataset_tools`.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import io
import json
import multiprocessing
import re
import time
import zipfile

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

from dataset import FileTree, decode_image, is_image_name, read_dataset_json
from models.vae import load_vae

TRANSFORMS = ("center-crop-dhariwal", "center-crop")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENCODE_CONFIG = "encode_config.json"  # what a partial encode was started with, checked on resume

# ---------------------------------------------------------------------------------------------
# Crops


def center_crop_dhariwal(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """ADM's ImageNet crop (guided-diffusion image_datasets.center_crop_arr, SPEC §4).

    BOX-halve while the short side is >= 2*res (cheap anti-aliased downscaling), then BICUBIC-resize
    so that the short side is exactly res, then take the centre res x res crop.
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=PIL.Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=PIL.Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def center_crop_square(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """EDM's 'center-crop': the largest centred square, then one LANCZOS resize."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
    return img.resize((resolution, resolution), resample=PIL.Image.Resampling.LANCZOS)


CROPS = {"center-crop-dhariwal": center_crop_dhariwal, "center-crop": center_crop_square}


def parse_resolution(s: str) -> int:
    """'256x256', '256,256' or '256' -> 256. Square, and a multiple of 16 (VAE /8, then patch /2)."""
    m = re.fullmatch(r"(\d+)(?:[x,](\d+))?", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse resolution {s!r}; expected e.g. 256x256")
    w, h = int(m.group(1)), int(m.group(2) or m.group(1))
    if w != h:
        raise argparse.ArgumentTypeError(f"resolution must be square, got {w}x{h}")
    if w <= 0 or w % 16:
        raise argparse.ArgumentTypeError(f"resolution must be a positive multiple of 16, got {w}")
    return w


def image_name(idx: int) -> str:
    """EDM's naming: 1000 images per folder, 00000/img00000000.png."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


def write_atomic(path: str, data: bytes) -> None:
    """Write via a temporary name and os.replace, so a killed run never leaves a truncated file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# convert


def source_labels(source: FileTree, names: list[str]) -> dict[str, int] | None:
    """Labels from the source's dataset.json if it has them, else the sorted top-level folders."""
    if source.exists("dataset.json"):
        labels = read_dataset_json(source).get("labels")
        if labels:
            labels = {str(n).replace("\\", "/"): int(c) for n, c in labels}
            missing = [n for n in names if n not in labels]
            if missing:
                raise ValueError(f"{source.describe('dataset.json')} has no label for {len(missing)} "
                                 f"image(s), e.g. {missing[0]}")
            return {n: labels[n] for n in names}
    if names and all("/" in n for n in names):
        classes = sorted({n.split("/", 1)[0] for n in names})
        index = {c: i for i, c in enumerate(classes)}
        return {n: index[n.split("/", 1)[0]] for n in names}
    return None


class _Dest:
    """An empty output folder, or a new uncompressed zip."""

    def __init__(self, dest: str):
        self.dest = dest
        self.zip = None
        if dest.lower().endswith(".zip"):
            if os.path.exists(dest):
                raise FileExistsError(f"--dest {dest} already exists; remove it first")
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            self.zip = zipfile.ZipFile(dest, mode="w", compression=zipfile.ZIP_STORED)
        else:
            if os.path.isdir(dest) and os.listdir(dest):
                raise FileExistsError(f"--dest folder {dest} is not empty")
            os.makedirs(dest, exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        if self.zip is not None:
            self.zip.writestr(name, data)
        else:
            write_atomic(os.path.join(self.dest, name), data)

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


_WORKER: dict = {}  # per-process state of the convert workers (set by _init_convert_worker)


def _init_convert_worker(source: str, folder_dest: str | None, transform: str, resolution: int) -> None:
    _WORKER.update(source=FileTree(source), dest=folder_dest, crop=CROPS[transform], resolution=resolution)


def _convert_one(task: tuple[int, str]) -> tuple[int, bytes | None, str | None]:
    """(idx, source name) -> (idx, PNG bytes or None if already written, error message or None)."""
    idx, name = task
    source: FileTree = _WORKER["source"]
    try:
        with PIL.Image.open(io.BytesIO(source.read(name))) as im:
            img = im.convert("RGB")  # forces the full decode: broken files fail here
    except Exception as e:  # PIL raises many types for broken files
        return idx, None, f"{source.describe(name)}: {type(e).__name__}: {e}"
    img = _WORKER["crop"](img, _WORKER["resolution"])
    buf = io.BytesIO()
    img.save(buf, format="png", compress_level=0, optimize=False)  # uncompressed: fast to decode
    if _WORKER["dest"] is None:
        return idx, buf.getvalue(), None
    write_atomic(os.path.join(_WORKER["dest"], image_name(idx)), buf.getvalue())
    return idx, None, None


def list_source(args: argparse.Namespace) -> tuple[FileTree, list[str], dict[str, int] | None]:
    """The source's image names (sorted, at most --max-images) and their labels, if it has any."""
    source = FileTree(args.source)
    names = [n for n in source.list() if is_image_name(n)]
    if args.max_images is not None:
        names = names[: args.max_images]
    if not names:
        raise ValueError(f"no images found in {args.source}")
    return source, names, source_labels(source, names)


def convert(args: argparse.Namespace) -> dict:
    source, names, labels = list_source(args)
    if labels is None:
        print(f"convert: warning: {args.source} has no dataset.json labels and no class folders; "
              "writing labels: null", file=sys.stderr)
    dest = _Dest(args.dest)
    folder_dest = None if dest.zip is not None else args.dest  # workers write folder outputs themselves
    init = (args.source, folder_dest, args.transform, args.resolution)
    tasks = list(enumerate(names))

    written, skipped = [], []
    try:
        if args.num_workers > 0:
            pool = multiprocessing.Pool(args.num_workers, initializer=_init_convert_worker, initargs=init)
            results = pool.imap(_convert_one, tasks, chunksize=16)
        else:
            pool = None
            _init_convert_worker(*init)
            results = map(_convert_one, tasks)
        for idx, data, error in tqdm(results, total=len(tasks), desc="convert", unit="img"):
            if error is not None:
                skipped.append(error)
                continue
            if data is not None:
                dest.write(image_name(idx), data)
            written.append([image_name(idx), labels[names[idx]] if labels is not None else None])
        if pool is not None:
            pool.close()
            pool.join()
        meta = {"labels": written if labels is not None else None}
        dest.write("dataset.json", json.dumps(meta).encode())
    finally:
        dest.close()

    if skipped:
        print(f"convert: skipped {len(skipped)} unreadable image(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {s}", file=sys.stderr)
    print(f"convert: wrote {len(written)} images ({args.resolution}x{args.resolution}, {args.transform}) "
          f"to {args.dest}; skipped {len(skipped)} unreadable")
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
    """(index, uint8 (3, R, R)) for the given indices of a converted dataset."""

    def __init__(self, tree: FileTree, names: list[str], indices: list[int], resolution: int):
        self.tree, self.names, self.indices, self.resolution = tree, names, indices, resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor]:
        i = self.indices[k]
        where = self.tree.describe(self.names[i])
        img = decode_image(self.tree.read(self.names[i]), where)
        if img.shape[:2] != (self.resolution, self.resolution):
            raise ValueError(f"{where} is {img.shape[1]}x{img.shape[0]}, expected {self.resolution}x{self.resolution} "
                             "like the first image")
        return i, torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    write_atomic(path, buf.getvalue())


def encode(args: argparse.Namespace) -> dict:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=args.cpu)
    rank, world = state.process_index, state.num_processes
    dtype = DTYPES[args.dtype]
    if dtype == torch.float32 and state.device.type == "cuda":
        # fp32 means fp32: TF32 convolutions would make the moments depend on the batch size.
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"

    source, names, labels = list_source(args)
    if labels is None:
        raise ValueError(f"{source.describe('dataset.json')} has no labels (and the images are not in class "
                         "folders); the training set needs a class label per image")
    latent_names = latent_names_for(names)
    with source.open(names[0]) as f:
        w, h = PIL.Image.open(f).size
    codec = load_vae(args.model_url, device=state.device, dtype=dtype)
    if w != h or w % codec.downsample:
        raise ValueError(f"{source.describe(names[0])} is {w}x{h}; expected square images whose side is a "
                         f"multiple of {codec.downsample} (run convert first)")
    vae_info = {"name": codec.name, "latent_channels": codec.latent_channels,
                "scaling_factor": codec.scaling_factor, "resolution": w}

    # A partial run in --dest must have used the same settings. Every rank checks (so that none is
    # left waiting at a barrier); rank 0 records the settings and removes stale temporaries.
    dest = args.dest
    config = {**vae_info, "dtype": args.dtype}
    config_path = os.path.join(dest, ENCODE_CONFIG)
    if os.path.isfile(config_path):
        with open(config_path) as f:
            previous = json.load(f)
        if previous != config:
            raise ValueError(f"{dest} holds a partial encode made with {previous}, but this run uses {config}; "
                             f"use another --dest or delete {config_path} and the .npy files")
    if state.is_main_process:
        os.makedirs(dest, exist_ok=True)
        write_atomic(config_path, json.dumps(config, indent=1).encode())
        for n in FileTree(dest).list():
            if ".npy.tmp" in n:
                os.remove(os.path.join(dest, n))
    state.wait_for_everyone()

    existing = set(FileTree(dest).list())
    mine = shards_for_rank(len(names), args.shard_size, rank, world)
    todo = [s for s in mine if not all(latent_names[i] in existing for i in s)]
    indices = [i for s in todo for i in s]
    num_done_before = sum(len(s) for s in mine) - len(indices)

    loader = torch.utils.data.DataLoader(
        _ImageFiles(source, names, indices, w), batch_size=args.batch_size, shuffle=False,
        num_workers=args.num_workers, pin_memory=state.device.type == "cuda")
    t0 = time.perf_counter()
    bar = tqdm(total=len(indices), desc=f"encode (rank {rank})", unit="img", disable=not state.is_main_process)
    for idx, images in loader:
        mean, std = codec.encode_moments(images.to(state.device, non_blocking=True))
        moments = torch.cat([mean, std], dim=1).cpu().numpy()  # (N, 2C, h, w) float32, SPEC §4
        for i, m in zip(idx.tolist(), moments):
            save_npy_atomic(os.path.join(dest, latent_names[i]), m)
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0

    counts = gather_object([(len(indices), num_done_before)])
    state.wait_for_everyone()
    new, before = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if state.is_main_process:
        present = set(FileTree(dest).list())
        missing = [n for n in latent_names if n not in present]
        if missing:
            raise RuntimeError(f"{len(missing)} latent file(s) are missing after encoding, e.g. {missing[0]}; "
                               "rerun the same command to resume")
        meta = {"labels": [[ln, labels[n]] for n, ln in zip(names, latent_names)], "vae": vae_info}
        write_atomic(os.path.join(dest, "dataset.json"), json.dumps(meta).encode())
        print(f"encode: wrote {new} latent files ({before} already done) to {dest}: "
              f"{len(latent_names)} in all, {codec.name}, {w}x{w} -> {2 * codec.latent_channels}x{w // codec.downsample}"
              f"x{w // codec.downsample}")
    return {"written": new, "already_done": before, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# CLI


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="images -> cropped uncompressed PNGs + dataset.json", formatter_class=_HelpFormatter)
    g = p.add_argument_group("input/output")
    g.add_argument("--source", required=True, metavar="PATH",
                   help="ImageNet-style folder (class = sorted top-level folder) or a .zip")
    g.add_argument("--dest", required=True, metavar="PATH", help="output folder (empty or new) or .zip")
    g.add_argument("--max-images", type=int, default=None, metavar="INT", help="only the first INT images (sorted)")
    g = p.add_argument_group("crop")
    g.add_argument("--transform", choices=TRANSFORMS, default="center-crop-dhariwal",
                   help="center-crop-dhariwal: ADM's crop (SPEC §4); center-crop: EDM's square crop + LANCZOS")
    g.add_argument("--resolution", type=parse_resolution, default=256, metavar="WxH",
                   help="output size, square, a multiple of 16 (e.g. 256x256, 512x512)")
    g = p.add_argument_group("performance")
    g.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1), metavar="INT",
                   help="decode/crop processes (0: in the main process)")

    p = sub.add_parser("encode", help="converted PNGs -> VAE posterior mean||std .npy + dataset.json",
                       formatter_class=_HelpFormatter)
    g = p.add_argument_group("input/output")
    g.add_argument("--source", required=True, metavar="PATH", help="output of convert (folder or .zip)")
    g.add_argument("--dest", required=True, metavar="PATH", help="output folder, e.g. DATA/vae-sd")
    g.add_argument("--max-images", type=int, default=None, metavar="INT", help="only the first INT images (sorted)")
    g = p.add_argument_group("model")
    g.add_argument("--model-url", default="stabilityai/sd-vae-ft-ema", metavar="SPEC",
                   help="'ema', 'mse', an HF hub id, a local AutoencoderKL directory, or 'pixel-unshuffle' (demo)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="VAE compute dtype (files are float32)")
    g = p.add_argument_group("performance")
    g.add_argument("--batch-size", type=int, default=32, metavar="INT", help="images per forward, per process")
    g.add_argument("--num-workers", type=int, default=4, metavar="INT", help="PNG decoding workers per process")
    g.add_argument("--cpu", action="store_true", help="encode on the CPU even if a GPU is present")
    g = p.add_argument_group("resume")
    g.add_argument("--shard-size", type=int, default=1000, metavar="INT",
                   help="images per shard; a rerun skips shards whose outputs all exist")
    args = parser.parse_args(argv)
    for flag in ("max_images", "batch_size", "shard_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(args: argparse.Namespace) -> dict:
    if args.command == "convert":
        return convert(args)
    return encode(args)


if __name__ == "__main__":
    main(parse_args())
