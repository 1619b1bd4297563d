"""Sample fake kanji from any GANji checkpoint.

    python sample.py ddpm runs/ddpm_kanji/ckpt.pt                 # 4x4 grid next to the checkpoint
    python sample.py auto ckpt.pt --n 64 --nrow 8 --seed 3 --out grid.png
    python sample.py ddpm ckpt.pt --sampler ddim --steps 20 --each samples/
    python sample.py gan ckpt.pt --interpolate --n 40 --nrow 10   # 4 rows, each a 10-step morph
"""
import argparse
import importlib
import os

import data


def load_any(kind, path, device="cpu"):
    """(module, sampling network, config) for a checkpoint; kind 'auto' reads it from the file."""
    if kind == "auto":
        kind = data.load_checkpoint(path, mmap=True)["kind"]
    data.load_checkpoint(path, kind, mmap=True)  # cheap check: clear errors for a missing/foreign/wrong-kind file
    mod = importlib.import_module(kind)
    try:
        net, cfg = mod.load(path, device)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise data.GanjiError(f"{path} does not fit this version's {kind} model ({first[:120]})")
    return mod, net, cfg


def generate(mod, net, cfg, n=16, nrow=4, seed=0, device="cpu", interpolate=False, progress=None, **kw):
    """[0, 1] images, ink bright: n samples, or n // nrow rows of an nrow-step morph."""
    ddpm = mod.KIND == "ddpm"
    if interpolate:  # DDPM morphs through deterministic DDIM, so only the step count applies
        kw = {"ddim_steps": kw.get("steps", 50), "progress": progress} if ddpm else {}
        return mod.interpolate(net, cfg, max(1, n // nrow), nrow, seed=seed, device=device, **kw)
    kw = {**kw, "progress": progress} if ddpm else {}
    return mod.sample(net, cfg, n, seed=seed, device=device, **kw)


def get_parser():
    p = argparse.ArgumentParser(description="Sample a grid of images from a GANji checkpoint.")
    p.add_argument("kind", choices=("vae", "gan", "ddpm", "auto"), help="model kind; auto reads it from the file")
    p.add_argument("ckpt", help="path to a ckpt.pt written by vae.py, gan.py or ddpm.py")
    p.add_argument("--n", type=int, default=16, help="number of images (default: %(default)s)")
    p.add_argument("--nrow", type=int, default=4, help="images per grid row (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="grid PNG (default: sample_seed<SEED>.png, or morph_seed<SEED>.png, next to the checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="same checkpoint + seed = same images (default: %(default)s)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ancestral"), help="DDPM only (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="DDPM DDIM steps (default: %(default)s)")
    p.add_argument("--eta", type=float, default=0.0, help="DDPM DDIM noise, 0 = deterministic (default: %(default)s)")
    p.add_argument("--each", default=None, metavar="DIR", help="also write every image as DIR/NNNN.png")
    p.add_argument("--interpolate", action="store_true",
                   help="rows morph between random latents (VAE, GAN; DDPM via DDIM with slerped noise)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="(default: %(default)s)")
    return p


def main(argv=None):
    from torchvision.utils import save_image
    from tqdm import tqdm

    args = get_parser().parse_args(argv)
    if args.n < 1 or args.nrow < 1 or args.steps < 1 or args.eta < 0:
        raise data.GanjiError("--n, --nrow and --steps must be at least 1 and --eta at least 0")
    device = data.pick_device(args.device)
    mod, net, cfg = load_any(args.kind, args.ckpt, device)
    bar = None

    def progress(i, total):
        nonlocal bar
        bar = bar or tqdm(total=total, desc=f"{mod.KIND} {args.sampler}", unit="step")
        bar.update(1)

    images = generate(mod, net, cfg, args.n, args.nrow, args.seed, device, args.interpolate, progress,
                      sampler=args.sampler, steps=args.steps, eta=args.eta)
    if bar:
        bar.close()
    name = f"{'morph' if args.interpolate else 'sample'}_seed{args.seed}.png"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), name)
    data.save_grid(images, out, cfg["display_invert"], nrow=args.nrow)
    if args.each:
        os.makedirs(args.each, exist_ok=True)
        for i, img in enumerate(images):
            save_image(data.to_picture(img, cfg["display_invert"]), os.path.join(args.each, f"{i:04d}.png"))
    print(f"wrote {out}" + (f" and {len(images)} images in {args.each}" if args.each else ""))


if __name__ == "__main__":
    data.cli(main)
