"""Data preparation: ImageNet -> ADM-cropped PNGs -> SD-VAE posterior moments (docs/design.md#data-layout).

    python preprocessing/dataset_tools.py convert ...   images -> imagenet_{R}_vae/ (PNG + dataset.json)
    python preprocessing/dataset_tools.py encode ...    imagenet_{R}_vae/ -> vae-sd/ (.npy + dataset.json)
    python -m preprocessing.synthetic ...               a small procedurally generated labelled dataset
"""
