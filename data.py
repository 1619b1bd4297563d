"""Data for GANji and the run pieces its three training scripts share, in two halves.

Part 1, the data: built-in kanji rendered from a CJK font, image folders, MNIST and CIFAR-10. Every dataset
becomes one uint8 tensor (N, C, H, W) with ink bright on a dark background, kept on the training device and
batched by `Batches` (seeded shuffle, cast and normalize on the device).
Part 2, the run pieces: the common flags and their defaults, the resume rule, device and precision, many
processes, checkpoint files, Ctrl-C, latent walks, metrics and grids. Each script tells its own training story;
nothing in part 2 calls back into a script.
"""
import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

KANJI_RANGE = (0x4E00, 0x9FFF)  # CJK Unified Ideographs
FORMAT_VERSION = 2  # checkpoint format; bump when an older file can no longer be read
KINDS = ("vae", "gan", "ddpm")


class GanjiError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Fonts: which code points a font really has (its cmap), and rendering them in a fixed em box

def default_font():
    try:
        import pylopdf_fonts_jp
    except ImportError:
        raise GanjiError("the default kanji font needs the package pylopdf-fonts-jp "
                         "(pip install -r requirements.txt), or pass --font PATH")
    return str(pylopdf_fonts_jp.serif_path())


def font_codepoints(path, lo=KANJI_RANGE[0], hi=KANJI_RANGE[1]):
    """Sorted code points in [lo, hi] that the font's cmap maps to a real glyph (TTF, OTF or TTC).

    PIL draws a tofu box for a missing glyph instead of failing, so the cmap is the only honest source.
    fontTools reads the cmap (of a collection's first font); getBestCmap picks the best Unicode subtable.
    """
    from fontTools.ttLib import TTFont, TTLibError

    try:
        with TTFont(path, fontNumber=0, lazy=True) as font:
            cmap = font.getBestCmap()
    except (TTLibError, OSError, KeyError, AssertionError) as e:
        raise GanjiError(f"{path}: not a readable TrueType/OpenType font ({type(e).__name__})")
    if not cmap:
        raise GanjiError(f"{path}: font has no Unicode cmap table")
    return sorted(c for c, glyph in cmap.items() if lo <= c <= hi and glyph != ".notdef")


def em_box(font_path, codepoints, image_size, progress=True):
    """The one scale and offset every glyph is rendered at: (font size in px, origin x, origin y).

    The em box is the union of all glyphs' ink boxes at a reference size, scaled to fit the image
    with a margin of S/16 pixels: a thin 一 stays thin and in place instead of being stretched.
    The origin is the pen position on the baseline (Pillow's anchor "ls"); font.py maps traced
    outlines back to font units through the same three numbers.
    """
    from PIL import Image, ImageDraw, ImageFont
    from tqdm import tqdm

    ref, canvas = 128, 256  # reference em size and a canvas large enough for any glyph at that size
    font = ImageFont.truetype(font_path, ref)
    boxes = []
    for c in tqdm(codepoints, desc="measuring glyphs", disable=not progress, leave=False):
        im = Image.new("L", (canvas, canvas))
        ImageDraw.Draw(im).text((canvas // 4, canvas * 3 // 4), chr(c), fill=255, font=font, anchor="ls")
        if im.getbbox():
            boxes.append(im.getbbox())
    if not boxes:
        raise GanjiError(f"{font_path}: no kanji glyph renders with ink")
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    margin = max(1, round(image_size / 16))
    scale = (image_size - 2 * margin) / max(x1 - x0, y1 - y0)
    # the origin maps the union box's centre to the image centre
    ox = image_size / 2 + (canvas // 4 - (x0 + x1) / 2) * scale
    oy = image_size / 2 + (canvas * 3 // 4 - (y0 + y1) / 2) * scale
    return ref * scale, ox, oy


def render_glyphs(font_path, codepoints, image_size, progress=True):
    """Render code points as (N, 1, S, S) uint8, ink = 255, every glyph at one scale and offset (em_box)."""
    from PIL import Image, ImageDraw, ImageFont
    from tqdm import tqdm

    size, ox, oy = em_box(font_path, codepoints, image_size, progress)
    font = ImageFont.truetype(font_path, size)
    out = torch.empty(len(codepoints), 1, image_size, image_size, dtype=torch.uint8)
    for i, c in enumerate(tqdm(codepoints, desc="rendering kanji", disable=not progress, leave=False)):
        im = Image.new("L", (image_size, image_size))
        ImageDraw.Draw(im).text((ox, oy), chr(c), fill=255, font=font, anchor="ls")
        out[i, 0] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(image_size, image_size)
    return out


def load_kanji(font=None, image_size=64, cache_dir="data", progress=True):
    """All kanji of a font as (images uint8 (N,1,S,S), code points (N,)), cached on disk.

    Blank renders and renders identical to an earlier one are dropped. The cache key is the font
    file's hash, the size and the code range, so a different font or size never reads a stale file.
    """
    font = font or default_font()
    if not os.path.isfile(font):
        raise GanjiError(f"font file not found: {font}")
    with open(font, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    name = f"kanji-{digest}-{image_size}px-{KANJI_RANGE[0]:04x}-{KANJI_RANGE[1]:04x}.pt"
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
        try:
            cached = torch.load(path, weights_only=True)
            return cached["images"], cached["codepoints"]
        except Exception:
            pass  # a damaged cache file is rebuilt below
    cps = font_codepoints(font)
    images = render_glyphs(font, cps, image_size, progress)
    keep, seen = [], set()
    for i in range(len(cps)):
        if images[i].amax() < 64:
            continue  # blank (or nearly): no stroke reaches a quarter of full ink
        h = hashlib.md5(images[i].numpy().tobytes()).digest()
        if h not in seen:
            seen.add(h)
            keep.append(i)
    keep = torch.tensor(keep, dtype=torch.long)
    images, cps = images[keep].contiguous(), torch.tensor(cps, dtype=torch.int32)[keep]
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save({"images": images, "codepoints": cps}, path)
    return images, cps


def glyph(source, image_size=64, font=None, data_dir="data"):
    """The glyph to steer from, (1, 1, S, S) uint8, ink bright: one typed character, rendered exactly as the
    training kanji are (same font, em box, size and polarity), or an image file, resized like a folder dataset,
    made ink-bright if it is mostly bright (black ink on paper) and binarised at half ink."""
    if len(source) == 1:
        images, cps = load_kanji(font, image_size, data_dir, progress=False)
        hit = (cps == ord(source)).nonzero()
        if len(hit):
            return images[hit[0, 0]][None].clone()
        font = font or default_font()  # not among the kanji (kana, 々, a render equal to another's): draw it alike
        if ord(source) not in font_codepoints(font, 0, 0x10FFFF):
            raise GanjiError(f"the font {os.path.basename(font)} has no glyph for {source!r} (U+{ord(source):04X})")
        from PIL import Image, ImageDraw, ImageFont
        size, ox, oy = em_box(font, font_codepoints(font), image_size, progress=False)
        im = Image.new("L", (image_size, image_size))
        ImageDraw.Draw(im).text((ox, oy), source, fill=255, font=ImageFont.truetype(font, size), anchor="ls")
        return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(1, 1, image_size, image_size)
    if not os.path.isfile(source):
        raise GanjiError(f"{source!r} is neither one character nor an image file")
    from PIL import Image
    try:
        with Image.open(source) as im:
            im = im.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(1, 1, image_size, image_size)
    except OSError:
        raise GanjiError(f"{source} is not a readable image")
    x = 255 - x if x.float().mean() > 127.5 else x
    return torch.where(x >= 128, 255, 0).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------
# Other sources: a folder of images, MNIST, CIFAR-10


def load_folder(folder, image_size, channels, invert=False):
    """Every image file under `folder` (recursively) as (N, C, S, S) uint8; unreadable files are skipped."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise GanjiError(f"dataset folder not found: {folder}")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if not f.startswith("."))
    images, bad = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                images.append(t.view(image_size, image_size, channels).permute(2, 0, 1))
        except Exception:
            bad.append(os.path.basename(path))
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        print(f"warning: skipped {len(bad)} unreadable file(s) in {folder}: {shown}", file=sys.stderr)
    if not images:
        raise GanjiError(f"no readable images in {folder}")
    x = torch.stack(images)
    return 255 - x if invert else x


def load_torchvision(name, data_dir, download=True):
    """MNIST or CIFAR-10 training split through torchvision, as (N, C, H, W) uint8."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    where = os.path.join(data_dir, "MNIST/raw" if name == "mnist" else "cifar-10-batches-py")
    try:
        ds = cls(data_dir, train=True, download=False)
    except RuntimeError:
        if not download:
            raise GanjiError(f"{name} files not found in {where}")
        try:
            ds = cls(data_dir, train=True, download=True)
        except Exception as e:
            raise GanjiError(f"could not download {name} ({type(e).__name__}); "
                             f"put the original files in {where} and run again")
    x = torch.as_tensor(ds.data)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def resize(images, image_size):
    """uint8 (N, C, H, W) -> (N, C, S, S), antialiased; done once at load time, never per batch."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    out = []
    for chunk in images.split(4096):
        y = F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def set_channels(images, channels):
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma
    return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


@dataclass
class Dataset:
    images: torch.Tensor    # (N, C, S, S) uint8, ink/foreground bright
    name: str
    display_invert: bool    # True: show as black ink on white paper (kanji and glyph folders)
    labels: torch.Tensor = None  # kanji: Unicode code points (N,)


NATIVE = {"kanji": (64, 1), "mnist": (32, 1), "cifar10": (32, 3)}  # default (image size, channels)


def load_dataset(name="kanji", image_size=None, channels=None, limit=None, data_dir="data",
                 font=None, invert=False, progress=True, download=True):
    """One call for every source; None for image_size/channels means the dataset's native default."""
    size0, ch0 = NATIVE.get(name, (64, 1))
    image_size, channels = image_size or size0, channels or ch0
    if image_size < 8 or channels not in (1, 3):
        raise GanjiError(f"unsupported image size {image_size} or channel count {channels}")
    labels = None
    if name == "kanji":
        images, labels = load_kanji(font, image_size, data_dir, progress)
    elif name in ("mnist", "cifar10"):
        images = resize(load_torchvision(name, data_dir, download), image_size)
    else:
        images = load_folder(name, image_size, channels, invert)
    if invert and name in NATIVE:
        images = 255 - images
    images = set_channels(images, channels)
    if limit is not None:
        if limit < 1:
            raise GanjiError(f"--limit must be at least 1, got {limit}")
        images = images[:limit]
        labels = labels[:limit] if labels is not None else None
    glyphs = name == "kanji" or (name not in NATIVE and channels == 1)
    return Dataset(images.contiguous(), name, glyphs, labels)


# ----------------------------------------------------------------------------------------------------
# Normalization and batching

def normalize(x, norm):
    """uint8 [0, 255] -> float in [0, 1] ("01", VAE) or [-1, 1] ("11", GAN and DDPM)."""
    x = x.float() / 255
    return x if norm == "01" else x * 2 - 1


def denormalize(x, norm):
    """Model space back to [0, 1] for pictures and metrics."""
    x = x.float()
    return (x if norm == "01" else (x + 1) / 2).clamp(0, 1)


class Batches:
    """Seeded shuffled minibatches of a uint8 image tensor, cast and normalized on the device.

    The order of epoch e depends only on (seed, e), so a resumed run sees the same batches;
    `start` skips batches already done in an interrupted epoch. The last batch may be smaller.
    Under torchrun (world > 1) every rank draws the same order and yields its equal share of each global batch of
    batch_size images, so N processes see the batches one process sees; the n mod world images (fewer than world,
    other ones every epoch) that would not split evenly sit the epoch out.
    """

    def __init__(self, images, batch_size, device, norm, seed=0, hflip=False, channels_last=False, rank=0, world=1):
        device = torch.device(device)
        fits = device.type == "cpu" or images.numel() < 0.25 * _free_memory(device)
        self.x = images.to(device) if fits else images.pin_memory()
        self.n, self.batch_size, self.device = len(images), batch_size, device
        self.norm, self.seed, self.hflip, self.channels_last = norm, seed, hflip, channels_last
        self.rank, self.world, self.used = rank, world, len(images) - len(images) % world  # used: a multiple of world

    def __len__(self):
        return steps_per_epoch(self.n, self.batch_size, self.world)

    def epoch(self, epoch, start=0):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        flips = torch.rand(self.n, generator=g) < 0.5
        for i in range(start * self.batch_size, self.used, self.batch_size):
            idx = perm[i:min(i + self.batch_size, self.used)].tensor_split(self.world)[self.rank]  # this rank's share
            x = self.x[idx.to(self.x.device)].to(self.device, non_blocking=True)
            x = normalize(x, self.norm)
            if self.hflip:
                f = flips[idx].to(self.device).view(-1, 1, 1, 1)
                x = torch.where(f, x.flip(-1), x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x


def steps_per_epoch(n, batch_size, world=None):
    """The global batches in an epoch of n images, len(Batches): under torchrun (world processes; by default this
    job's) without the n mod world images that sit the epoch out."""
    world = world or world_size()
    return math.ceil((n - n % world) / batch_size)


def _free_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return float("inf")


# ====================================================================================================
# Part 2: the run pieces the three scripts share: their common flags and defaults, the resume rule, device and
# precision, many processes, checkpoint files, Ctrl-C, latent walks, metrics and grids. None of them calls back
# into a script.
# ====================================================================================================

# the run settings: on --resume these may differ from the checkpoint's config (given on the command line, they
# win); everything else (data, architecture, optimizer, seed) is what the run is made of and stays
RUN_KEYS = ("epochs", "device", "precision", "compile", "channels_last", "out", "resume", "sample_every",
            "log_every", "eval_every", "keep_every", "dry_run", "data_dir")


def at_least(low):
    """An argparse type: an int >= low, else argparse's one-line error (exit 2)."""
    def parse(text):
        n = int(text)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n
    parse.__name__ = "int"  # what argparse names in "invalid int value: 'x'"
    return parse


# A flag whose best value depends on the model's size defaults to a pair: (at --width <= WIDE, above it)
WIDE = 0.5
RECIPE_RULE = ("Defaults are the CPU recipe at the default --width 0.25, the width of every shipped model. Flags "
               f"whose best value depends on the model's size default by width: at width <= {WIDE:g} the recipe "
               "measured on a 2-core CPU, above it the reference-architecture settings.")


def by_width(args, **pairs):
    """Set each flag of pairs still None (given neither on the command line nor by a checkpoint: a fresh run's) to
    its value at this --width, pairs[flag] = (at --width <= WIDE, above it). -> args."""
    for k, (small, large) in pairs.items():
        if getattr(args, k) is None:
            setattr(args, k, small if args.width <= WIDE else large)
    return args


def show(x):
    """A default as -h writes it: 64, 1e-3, 2e-4."""
    if isinstance(x, int):
        return str(x)
    mantissa, exponent = f"{x:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def default_text(value, doc=None):
    """'(default: ...)' of a value or of a by-width pair, with the page where it was measured."""
    text = (f"{show(value[0])} at --width <= {WIDE:g}, else {show(value[1])}" if isinstance(value, tuple)
            else show(value))
    return f"(default: {text}{'; ' + doc if doc else ''})"


def add_common_args(parser, *, epochs, batch_size, lr, doc=None, channels_last=True, run_keys=()):
    """The flags every training script has, with the same names and meanings. batch_size and lr: a value, or a
    pair by width (see WIDE; None until by_width sets it); doc: the page their values were measured on. run_keys:
    the script's own run settings, beside RUN_KEYS (open_run reads them from parser.run_keys)."""
    parser.run_keys = RUN_KEYS + tuple(run_keys)
    parser.description = f"{parser.description} {RECIPE_RULE}" if parser.description else RECIPE_RULE
    parser.epilog = ("--resume continues the run in --out. Flags given with it that are run settings win: "
                     + ", ".join("--" + k.replace("_", "-") for k in parser.run_keys if k not in ("out", "resume"))
                     + ". Every other setting comes from the checkpoint; giving one with another value is an error.")
    single = lambda value: None if isinstance(value, tuple) else value  # a pair: set later, by width
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="kanji",
                   help="kanji (rendered from a font) | mnist | cifar10 | a folder of images (default: %(default)s)")
    g.add_argument("--data-dir", default="data", help="downloads and the kanji render cache (default: %(default)s)")
    g.add_argument("--font", default=None,
                   help="TTF/OTF/TTC for --dataset kanji (default: Noto Serif JP, from pylopdf-fonts-jp)")
    g.add_argument("--image-size", type=int, default=None,
                   help="side in pixels (default: 64 for kanji and folders, 32 for mnist and cifar10)")
    g.add_argument("--channels", type=int, default=None, choices=(1, 3),
                   help="image channels (default: 3 for cifar10, else 1)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N images (default: all)")
    g.add_argument("--invert", action="store_true", help="invert a dark-ink-on-white source (default: off)")
    g.add_argument("--hflip", action="store_true",
                   help="random horizontal flips (default: off; a mirrored kanji is not a kanji)")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=at_least(1), default=epochs, help="total epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=at_least(1), default=single(batch_size),
                   help="the global batch, split over torchrun's processes " + default_text(batch_size, doc))
    g.add_argument("--lr", type=float, default=single(lr), help="learning rate " + default_text(lr, doc))
    g.add_argument("--seed", type=int, default=0, help="of the weights, batches and grids (default: %(default)s)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto picks cuda, then mps, then cpu (default: %(default)s)")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="bf16 autocast or fp32; auto: the faster here, timed once (default: %(default)s)")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks (default: off)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=channels_last,
                   help=f"NHWC memory layout (default: {'on' if channels_last else 'off'}, the faster on a CPU; "
                        "bench.py)")
    g.add_argument("--width", type=float, default=0.25,
                   help="channel multiplier; 1.0 is the reference architecture (default: 0.25, the shipped models')")
    g.add_argument("--out", default=None, help="run folder (default: runs/<model>_<dataset>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt (see below)")
    g.add_argument("--init-from", default=None, metavar="CKPT",
                   help="fine-tune: a new run from a checkpoint's sampling weights and settings, fresh optimizer "
                        "(default: off)")
    g.add_argument("--sample-every", type=at_least(1), default=1,
                   help="save a sample grid every N epochs (default: %(default)s)")
    g.add_argument("--log-every", type=at_least(1), default=50,
                   help="write a metrics.jsonl row every N steps (default: %(default)s)")
    g.add_argument("--eval-every", type=at_least(0), default=0,
                   help="every N epochs, FID and KID of glyph samples (evaluate.py) into metrics.jsonl; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--keep-every", type=at_least(0), default=0,
                   help="every N epochs, also keep ckpt.pt as ckpt_epochNNN.pt, e.g. for --guide; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--dry-run", action="store_true", help="two steps of one epoch end to end, for tests")
    return parser


def given_flags(parser, argv):
    """The dests set on the command line, to tell `--epochs 100` from the default 100."""
    unset = object()
    blank = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {k for k, v in vars(parser.parse_args(argv, blank)).items() if v is not unset}


def open_run(parser, argv, kind):
    """Parse argv -> (args, checkpoint dict or None) for a training script's main().

    A fresh run never overwrites a ckpt.pt. With --resume, every flag not given on the command line takes the
    checkpoint's value; a given one may differ from it only if it is a run setting (parser.run_keys). With
    --init-from, a fresh run takes every setting not given, run settings aside, from that checkpoint's config."""
    args = parser.parse_args(argv)
    cli_argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", f"{kind}.py", *cli_argv])
    args.out = args.out or os.path.join("runs", f"{kind}_{os.path.basename(os.path.normpath(args.dataset))}")
    path = os.path.join(args.out, "ckpt.pt")
    if not args.resume:
        if os.path.exists(path):
            raise GanjiError(f"{path} exists: pass --resume to continue it, or choose another --out")
        args.commands, args.trained_before = [command], None  # every command that trained the weights
        args.machine_before = None  # and the machines they ran on, see machines()
        if args.init_from:
            src = load_checkpoint(args.init_from, kind, mmap=True)  # config and counters; the script loads weights
            take_settings(args, src["config"], given_flags(parser, cli_argv), keep=(*parser.run_keys, "init_from"))
            args.commands, args.trained_before = src["config"]["commands"] + [command], trained_so_far(src)
            args.machine_before = src["record"]["machine"] if src.get("slim") else src["machine"]
        return args, None
    if args.init_from:
        raise GanjiError("--init-from starts a new run and --resume continues one: give only one of them")
    if not os.path.isfile(path):
        raise GanjiError(f"--resume: no ckpt.pt in {args.out}")
    ckpt = load_checkpoint(path, kind)
    if ckpt.get("slim"):
        raise GanjiError(f"{path} is a slim sampling-only checkpoint (no optimizer, no RNG): it cannot be resumed")
    saved, given = ckpt["config"], given_flags(parser, cli_argv)
    clash = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved[k]})"
             for k in sorted(given) if k not in parser.run_keys and k in saved and getattr(args, k) != saved[k]]
    if clash:
        raise GanjiError("--resume continues the same run; these flags differ from it: " + ", ".join(clash))
    take_settings(args, saved, given, keep=("out", "resume"))
    args.commands, args.trained_before = saved["commands"] + [command], saved.get("trained_before")
    args.machine_before = ckpt["machine"]
    return args, ckpt


def take_settings(args, saved, given, keep):
    """Every setting of args not given on the command line and not in keep takes its value in the saved config."""
    for k in vars(args):
        if k in saved and k not in given and k not in keep:
            setattr(args, k, saved[k])


def data_from_args(args, progress=True):
    """The dataset of a script's flags; a training run's --eval-every is checked against it here, before any run
    folder exists."""
    ds = load_dataset(args.dataset, args.image_size, args.channels, args.limit, args.data_dir, args.font, args.invert,
                      progress)
    if getattr(args, "eval_every", 0) and not ds.display_invert:
        raise GanjiError("--eval-every scores glyphs only: evaluate.py's feature network knows kanji")
    return ds


def pick_device(name="auto"):
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise GanjiError(f"--device {name} asked for, but it is not available on this machine")
    if name == "cpu":
        keep_freed_memory()
    return torch.device(name)


def keep_freed_memory():
    """Tell glibc's malloc to keep freed blocks for reuse instead of handing them back to the OS.

    By default glibc mmaps large blocks (over 128 KiB, a threshold that adapts up to 32 MiB; a batch of
    activations is larger) and munmaps them on free, so each training step page-faults all its activations in
    again: on a 2-core CPU that was half the step (measured, docs/bench.md). The cost: the process keeps its peak
    memory until it exits. Returns whether it applied (glibc only; a no-op on
    macOS, Windows and musl)."""
    import ctypes
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's soname; musl and others raise OSError
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 2 ** 31 - 1) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def use_bf16(device, precision):
    """Whether --precision means bf16 autocast on this device. A training run settles auto before its first step
    (resolve_precision); auto left as it is, as in a run recorded before that, means bf16 on a CUDA GPU that has
    it and fp32 on a CPU."""
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16" and device.type in ("cpu", "cuda")


SMALL_STEP = 0.05  # seconds: an fp32 step shorter than this stays fp32, too short to time bf16 against reliably


def precision_cache():
    """The file where resolve_precision keeps its timings: $XDG_CACHE_HOME/ganji/precision.json."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ganji", "precision.json")


def resolve_precision(cfg, device, images, norm, Trainer):
    """cfg["precision"] of a fresh training run -> "bf16" or "fp32", which the run records and keeps on --resume.

    auto: bf16 on a CUDA GPU that has it. On a CPU with native bf16 whichever trains faster here: that depends on
    the CPU and the width, not on a rule one can write down (docs/bench.md), so both are timed once per machine,
    torch version and configuration, on a throwaway Trainer(cfg in that precision, uncompiled, device) of the
    script and a batch of images, and the timings are kept in precision_cache(). fp32 on every other device,
    under torchrun on a CPU (the ranks must agree), and where an fp32 step is under SMALL_STEP."""
    if cfg["precision"] != "auto":
        return cfg["precision"]
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu" or not native_bf16() or world_size() > 1:
        return "fp32"
    path = precision_cache()
    key = (f"{machine(device)}; torch {torch.__version__}; {cfg['kind']} width {cfg['width']:g} batch "
           f"{cfg['batch_size']} {cfg['channels']}x{cfg['image_size']}x{cfg['image_size']} channels_last "
           f"{cfg['channels_last']}")
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        x = normalize(images[:cfg["batch_size"]], norm).to(device)
        x = x.contiguous(memory_format=torch.channels_last) if cfg["channels_last"] else x
        make = lambda p: Trainer({**cfg, "precision": p, "compile": False}, device)
        times = {"fp32": step_seconds(lambda: make("fp32"), x)}
        if times["fp32"] >= SMALL_STEP:
            times["bf16"] = step_seconds(lambda: make("bf16"), x)
        cache[key] = times
        try:  # a cache that cannot be written only means timing again next time
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"  # as in atomic_save
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            path = None
    times = cache[key]
    choice = min(times, key=times.get)
    print(f"--precision auto: {choice} (seconds a step: "
          + ", ".join(f"{p} {t:.3f}" for p, t in sorted(times.items()))
          + (f"; timed once, kept in {path})" if path else f"; {precision_cache()} cannot be written)"))
    return choice


def step_seconds(make_trainer, x, warmup=2, repeats=3):
    """Median seconds of a training step on batch x, of a throwaway trainer built by make_trainer(); the random
    state is left as it was, so the run draws what it would have drawn without the timing."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        trainer, times = make_trainer(), []
        for _ in range(warmup + repeats):
            t0 = time.perf_counter()
            trainer.step(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - t0)
    return sorted(times[warmup:])[repeats // 2]


def autocast(device, precision="auto"):
    """bf16 autocast where use_bf16 says so; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device, precision))


def native_bf16():
    """Whether this CPU runs bf16 at speed: oneDNN's check (AVX-512 and up); elsewhere bf16 is emulated, slowly."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def sampling_precision(device):
    """The precision a DDPM samples in: bf16 on a CUDA GPU that has it and on a CPU where it is native, where it
    drew as well as fp32 at twice the speed (docs/bench.md); fp32 elsewhere."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"


# ----------------------------------------------------------------------------------------------------
# Many processes (torchrun, DistributedDataParallel). Each rank trains on its equal share of every global batch;
# every helper here is a no-op in a plain process, which therefore computes exactly what it did before them.

def distributed(args):
    """Join the torchrun job this process belongs to, if any -> (rank, world size, device).

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them: (0, 1, pick_device(args.device)) and nothing else.
    Under torchrun every process trains on its own device, the GPU cuda:LOCAL_RANK with NCCL, or the CPU with gloo.
    --batch-size stays the global batch; it must split evenly, which is checked before joining (like a bad flag,
    on every rank alike, so all of them stop with the same line instead of waiting for each other)."""
    device = pick_device(args.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if args.batch_size % world:
        raise GanjiError(f"--batch-size {args.batch_size} is the global batch: it must be a multiple of the {world} "
                         "processes")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise GanjiError(f"torchrun trains on cuda (NCCL) or cpu (gloo), not {device.type}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def world_size():
    """How many processes train together: 1 without torchrun."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shard(x, dim=0):
    """This rank's equal share of x along dim, where x is a random draw made for the whole global batch.

    Every rank draws the global batch's numbers with the same RNG state and keeps its own rows: N processes then
    draw exactly what one process draws for the same batch, and their RNG states stay equal. x itself without
    torchrun (a draw for n * world_size() == n rows: the very numbers a plain process always drew)."""
    world = world_size()
    return x if world == 1 else x.tensor_split(world, dim)[dist.get_rank()]


def ddp(module, device):
    """module wrapped in DistributedDataParallel under torchrun: its backward averages the gradients over the ranks,
    which, with equal shares, gives the gradient of the global batch's mean loss. module itself without torchrun."""
    if world_size() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def mean_over_ranks(x):
    """The mean of tensor x over the ranks, the same on every rank; x itself without torchrun. For a step's
    losses (batch means over equal shares) it is the global batch's mean, and a non-finite loss on any rank makes it
    non-finite on all of them, so all ranks stop at the same step."""
    world = world_size()
    if world == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)  # sum
    return x / world


def average_gradients(params):
    """Average the .grad of params over the ranks in one all_reduce (a no-op without torchrun). For a network that
    DistributedDataParallel cannot wrap: the GAN's D, whose penalty takes a double backward."""
    world = world_size()
    if world == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view(g.shape) / world)


def exit_all(status):
    """sys.exit(status) on every rank together. Without torchrun exactly sys.exit(status). Under torchrun a message
    (a str status) is printed by rank 0 alone, and every rank waits until all are here (rank 0 has printed and
    saved) before leaving, with exit status 1 for a message: torchrun ends the others as soon as one fails."""
    if world_size() == 1:
        sys.exit(status)
    if isinstance(status, str):
        if dist.get_rank() == 0:
            print(status, file=sys.stderr)
        status = 1
    dist.barrier()
    sys.exit(status)


def machine(device):
    """'AMD EPYC, 2 CPU cores' or the GPU's name, after '8 x ' under torchrun: where a run trained, for its record."""
    world = f"{world_size()} x " if world_size() > 1 else ""
    if device.type == "cuda":
        return world + torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        name = platform.processor() or platform.machine()
    return f"{world}{name}, {os.cpu_count()} CPU cores" + (" (mps)" if device.type == "mps" else "")


def machines(*names):
    """The distinct machines in names ('A' or 'A; B' strings, or None), in order, joined by '; '. A checkpoint's
    machine is machines(config's machine_before, this one): every machine that trained its weights, through
    --resume and --init-from."""
    seen = []
    for m in "; ".join(n for n in names if n).split("; "):
        if m and m not in seen:
            seen.append(m)
    return "; ".join(seen)


def atomic_save(obj, path):
    """torch.save to a temporary file, then os.replace: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def keep_copy(ckpt_path, epoch, every):
    """After epoch `epoch` is saved: copy ckpt.pt to ckpt_epochNNN.pt when --keep-every N divides it."""
    if every and epoch % every == 0:
        dst = os.path.join(os.path.dirname(ckpt_path), f"ckpt_epoch{epoch:03d}.pt")
        tmp = f"{dst}.tmp{os.getpid()}"  # as in atomic_save: a crash never leaves a half-written copy
        shutil.copyfile(ckpt_path, tmp)
        os.replace(tmp, dst)


def load_checkpoint(path, kind=None, map_location="cpu", mmap=False):
    """A checkpoint dict, or GanjiError with one clear line. Never runs code from the file.

    mmap=True maps tensors lazily: a cheap way to read kind/config/epoch of a large file.
    """
    if not os.path.isfile(path):
        raise GanjiError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception:
        raise GanjiError(f"{path} is not a readable checkpoint (truncated, damaged or another format)")
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in KINDS:
        raise GanjiError(f"{path} is not a GANji checkpoint")
    if kind not in (None, "auto") and ckpt["kind"] != kind:
        raise GanjiError(f"{path} is a {ckpt['kind']} checkpoint, not {kind}")
    if ckpt.get("version") != FORMAT_VERSION:
        raise GanjiError(f"{path} has checkpoint format version {ckpt.get('version')}; "
                         f"this GANji reads version {FORMAT_VERSION}")
    return ckpt


def trained_so_far(ckpt):
    """{epochs, steps, train_minutes} that made a checkpoint's weights, counting the runs it was --init-from."""
    if ckpt.get("slim"):
        return {k: ckpt["record"][k] for k in ("epochs", "steps", "train_minutes")}
    before = ckpt["config"].get("trained_before") or {"epochs": 0, "steps": 0, "train_minutes": 0.0}
    return {"epochs": before["epochs"] + ckpt["epoch"], "steps": before["steps"] + ckpt["step"],
            "train_minutes": round(before["train_minutes"] + ckpt["train_seconds"] / 60, 1)}


def load_weights(module, state, path):
    """module.load_state_dict(state), or one clear line when the shapes of --init-from's networks differ."""
    try:
        module.load_state_dict(state)
    except RuntimeError:
        raise GanjiError(f"--init-from {path}: its networks do not fit this run's; leave out the architecture "
                         "flags (--width, --image-size, --channels, ...) to take the checkpoint's")


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CtrlC:
    """`with CtrlC() as stop:` a first Ctrl-C only marks the stop as asked for: the loop, which calls
    stop.requested() between steps, finishes the step under way and saves whole steps (--resume is then exact);
    a second one raises KeyboardInterrupt (quit, no save). Signals reach only the main thread: elsewhere it
    changes nothing.

    Under torchrun, torchrun hands one Ctrl-C to every rank, and not always between the same two steps:
    requested() is an all_reduce of the flag over the ranks (until it is True, then it stays True), so every rank
    answers the same at the same step and all stop together. Only rank 0 prints."""

    def __enter__(self):
        self.pressed, self.agreed, self.previous = False, False, None
        self.loud = world_size() == 1 or dist.get_rank() == 0
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.on_sigint)
        return self

    def on_sigint(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        if self.loud:
            print("\nCtrl-C: stopping after this step (again to quit without saving)", file=sys.stderr)

    def requested(self):
        """Whether to stop now: a Ctrl-C reached this process (under torchrun: any rank). All ranks call it alike."""
        if world_size() == 1:
            return self.pressed
        if not self.agreed:  # one tiny all_reduce per step, until some rank has had its Ctrl-C
            flag = torch.tensor(float(self.pressed), device="cuda" if dist.get_backend() == "nccl" else "cpu")
            self.agreed = mean_over_ranks(flag).item() > 0
        return self.agreed

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def slerp(z0, z1, t):
    """Spherical interpolation between the rows of z0 and z1 (R, D) at fractions t (T,) -> (R, T, D)."""
    z0, z1, t = z0[:, None], z1[:, None], t.view(1, -1, 1)
    omega = torch.acos(F.cosine_similarity(z0, z1, dim=2).clamp(-1, 1))[..., None]  # (R, 1, 1) angle
    so = torch.sin(omega)
    arc = (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / so.clamp_min(1e-6)
    return torch.where(so > 1e-6, arc, torch.lerp(z0, z1, t))  # (anti)parallel endpoints: a straight line


def latent_morph(z0, z1, frames, spherical=True):
    """Start and end latents (R, D) -> (R * frames, D), row-major: each row walks from z0 to z1 in `frames`
    stops, along the great circle (slerp, keeps the norm a Gaussian draw has) or along a straight line."""
    t = torch.linspace(0, 1, frames)
    z = slerp(z0, z1, t) if spherical else torch.lerp(z0[:, None], z1[:, None], t.view(1, -1, 1))
    return z.reshape(-1, z0.shape[1])


class MetricsLog:
    """Appends one JSON object per line to run_dir/metrics.jsonl (kept across --resume)."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, "metrics.jsonl")

    def write(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}) + "\n")


def plot_curves(metrics_path, png_path):
    """curves.png from metrics.jsonl: the losses, images/s and (with --eval-every) FID against the step."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    # rows without a "row" key come from a run started before it existed: not drawn
    steps = [r for r in rows if r.get("row") == "step"]
    evals = [r for r in rows if r.get("row") == "eval"]
    losses = sorted({k for r in steps for k in r if k.startswith("loss") or k in ("recon", "kl", "penalty")})
    panels = [("loss", losses, steps), ("images/s", ["img_per_s"], steps)] + [("FID", ["fid"], evals)] * bool(evals)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys, source) in zip(axes[0], panels):
        for k in keys:
            ax.plot([r["step"] for r in source if k in r], [r[k] for r in source if k in r], label=k,
                    marker="o" if source is evals else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


def write_config(run_dir, config):
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def to_picture(x01, display_invert):
    """[0, 1] images (ink bright) -> what a person sees: glyphs black on white, photos as they are."""
    x01 = x01.detach().float().cpu()
    return 1 - x01 if display_invert else x01


def save_grid(x01, path, display_invert, nrow=8):
    from torchvision.utils import save_image
    save_image(to_picture(x01, display_invert), path, nrow=nrow, padding=2,
               pad_value=1.0 if display_invert else 0.0)


def cli(main):
    """Run main(); bad input becomes one line on stderr and exit code 2, a second Ctrl-C exit code 130.
    Under torchrun the process leaves its process group on every way out."""
    try:
        return main()
    except GanjiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nstopped without saving", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare (render or download) a dataset and print its shape.")
    add_common_args(p, epochs=1, batch_size=64, lr=1e-3)
    args = p.parse_args(argv)
    ds = data_from_args(args)
    print(f"{ds.name}: {tuple(ds.images.shape)} uint8, cached/stored under {args.data_dir}")


if __name__ == "__main__":
    cli(main)
