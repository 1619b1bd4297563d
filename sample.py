"""Sample fake kanji from any GANji checkpoint, steer them from kanji you type, write them as a font, make slim
files for pretrained/ and read their records.

    python sample.py                                   # the pretrained DDPM, its recommended sampler: sample_seed0.png
    python sample.py ddpm runs/ddpm_kanji/ckpt.pt      # a 4x4 grid next to the checkpoint
    python sample.py auto pretrained/gan_kanji.pt --n 64 --nrow 8 --seed 3 --out grid.png
    python sample.py ddpm --like 海 --strength 0.5     # 16 variations of a kanji you type (or an image file)
    python sample.py ddpm --keep left --from 海        # 16 kanji completed around 海's left half
    python sample.py ddpm --interpolate --from 森 --to 林   # 森 turning into 林, 16 frames
    python sample.py gan pretrained/gan_kanji.pt --interpolate --n 40 --nrow 10   # 4 rows, each a 10-frame morph
    python sample.py font ddpm pretrained/ddpm_kanji.pt --n 256 --out fake_kanji.otf --name "Fake Kanji"
    python sample.py export runs/ddpm_kanji/ckpt.pt pretrained/ddpm_kanji.pt   # slim, sampling-only copy
    python sample.py info pretrained/ddpm_kanji.pt     # how a file was made, and its scores

Steering needs a model that can start from a glyph: the DDPM (variations, completions, morphs) or the VAE
(variations, morphs). The GAN has no encoder: it maps noise to glyphs and has no way back from a given glyph.
"""
import argparse
import datetime
import importlib
import os
import sys
import time

import torch

import data
import ddpm

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
MASKS = ("left", "right", "top", "bottom", "outside")


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
    sampler = pick(mod, sampler, ("sampler", "steps", "eta", "guide", "guidance", "guide_min_t"), ("prior",))
    if mod.KIND == "ddpm":
        sampler["progress"] = progress
    if interpolate:
        sampler.pop("eta", None)  # a morph is deterministic
        return mod.interpolate(net, cfg, max(1, n // nrow), nrow, seed=seed, device=device, **sampler)
    return mod.sample(net, cfg, n, seed=seed, device=device, **sampler)


def pick(mod, options, for_ddpm, for_vae=()):
    """The options (not None) that this model's functions take."""
    keep = {"ddpm": for_ddpm, "vae": for_vae, "gan": ()}[mod.KIND]
    return {k: v for k, v in options.items() if k in keep and v is not None}


# ----------------------------------------------------------------------------------------------------
# Steering: variations (--like), completions (--keep ... --from) and morphs (--interpolate --from ... --to)

def source_glyph(src, cfg, data_dir="data"):
    """A typed character (rendered as the model's training kanji) or an image file -> (1, C, S, S) in [0, 1]."""
    if len(src) == 1 and cfg.get("dataset") != "kanji":
        raise data.GanjiError(f"a typed character is rendered from the kanji font, but this model was trained on "
                              f"{cfg.get('dataset')}: give an image file instead")
    x = data.glyph(src, cfg["image_size"], cfg.get("font"), data_dir).float() / 255
    return x.expand(-1, cfg["channels"], -1, -1)


def keep_mask(name, size):
    """(1, 1, S, S), 1 where a completion keeps the source: a named half, the outer frame (`outside`: a band a
    fifth of the side wide, where the enclosures of 門, 囗 and 国 sit), or a PNG (white = keep)."""
    m = torch.zeros(1, 1, size, size)
    half, band = size // 2, round(size / 5)
    if name == "left":
        m[..., :half] = 1
    elif name == "right":
        m[..., half:] = 1
    elif name == "top":
        m[..., :half, :] = 1
    elif name == "bottom":
        m[..., half:, :] = 1
    elif name == "outside":
        m[:] = 1
        m[..., band:size - band, band:size - band] = 0
    else:
        from PIL import Image
        if not os.path.isfile(name):
            raise data.GanjiError(f"--keep takes {', '.join(MASKS)} or a PNG file, got {name!r}")
        try:
            with Image.open(name) as im:
                im = im.convert("L").resize((size, size), Image.Resampling.NEAREST)
                m = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(1, 1, size, size)
        except OSError:
            raise data.GanjiError(f"{name} is not a readable image")
        m = (m >= 128).float()
    return m


def check_steering(kind, like=None, keep=None, source=None, to=None, interpolate=False, strength=None,
                   resample=None, jump=None, sampler=None):
    """One line (GanjiError) for every combination of steering options that makes no sense."""
    steering = like is not None or keep is not None or source is not None
    if steering and kind == "gan":
        raise data.GanjiError("the GAN cannot start from a given glyph (it has no encoder): --like, --keep and "
                              "--from need a DDPM or a VAE")
    if like is not None and (keep is not None or source is not None or interpolate):
        raise data.GanjiError("--like draws variations: give it alone, not with --keep, --from or --interpolate")
    if keep is not None and kind != "ddpm":
        raise data.GanjiError(f"completion (--keep) needs a DDPM, not a {kind}")
    if keep is not None and (source is None or interpolate):
        raise data.GanjiError("--keep MASK completes a glyph: give it with --from CHAR_OR_IMAGE (and no "
                              "--interpolate)")
    if source is not None and keep is None and not interpolate:
        raise data.GanjiError("--from needs --keep MASK (a completion) or --interpolate --to (a morph)")
    if (to is not None) != (source is not None and interpolate):
        raise data.GanjiError("a morph of two glyphs takes --interpolate --from A --to B")
    if strength is not None and like is None:
        raise data.GanjiError("--strength sets how far --like's variations stray: give it with --like")
    if strength is not None and not 0 < strength <= 1:
        raise data.GanjiError(f"--strength must be in (0, 1], got {strength}")
    if (resample is not None or jump is not None) and keep is None:
        raise data.GanjiError("--resample and --jump set a completion's resampling: give them with --keep")
    if to is not None and kind == "ddpm" and sampler not in (None, "ddim"):
        raise data.GanjiError("a DDPM morph of two glyphs runs DDIM (its inversion): leave out --sampler")


def steer(mod, net, cfg, n=16, seed=0, device="cpu", like=None, keep=None, source=None, to=None, strength=None,
          resample=None, jump=None, data_dir="data", progress=None, **sampler):
    """[0, 1] images, ink bright, with the typed source glyph(s): n variations of `like`, n completions of
    `source` around the `keep` mask, or an n-frame morph from `source` to `to`. -> (images, sources (k, C, S, S))."""
    if like is not None:
        x0 = source_glyph(like, cfg, data_dir)
        if mod.KIND == "vae":
            return mod.variations(net, cfg, x0, n, strength or 0.5, seed, device), x0
        opts = pick(mod, sampler, ("sampler", "steps", "eta", "guide", "guidance", "guide_min_t"))
        return mod.edit(net, cfg, x0, strength or ddpm.STRENGTH, n, seed, device, progress=progress, **opts), x0
    x0 = source_glyph(source, cfg, data_dir)
    if keep is not None:
        opts = pick(mod, sampler, ("sampler", "steps", "eta", "guide", "guidance", "guide_min_t"))
        opts.update({k: v for k, v in (("resample", resample), ("jump", jump)) if v is not None})
        m = keep_mask(keep, cfg["image_size"])
        return mod.inpaint(net, cfg, x0, m, n, seed, device, progress=progress, **opts), x0
    x1 = source_glyph(to, cfg, data_dir)
    if mod.KIND == "vae":
        return mod.morph(net, cfg, x0, x1, n, device), torch.cat([x0, x1])
    opts = pick(mod, sampler, ("steps", "guide", "guidance", "guide_min_t"))
    return mod.morph(net, cfg, x0, x1, n, device, progress=progress, **opts), torch.cat([x0, x1])


# ----------------------------------------------------------------------------------------------------
# The sampler and guide a file recommends, and autoguidance

def add_guide_args(p):
    """sample.py's and evaluate.py's --guide, --guidance and --guide-min-t."""
    p.add_argument("--guide", default=None, metavar="CKPT",
                   help="DDPM: a weaker checkpoint that guides (autoguidance), or none (default: the record's)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"weight of the model against its guide, 1 = unguided (default: the record's, else "
                        f"{ddpm.GUIDANCE:g})")
    p.add_argument("--guide-min-t", type=int, default=None, metavar="T",
                   help="guide only the steps at noise level t >= T, a guidance interval (default: the record's, "
                        "else 0: every step)")


def guide_text(guidance, min_t):
    """How a DDPM is guided, as records, `sample.py info` and the window say it: "guidance 2, t >= 500"."""
    return f"guidance {guidance:g}" + (f", t >= {min_t}" if min_t else "")


def recommended(path):
    """How a DDPM file is best sampled, as its record says (evaluate.py --record writes it), else ddpm.py's
    defaults, unguided: {"sampler", "steps", "guide" (a path or None), "guidance", "guide_min_t"}."""
    record = data.load_checkpoint(path, mmap=True).get("record") or {}
    how, g = record.get("sampling") or {}, record.get("guide")
    return {"sampler": how.get("sampler", ddpm.SAMPLER), "steps": how.get("steps", ddpm.STEPS),
            "guide": os.path.join(os.path.dirname(os.path.abspath(path)), g["file"]) if g else None,
            "guidance": g["guidance"] if g else None, "guide_min_t": g.get("min_t", 0) if g else None}


def recorded_guide(path):
    """(guide path, guidance, guide_min_t) named by a slim DDPM file's record, else (None, None, None)."""
    r = recommended(path)
    return r["guide"], r["guidance"], r["guide_min_t"]


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
    guidance = ddpm.GUIDANCE if guidance is None else guidance
    if guidance < 1:
        raise data.GanjiError(f"--guidance must be at least 1 (1 = unguided), got {guidance}")
    min_t = 0 if min_t is None else min_t
    if not 0 <= min_t < cfg["timesteps"]:
        raise data.GanjiError(f"--guide-min-t must be in 0..{cfg['timesteps'] - 1}, got {min_t}")
    load = load or (lambda kind, p: load_any(kind, p, device))
    _, guide, guide_cfg = load("ddpm", path)
    mod.check_guide(cfg, guide_cfg)
    return {"guide": guide, "guidance": guidance, "guide_min_t": min_t}


def sampling(args, mod, cfg, device="cpu", load=None):
    """The DDPM sampler of a command line: flags given win, the rest is what the file recommends -> the keyword
    arguments of generate() and steer(), a few words on it ("dpm++2m 20 steps, guided by ...") and the guide's
    path (None unguided)."""
    if mod.KIND != "ddpm":
        if args.guide not in (None, "none"):
            raise data.GanjiError(f"--guide guides DDPM checkpoints only, not a {mod.KIND}")
        prior = getattr(args, "prior", None)
        return {"prior": prior}, f"{prior or cfg.get('prior', 'normal')} prior" if mod.KIND == "vae" else "", None
    rec = recommended(args.ckpt)
    given_guide = args.guide is not None
    guide = None if args.guide == "none" else args.guide if given_guide else rec["guide"]
    guidance = args.guidance if args.guidance is not None or given_guide else rec["guidance"]
    min_t = args.guide_min_t if args.guide_min_t is not None or given_guide else rec["guide_min_t"]
    guided = load_guide(guide, guidance, mod, cfg, device, load, min_t)
    kw = {"sampler": args.sampler or rec["sampler"], "steps": args.steps or rec["steps"],
          "eta": getattr(args, "eta", 0.0), **guided}
    by = f", guided by {os.path.basename(guide)} ({guide_text(guided['guidance'], guided['guide_min_t'])})" \
        if guided else ""
    return kw, f"{kw['sampler']} {kw['steps']} steps{by}", guide if guided else None


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


def describe(path, brief=False):
    """How a checkpoint was made: its record (slim files) or its counters (training ones). brief: what the window
    shows, the last command only."""
    ckpt = data.load_checkpoint(path, mmap=True)
    cfg = ckpt["config"]
    what = f"{ckpt['kind']} on {os.path.basename(str(cfg['dataset']).rstrip('/'))}, width {cfg['width']}, " \
           f"{cfg['image_size']} px"
    if not ckpt.get("slim"):
        return (f"{path}: training checkpoint, {what}; {ckpt['epoch']} epochs, {ckpt['step']} steps, "
                f"{ckpt['train_seconds'] / 60:.1f} min on {ckpt['machine']}")
    r = ckpt["record"]
    lines = [f"{os.path.basename(path) if brief else path}: slim {what}",
             f"trained: {r['epochs']} epochs, {r['steps']} steps, {r['train_minutes']} min on {r['machine']}, "
             f"{r['date']}"]
    commands = r["commands"][-1:] if brief else r["commands"]
    lines += [f"{'last command' if brief and len(r['commands']) > 1 else 'command'}: {c}" for c in commands]
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
# Command line

def get_parser(font=False):
    """The grid's parser; font=True: `sample.py font`'s, the same options plus the font's."""
    p = argparse.ArgumentParser(
        prog="sample.py font" if font else "sample.py",
        description="Write generated glyphs as an OpenType font (Private Use Area from U+E000)." if font else
        "Sample a grid from a GANji checkpoint, or steer it from a kanji you type. Also: `sample.py font ...` "
        "writes a font, `sample.py export SRC DST` a slim copy, `sample.py info FILE` a file's record.")
    p.add_argument("kind", nargs="?", default="ddpm", choices=("vae", "gan", "ddpm", "auto"),
                   help="model kind; auto reads it from the file (default: %(default)s)")
    p.add_argument("ckpt", nargs="?", default=os.path.join(PRETRAINED, "ddpm_kanji.pt"),
                   help="a ckpt.pt of vae.py, gan.py or ddpm.py, or a slim file (default: pretrained/ddpm_kanji.pt)")
    p.add_argument("--n", type=int, default=256 if font else 16,
                   help="number of images, or of morph frames (default: %(default)s)")
    if font:
        p.add_argument("--out", default="fake_kanji.otf",
                       help="the font; a specimen .png and a .txt list go beside it (default: %(default)s)")
        p.add_argument("--name", default="GANji Fake Kanji", help="the font's family name (default: %(default)s)")
    else:
        p.add_argument("--nrow", type=int, default=4, help="images per grid row (default: %(default)s)")
        p.add_argument("--out", default=None,
                       help="grid PNG (default: <what>_seed<SEED>.png beside the checkpoint; here for pretrained/)")
        p.add_argument("--each", default=None, metavar="DIR", help="also write every image as DIR/NNNN.png")
    p.add_argument("--seed", type=int, default=0, help="same checkpoint + seed = same images (default: %(default)s)")
    g = p.add_argument_group("DDPM sampling")
    g.add_argument("--sampler", default=None, choices=ddpm.SAMPLERS,
                   help=f"(default: the file's record, else {ddpm.SAMPLER})")
    g.add_argument("--steps", type=int, default=None, help=f"sampler steps (default: the record's, else {ddpm.STEPS})")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise, 0 = deterministic (default: %(default)s)")
    add_guide_args(g)
    p.add_argument("--prior", default=None, choices=("normal", "gmm"),
                   help="VAE latents: N(0, I) or its fitted mixture (default: the run's --prior)")
    p.add_argument("--interpolate", action="store_true",
                   help="morphs: rows between random latents, or with --from A --to B one morph of n frames")
    g = p.add_argument_group("steering (DDPM; VAE: --like and morphs), docs/steering.md")
    g.add_argument("--like", default=None, metavar="CHAR_OR_IMAGE",
                   help="variations of one typed kanji, or of a glyph in an image file")
    g.add_argument("--strength", type=float, default=None,
                   help=f"how far --like's variations stray, in (0, 1] (default: {ddpm.STRENGTH})")
    g.add_argument("--keep", default=None, metavar="MASK",
                   help=f"complete --from around this part of it: {' | '.join(MASKS)} | a PNG, white = keep")
    g.add_argument("--from", dest="source", default=None, metavar="CHAR_OR_IMAGE",
                   help="the glyph --keep completes, or where --interpolate's morph starts")
    g.add_argument("--to", default=None, metavar="CHAR_OR_IMAGE", help="where --interpolate's morph ends")
    g.add_argument("--resample", type=int, default=None,
                   help=f"--keep: RePaint resamplings, each about one more sample's cost (default: {ddpm.RESAMPLE})")
    g.add_argument("--jump", type=int, default=None,
                   help=f"--keep: sampler moves per resampling jump (default: {ddpm.JUMP})")
    p.add_argument("--data-dir", default="data", help="kanji render cache for typed kanji (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="(default: %(default)s)")
    return p


def parse_args(argv):
    """argv -> a Namespace whose `command` is grid, font, export or info (each subcommand's own parser)."""
    argv = list(argv)
    if argv[:1] == ["export"]:
        p = argparse.ArgumentParser(prog="sample.py export", description="Write a slim copy of a training checkpoint.")
        p.add_argument("src", help="a training checkpoint (ckpt.pt)")
        p.add_argument("dst", help="the slim file to write, e.g. pretrained/ddpm_kanji.pt")
    elif argv[:1] == ["info"]:
        p = argparse.ArgumentParser(prog="sample.py info", description="Print how a checkpoint was made.")
        p.add_argument("ckpt", nargs="+")
    else:
        p = get_parser(font=argv[:1] == ["font"])
    command = argv[0] if argv[:1] in (["export"], ["info"], ["font"]) else "grid"
    args = p.parse_args(argv[1:] if command != "grid" else argv)
    args.command = command
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "export":
        export(args.src, args.dst)
        print(f"wrote {args.dst} ({os.path.getsize(args.dst) / 1e6:.2f} MB)\n{describe(args.dst)}")
        return
    if args.command == "info":
        for path in args.ckpt:
            print(describe(path))
        return

    from tqdm import tqdm

    nrow = getattr(args, "nrow", 4)
    if args.n < 1 or nrow < 1 or (args.steps is not None and args.steps < 1) or args.eta < 0:
        raise data.GanjiError("--n, --nrow and --steps must be at least 1 and --eta at least 0")
    head = data.load_checkpoint(args.ckpt, args.kind, mmap=True)
    kind = head["kind"]
    check_steering(kind, args.like, args.keep, args.source, args.to, args.interpolate, args.strength,
                   args.resample, args.jump, args.sampler)
    if args.command == "font":
        import font
        font.check_output(args.out, args.n, head["config"])  # before minutes of sampling
    device = data.pick_device(args.device)
    mod, net, cfg = load_any(kind, args.ckpt, device)
    opts, how, _ = sampling(args, mod, cfg, device)
    bar = None

    def progress(i, total):
        nonlocal bar
        bar = bar or tqdm(total=total, desc=f"{mod.KIND} {how}", unit="step")
        bar.update(i - bar.n)

    start = time.perf_counter()
    if args.like is not None or args.source is not None:
        what = "variations" if args.like is not None else "completions" if args.keep is not None else "morph"
        images, _ = steer(mod, net, cfg, args.n, args.seed, device, args.like, args.keep, args.source, args.to,
                          args.strength, args.resample, args.jump, args.data_dir, progress, **opts)
    else:
        what = "morph" if args.interpolate else "sample"
        images = generate(mod, net, cfg, args.n, nrow, args.seed, device, args.interpolate, progress, **opts)
    if bar:
        bar.close()
    drawn = f"{len(images)} images drawn in {time.perf_counter() - start:.1f} s"
    if args.command == "font":
        import font
        report = font.write_font(images, cfg, args.out, args.name, os.path.basename(args.ckpt))
        print(f"{drawn}; wrote {args.out}: {font.summary(report)}")
        return
    name = f"{what}_seed{args.seed}.png"
    folder = os.path.dirname(os.path.abspath(args.ckpt))
    out = args.out or (name if folder == PRETRAINED else os.path.join(folder, name))
    data.save_grid(images, out, cfg["display_invert"], nrow=nrow)
    if args.each:
        from torchvision.utils import save_image
        os.makedirs(args.each, exist_ok=True)
        for i, img in enumerate(images):
            save_image(data.to_picture(img, cfg["display_invert"]), os.path.join(args.each, f"{i:04d}.png"))
    print(f"{drawn}; wrote {out}" + (f" and each image in {args.each}" if args.each else ""))


if __name__ == "__main__":
    data.cli(main)
