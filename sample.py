"""Sample fake kanji from any GANji checkpoint, make slim files for pretrained/, read their records.

    python sample.py                                              # the pretrained DDPM: a 4x4 grid, sample_seed0.png
    python sample.py ddpm runs/ddpm_kanji/ckpt.pt                 # 4x4 grid next to the checkpoint
    python sample.py auto pretrained/gan_kanji.pt --n 64 --nrow 8 --seed 3 --out grid.png
    python sample.py ddpm ckpt.pt --sampler dpm++2m --steps 15 --each samples/
    python sample.py ddpm pretrained/ddpm_kanji.pt --guide pretrained/ddpm_kanji_guide.pt   # autoguidance
    python sample.py gan ckpt.pt --interpolate --n 40 --nrow 10   # 4 rows, each a 10-frame morph
    python sample.py export runs/ddpm_kanji/ckpt.pt pretrained/ddpm_kanji.pt   # slim, sampling-only copy
    python sample.py info pretrained/ddpm_kanji.pt                # how a file was made, and its scores
"""
import argparse
import datetime
import importlib
import os
import sys

import torch

import data

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
# --guidance with --guide: on the pretrained DDPM guided by its 9-epoch self (DPM-Solver++ 10 steps), weight 2 gave
# FID 13.58 against 14.96 unguided and precision 0.54 against 0.44; 1.5 gave 13.71, and 3 overshot (FID 15.08)
GUIDANCE = 2.0


def load_any(kind, path, device="cpu"):
    """(module, sampling network, config) for a checkpoint; kind 'auto' reads it from the file."""
    kind = data.load_checkpoint(path, kind, mmap=True)["kind"]  # cheap: clear errors for a missing/foreign file
    mod = importlib.import_module(kind)
    try:
        net, cfg = mod.load(path, device)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise data.GanjiError(f"{path} does not fit this version's {kind} model ({first[:120]})")
    return mod, net, cfg


def generate(mod, net, cfg, n=16, nrow=4, seed=0, device="cpu", interpolate=False, progress=None, **sampler):
    """[0, 1] images, ink bright: n samples, or n // nrow rows of an nrow-frame morph.

    sampler: the DDPM's sampler, steps, eta, guide network, guidance and guide_min_t; the VAE's prior (None: the
    run's); the GAN takes none."""
    keep = {"ddpm": ("sampler", "steps", "eta", "guide", "guidance", "guide_min_t"), "vae": ("prior",),
            "gan": ()}[mod.KIND]
    sampler = {k: v for k, v in sampler.items() if k in keep and v is not None}
    if mod.KIND == "ddpm":
        sampler["progress"] = progress
    if interpolate:
        sampler.pop("eta", None)  # a morph is deterministic
        return mod.interpolate(net, cfg, max(1, n // nrow), nrow, seed=seed, device=device, **sampler)
    return mod.sample(net, cfg, n, seed=seed, device=device, **sampler)


def add_guide_args(p):
    """sample.py's and evaluate.py's --guide, --guidance and --guide-min-t."""
    p.add_argument("--guide", default=None, metavar="CKPT",
                   help="DDPM only: guide sampling with this weaker checkpoint of the same diffusion, e.g. "
                        "pretrained/ddpm_kanji_guide.pt for the pretrained DDPM (autoguidance; twice the network "
                        "calls)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"weight of the model against its --guide, 1 = unguided (default: {GUIDANCE})")
    p.add_argument("--guide-min-t", type=int, default=None, metavar="T",
                   help="guide only the steps at noise level t >= T (of the run's --timesteps, 0-999 by default): "
                        "500 guides the noisier half and saves half the guide's calls (a guidance interval, "
                        "Kynkäänniemi et al. 2024; default: 0, every step)")


def guide_text(guidance, min_t):
    """How a DDPM is guided, as records, `sample.py info` and the window say it: "guidance 2, t >= 500"."""
    return f"guidance {guidance:g}" + (f", t >= {min_t}" if min_t else "")


def recorded_guide(path):
    """(guide path, guidance, guide_min_t) named by a slim DDPM file's record (evaluate.py --record --guide), else
    (None, None, None)."""
    g = (data.load_checkpoint(path, mmap=True).get("record") or {}).get("guide")
    if not g:
        return None, None, None
    return os.path.join(os.path.dirname(os.path.abspath(path)), g["file"]), g["guidance"], g.get("min_t", 0)


def load_guide(path, guidance, mod, cfg, device="cpu", load=None, min_t=None):
    """--guide, --guidance and --guide-min-t for a loaded model (mod, cfg) -> generate()'s {"guide": network,
    "guidance": w, "guide_min_t": t}, or {} when there is no guide. load(kind, path) -> (module, network, config)
    loads the guide (default: load_any on device; the window passes its cache)."""
    if path is None:
        if guidance is not None or min_t is not None:
            raise data.GanjiError(f"--{'guidance' if guidance is not None else 'guide-min-t'} needs --guide CKPT, "
                                  f"the weaker model that guides")
        return {}
    if mod.KIND != "ddpm":
        raise data.GanjiError(f"--guide guides DDPM checkpoints only, not a {mod.KIND}")
    guidance = GUIDANCE if guidance is None else guidance
    if guidance < 1:
        raise data.GanjiError(f"--guidance must be at least 1 (1 = unguided), got {guidance}")
    min_t = 0 if min_t is None else min_t
    if not 0 <= min_t < cfg["timesteps"]:
        raise data.GanjiError(f"--guide-min-t must be in 0..{cfg['timesteps'] - 1}, got {min_t}")
    load = load or (lambda kind, p: load_any(kind, p, device))
    _, guide, guide_cfg = load("ddpm", path)
    mod.check_guide(cfg, guide_cfg)
    return {"guide": guide, "guidance": guidance, "guide_min_t": min_t}


# ----------------------------------------------------------------------------------------------------
# Slim files (pretrained/): the sampling weights in bf16, the config, and a record of how they were made

def export(src, dst):
    """Write a slim copy of a training checkpoint: no optimizer, no RNG, no discriminator, only the weights
    that sample (the EMA where there is one) in bf16, and a record of the run. Returns the record."""
    ckpt = data.load_checkpoint(src)
    if ckpt.get("slim"):
        raise data.GanjiError(f"{src} is already a slim file; export takes a training checkpoint (ckpt.pt)")
    mod = importlib.import_module(ckpt["kind"])
    weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
               for k, v in mod.sampling_weights(ckpt).items()}
    cfg = ckpt["config"]
    record = {"commands": cfg.get("commands", []), **data.trained_so_far(ckpt), "machine": ckpt["machine"],
              "date": datetime.date.fromtimestamp(os.path.getmtime(src)).isoformat(), "evaluate": None}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    data.atomic_save({"kind": ckpt["kind"], "version": data.FORMAT_VERSION, "config": cfg, "slim": True,
                      "sample_net": weights, "record": record}, dst)
    return record


def describe(path):
    """A few lines on how a checkpoint was made: its record (slim files) or its counters (training ones)."""
    ckpt = data.load_checkpoint(path, mmap=True)
    cfg = ckpt["config"]
    what = f"{ckpt['kind']} on {os.path.basename(str(cfg['dataset']).rstrip('/'))}, width {cfg['width']}, " \
           f"{cfg['image_size']} px"
    if not ckpt.get("slim"):
        return (f"{path}: training checkpoint, {what}; {ckpt['epoch']} epochs, {ckpt['step']} steps, "
                f"{ckpt['train_seconds'] / 60:.1f} min on {ckpt['machine']}")
    r = ckpt["record"]
    lines = [f"{path}: slim {what}",
             f"trained: {r['epochs']} epochs, {r['steps']} steps, {r['train_minutes']} min on {r['machine']}, "
             f"{r['date']}"]
    lines += [f"command: {c}" for c in r["commands"]]
    if r.get("guide"):
        g = r["guide"]
        lines.append(f"guide: {g['file']} ({guide_text(g['guidance'], g.get('min_t'))}), beside this file")
    e = r["evaluate"]
    lines.append("evaluate.py: not measured yet" if e is None else
                 f"evaluate.py (n {e['n']}{', ' + e['sampler'] if e['sampler'] else ''}): FID {e['fid']:.1f}, "
                 f"precision {e['precision']:.2f}, recall {e['recall']:.2f}, near copies {e['near_copy_rate']:.1%}, "
                 f"gray share {e['gray_share']:.3f} (reals {e['reference_gray_share']:.3f}), {e['date']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(
        description="Sample a grid of images from a GANji checkpoint. Also: `sample.py export SRC DST` writes a "
                    "slim sampling-only copy of a training checkpoint, `sample.py info FILE` prints its record.")
    p.add_argument("kind", nargs="?", default="ddpm", choices=("vae", "gan", "ddpm", "auto"),
                   help="model kind; auto reads it from the file (default: %(default)s)")
    p.add_argument("ckpt", nargs="?", default=os.path.join(PRETRAINED, "ddpm_kanji.pt"),
                   help="a ckpt.pt written by vae.py, gan.py or ddpm.py, or a slim file "
                        "(default: pretrained/ddpm_kanji.pt)")
    p.add_argument("--n", type=int, default=16, help="number of images (default: %(default)s)")
    p.add_argument("--nrow", type=int, default=4, help="images per grid row (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="grid PNG (default: sample_seed<SEED>.png, or morph_seed<SEED>.png, next to the checkpoint; "
                        "in the current folder for pretrained files)")
    p.add_argument("--seed", type=int, default=0, help="same checkpoint + seed = same images (default: %(default)s)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "dpm++2m", "ancestral"),
                   help="DDPM only (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="DDPM sampler steps (default: %(default)s)")
    p.add_argument("--eta", type=float, default=0.0, help="DDPM DDIM noise, 0 = deterministic (default: %(default)s)")
    p.add_argument("--prior", default=None, choices=("normal", "gmm"),
                   help="VAE latents: N(0, I) or its fitted mixture (default: the run's --prior)")
    add_guide_args(p)
    p.add_argument("--each", default=None, metavar="DIR", help="also write every image as DIR/NNNN.png")
    p.add_argument("--interpolate", action="store_true",
                   help="rows morph between random latents (VAE, GAN; DDPM via a deterministic sampler)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="(default: %(default)s)")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        p = argparse.ArgumentParser(prog="sample.py export", description="Write a slim copy of a training checkpoint.")
        p.add_argument("src", help="a training checkpoint (ckpt.pt)")
        p.add_argument("dst", help="the slim file to write, e.g. pretrained/ddpm_kanji.pt")
        args = p.parse_args(argv[1:])
        export(args.src, args.dst)
        print(f"wrote {args.dst} ({os.path.getsize(args.dst) / 1e6:.2f} MB)\n{describe(args.dst)}")
        return
    if argv[:1] == ["info"]:
        p = argparse.ArgumentParser(prog="sample.py info", description="Print how a checkpoint was made.")
        p.add_argument("ckpt", nargs="+")
        for path in p.parse_args(argv[1:]).ckpt:
            print(describe(path))
        return

    from torchvision.utils import save_image
    from tqdm import tqdm

    args = get_parser().parse_args(argv)
    if args.n < 1 or args.nrow < 1 or args.steps < 1 or args.eta < 0:
        raise data.GanjiError("--n, --nrow and --steps must be at least 1 and --eta at least 0")
    device = data.pick_device(args.device)
    mod, net, cfg = load_any(args.kind, args.ckpt, device)
    guided = load_guide(args.guide, args.guidance, mod, cfg, device, min_t=args.guide_min_t)
    bar = None

    def progress(i, total):
        nonlocal bar
        bar = bar or tqdm(total=total, desc=f"{mod.KIND} {args.sampler}", unit="step")
        bar.update(1)

    images = generate(mod, net, cfg, args.n, args.nrow, args.seed, device, args.interpolate, progress,
                      sampler=args.sampler, steps=args.steps, eta=args.eta, prior=args.prior, **guided)
    if bar:
        bar.close()
    name = f"{'morph' if args.interpolate else 'sample'}_seed{args.seed}.png"
    folder = os.path.dirname(os.path.abspath(args.ckpt))
    out = args.out or (name if folder == PRETRAINED else os.path.join(folder, name))
    data.save_grid(images, out, cfg["display_invert"], nrow=args.nrow)
    if args.each:
        os.makedirs(args.each, exist_ok=True)
        for i, img in enumerate(images):
            save_image(data.to_picture(img, cfg["display_invert"]), os.path.join(args.each, f"{i:04d}.png"))
    print(f"wrote {out}" + (f" and {len(images)} images in {args.each}" if args.each else ""))


if __name__ == "__main__":
    data.cli(main)
