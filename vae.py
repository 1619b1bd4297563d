"""GANji VAE: a ResNet variational autoencoder that learns kanji (or MNIST, CIFAR-10, a folder of images).

    python vae.py                                  # built-in kanji, 64x64, reference width 1.0
    python vae.py --width 0.25 --limit 2000 --epochs 2 --out runs/vae_small
    python vae.py --out runs/vae_small --epochs 3 --resume

Encoder: conv -> 7 residual blocks (64 -> 512 channels, 64x64 -> 4x4) -> linear -> (mu, logvar).
Decoder: the mirror image, ending in per-pixel logits. Loss: BCE on logits summed over pixels
+ beta * KL(q(z|x) || N(0, I)), both per image and averaged over the batch.
Images are in [0, 1] with ink bright ("01" normalization), the Bernoulli likelihood's natural range.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

KIND = "vae"
NORM = "01"
ARCH_KEYS = ("image_size", "channels", "width", "latent_dim")  # what build() reads from a config
RUN_KEYS = ("epochs", "device", "precision", "compile", "out", "resume", "sample_every", "log_every",
            "dry_run", "data_dir")  # taken from the command line on --resume; the rest from the checkpoint


def get_parser():
    p = argparse.ArgumentParser(description="Train the GANji ResNet VAE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter if False else None)
    data.add_common_args(p, epochs=100, batch_size=64, lr=1e-3, precision="bf16", sample_every=1)
    g = p.add_argument_group("vae")
    g.add_argument("--latent-dim", type=int, default=64, help="size of the latent z (default: %(default)s)")
    g.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (default: %(default)s)")
    g.add_argument("--kl-warmup", type=float, default=0.0,
                   help="epochs over which the KL weight ramps linearly from 0 to --beta (default: %(default)s)")
    return p
