"""Data preparation: ImageNet -> ADM-cropped PNGs -> SD-VAE posterior moments (docs/design.md#data-layout).

    python preprocessing/dataset_tools.py convert ...   images -> imagenet_{R}_vae/ (PNG + dataset.json)
    python preprocessing/dataset_tools.py encode ...    imagenet_{R}_vae/ -> vae-sd/ (.npy + dataset.json)
    python -m preprocessing.synthetic ...               a small procedurally generated labelled dataset
"""


def image_name(idx: int) -> str:
    """EDM's naming, written by convert and the synthetic set: 1000 images per folder, 00000/img00000000.png.
    (Here rather than in dataset_tools, so that the torch-free synthetic tool need not import torch.)"""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"
