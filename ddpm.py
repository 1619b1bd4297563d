"""Denoising diffusion (DDPM) on kanji with a U-Net, sampled fast with DDIM.

    python ddpm.py                                   # train on the built-in kanji, 64x64
    python ddpm.py --width 0.25 --image-size 32 --limit 2000 --epochs 2 --out runs/ddpm_small
    python ddpm.py --out runs/ddpm_small --resume --epochs 3

Training: pick a random step t, noise a clean batch in one shot with q(x_t | x_0), and teach the U-Net to
predict the noise (or v) with an MSE loss. Sampling walks back from pure noise: `ancestral` is the full
T-step DDPM reverse process, `ddim` skips steps (50 by default) with the same trained network.
The diffusion math lives in small functions below so the tests can check each against its formula.
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

KIND = "ddpm"
NORM = "11"  # images in [-1, 1], the scale the noise schedule assumes
# what a run is made of; on --resume these come from the checkpoint, a different command-line value is ignored
FIXED = ("dataset", "font", "image_size", "channels", "limit", "invert", "hflip", "batch_size", "lr", "seed",
         "width", "attn", "timesteps", "schedule", "pred", "warmup", "clip", "weight_decay", "ema_decay")


def get_parser():
    p = argparse.ArgumentParser(description="Train a U-Net denoising diffusion model (DDPM, DDIM sampling).")
    data.add_common_args(p, epochs=100, batch_size=64, lr=5e-4, precision="bf16", sample_every=1)
    g = p.add_argument_group("ddpm")
    g.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T (default: %(default)s)")
    g.add_argument("--schedule", default="linear", choices=("linear", "cosine"),
                   help="noise schedule: linear beta 1e-4..0.02 (scaled by 1000/T) or cosine (default: %(default)s)")
    g.add_argument("--pred", default="eps", choices=("eps", "v"),
                   help="what the U-Net predicts: the noise eps or v = sqrt(ab) eps - sqrt(1-ab) x0 "
                        "(default: %(default)s)")
    g.add_argument("--attn", action="store_true",
                   help="self-attention across the pixels of each image at 1/4 and 1/8 resolution (default: off)")
    g.add_argument("--warmup", type=int, default=500,
                   help="linear LR warm-up steps, at most a tenth of the run; then cosine decay to 0 "
                        "(default: %(default)s)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping, 0 = off (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--ema-decay", type=float, default=0.999,
                   help="EMA of the weights used for sampling, 0 = off (default: %(default)s)")
    g.add_argument("--sample-steps", type=int, default=50,
                   help="DDIM steps (eta 0) for the per-epoch sample grids (default: %(default)s)")
    return p


def config_from_args(args, ds=None):
    """vars(args) plus what the dataset decides (real size, channels, display) and the run's total steps."""
    ds = ds if ds is not None else data.data_from_args(args)
    cfg = dict(vars(args))
    n, c, s = ds.images.shape[:3]
    batches = math.ceil(n / args.batch_size)
    cfg.update(image_size=s, channels=c, display_invert=ds.display_invert, dataset_name=ds.name, n_images=n,
               total_steps=min(2, batches) if args.dry_run else args.epochs * batches)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Diffusion math. Schedules in float64; x0 is the clean image, eps the unit Gaussian noise,
# ab = alpha_bar_t = prod_{s<=t} (1 - beta_s) the fraction of signal power left at step t (t from 0 to T-1).

def schedule(T, kind):
    """float64 tensors (T,): betas, alpha_bar, alpha_bar_prev (1 before step 0) and the posterior
    q(x_{t-1} | x_t, x_0) = N(c0 * x0 + ct * x_t, var)."""
    if kind == "linear":  # Ho et al. 2020: 1e-4 .. 0.02 for T = 1000, rescaled so other T keep the same ends
        scale = 1000 / T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    elif kind == "cosine":  # Nichol & Dhariwal 2021: alpha_bar(t) = f(t) / f(0), f = cos^2((t/T + s) / (1 + s) pi/2)
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # the last steps would reach 1: clipped as in the paper
    else:
        raise data.GanjiError(f"unknown schedule {kind!r}")
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return {"betas": betas, "alpha_bar": ab, "alpha_bar_prev": ab_prev,
            "post_var": betas * (1 - ab_prev) / (1 - ab),
            "post_c0": betas * ab_prev.sqrt() / (1 - ab),
            "post_ct": (1 - betas).sqrt() * (1 - ab_prev) / (1 - ab)}


def q_sample(x0, t, eps, alpha_bar):
    """x_t ~ q(x_t | x_0) in one shot: sqrt(ab_t) x0 + sqrt(1 - ab_t) eps. t: (B,) step indices."""
    ab = alpha_bar[t].view(-1, *[1] * (x0.dim() - 1))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def v_target(x0, eps, ab):
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022): the velocity-style regression target."""
    return ab ** 0.5 * eps - (1 - ab) ** 0.5 * x0


def split_prediction(out, xt, ab, pred, clip=False):
    """Network output at a step with signal fraction ab -> (x0, eps), both consistent with x_t.

    With clip, x0 is clamped to the data range [-1, 1] and eps re-derived from it, so every sampler
    update uses one coherent pair (as in Ho et al.'s and Nichol & Dhariwal's samplers)."""
    if pred == "eps":
        eps = out
        x0 = (xt - (1 - ab) ** 0.5 * eps) / ab ** 0.5
    else:
        x0 = ab ** 0.5 * xt - (1 - ab) ** 0.5 * out
        eps = (1 - ab) ** 0.5 * xt + ab ** 0.5 * out
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (xt - ab ** 0.5 * x0) / (1 - ab) ** 0.5
    return x0, eps


def posterior(x0, xt, t, sched):
    """Mean and variance of q(x_{t-1} | x_t, x_0) at an integer step t (variance 0 at t = 0)."""
    return sched["post_c0"][t].item() * x0 + sched["post_ct"][t].item() * xt, sched["post_var"][t].item()


def ancestral_step(x0, xt, t, sched, noise):
    """One DDPM reverse step: x_{t-1} ~ q(x_{t-1} | x_t, x0 = the network's estimate)."""
    mean, var = posterior(x0, xt, t, sched)
    return mean + var ** 0.5 * noise


def ddim_step(x0, eps, ab_t, ab_prev, eta, noise=None):
    """DDIM (Song et al. 2021) from a step with signal ab_t to an earlier one with ab_prev.

    sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)); eta = 0 is deterministic and
    eta = 1 with consecutive steps is exactly the ancestral DDPM step."""
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
    x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
    return x + sigma * noise if sigma > 0 else x


def ddim_timesteps(T, steps):
    """`steps` increasing step indices ending at T - 1 ("trailing" spacing: sampling starts at pure noise)."""
    steps = max(1, min(steps, T))
    return [round((i + 1) * T / steps) - 1 for i in range(steps)]


def lr_at(step, total, base, warmup):
    """Pure function of the step: linear warm-up (at most a tenth of the run), then cosine decay to 0."""
    warmup = min(warmup, total // 10)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------
# The U-Net

def ch(n, width):
    """Channel count n scaled by --width, a multiple of 8 (so GroupNorm always has whole groups)."""
    return max(8, round(n * width / 8) * 8)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 under bf16 autocast: steadier statistics, and on CPU the bf16
    channels-last GroupNorm kernels are several times slower than float32 ones (measured)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def norm(c):
    return GroupNorm32(math.gcd(32, c // 4), c)  # up to 32 groups of at least 4 channels (c is a multiple of 8)


def timestep_embedding(t, dim):
    """(B,) integer steps -> (B, dim) sines and cosines at geometric frequencies 1 .. 1/10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, plus a (1x1 if needed) skip."""

    def __init__(self, cin, cout, tdim):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):  # x (B, cin, H, W), temb (B, tdim) already through SiLU -> (B, cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention across the H*W pixels of each image; images never see each other.

    F.scaled_dot_product_attention picks a flash/memory-efficient kernel, so memory stays linear in H*W."""

    def __init__(self, c):
        super().__init__()
        self.heads = max(1, c // 64)
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, C/heads): tokens are pixels
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Down(nn.Module):
    """Halve the resolution (average pool), then two residual blocks cin -> cin -> cout."""

    def __init__(self, cin, cout, tdim, attn):
        super().__init__()
        self.res1, self.res2 = ResBlock(cin, cin, tdim), ResBlock(cin, cout, tdim)
        self.attn = Attention(cout) if attn else nn.Identity()

    def forward(self, x, temb):
        x = F.avg_pool2d(x, 2)
        return self.attn(self.res2(self.res1(x, temb), temb))


class Up(nn.Module):
    """Bilinear upsample to the skip's size, concatenate the skip, two residual blocks cin -> cin -> cout."""

    def __init__(self, cin, cout, tdim, attn):
        super().__init__()
        self.res1, self.res2 = ResBlock(cin, cin, tdim), ResBlock(cin, cout, tdim)
        self.attn = Attention(cout) if attn else nn.Identity()

    def forward(self, x, skip, temb):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([skip, x], 1)
        return self.attn(self.res2(self.res1(x, temb), temb))


class UNet(nn.Module):
    """(B, C, S, S) noisy images and (B,) steps -> (B, C, S, S) predicted noise (or v).

    Channels at --width 1: 64 @S -> 128 @S/2 -> 256 @S/4 -> 256 @S/8 -> bottleneck 512 -> back up to 64 @S."""

    def __init__(self, channels=1, width=1.0, attn=False):
        super().__init__()
        c0, c1, c2, c3 = ch(64, width), ch(128, width), ch(256, width), ch(512, width)
        tdim = 4 * c0
        self.c0 = c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, tdim), nn.SiLU(), nn.Linear(tdim, tdim), nn.SiLU())
        self.inc = nn.Conv2d(channels, c0, 3, padding=1)
        self.down1 = Down(c0, c1, tdim, False)
        self.down2 = Down(c1, c2, tdim, attn)
        self.down3 = Down(c2, c2, tdim, attn)
        self.mid1, self.mid2, self.mid3 = ResBlock(c2, c3, tdim), ResBlock(c3, c3, tdim), ResBlock(c3, c2, tdim)
        self.mid_attn = Attention(c3) if attn else nn.Identity()
        self.up1 = Up(2 * c2, c1, tdim, attn)
        self.up2 = Up(2 * c1, c0, tdim, False)
        self.up3 = Up(2 * c0, c0, tdim, False)
        # default init for the output conv too: a zero-initialized one (as in ADM) starves every other layer of
        # gradient until it has grown, which at 5e-4 took ~100 steps (loss 0.17 vs 0.05-0.14 at step 96, measured)
        self.out = nn.Sequential(norm(c0), nn.SiLU(), nn.Conv2d(c0, channels, 3, padding=1))

    def forward(self, x, t):
        temb = self.time_mlp(timestep_embedding(t, self.c0))  # (B, 4 c0)
        x1 = self.inc(x)                                      # (B, c0, S, S)
        x2 = self.down1(x1, temb)                             # (B, c1, S/2, S/2)
        x3 = self.down2(x2, temb)                             # (B, c2, S/4, S/4)
        x4 = self.down3(x3, temb)                             # (B, c2, S/8, S/8)
        h = self.mid3(self.mid2(self.mid_attn(self.mid1(x4, temb)), temb), temb)  # (B, c2, S/8, S/8)
        h = self.up1(h, x3, temb)                             # (B, c1, S/4, S/4)
        h = self.up2(h, x2, temb)                             # (B, c0, S/2, S/2)
        h = self.up3(h, x1, temb)                             # (B, c0, S, S)
        return self.out(h)


def build(cfg):
    return UNet(cfg["channels"], cfg["width"], cfg["attn"])


def layout(cfg):
    """The memory format of --channels-last (checkpoints from before the flag was honoured: channels_last)."""
    return torch.channels_last if cfg.get("channels_last", True) else torch.contiguous_format


# ----------------------------------------------------------------------------------------------------
# Training

class Trainer:
    """The network, its EMA copy and AdamW; `step` is one training step on a normalized batch."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, torch.device(device)
        self.net = build(cfg).to(self.device, memory_format=layout(cfg))
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False) if cfg["ema_decay"] > 0 else None
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.fwd = torch.compile(self.net) if cfg["compile"] else self.net
        self.alpha_bar = schedule(cfg["timesteps"], cfg["schedule"])["alpha_bar"].float().to(self.device)
        self.step_count, self.lr = 0, cfg["lr"]

    @property
    def sample_net(self):
        return self.ema if self.ema is not None else self.net

    def step(self, x):
        cfg = self.cfg
        self.lr = lr_at(self.step_count, cfg["total_steps"], cfg["lr"], cfg["warmup"])
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        t = torch.randint(0, cfg["timesteps"], (len(x),), device=x.device)
        eps = torch.randn_like(x)
        xt = q_sample(x, t, eps, self.alpha_bar)
        with data.autocast(self.device, cfg["precision"]):
            out = self.fwd(xt, t)
        target = eps if cfg["pred"] == "eps" else v_target(x, eps, self.alpha_bar[t].view(-1, 1, 1, 1))
        loss = F.mse_loss(out.float(), target)
        if not torch.isfinite(loss):  # leave the weights as they were; the caller stops the run
            return {"loss": loss.item(), "grad_norm": float("nan")}
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), cfg["clip"] or float("inf"))
        self.opt.step()
        if self.ema is not None:
            self.update_ema()
        self.step_count += 1
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    @torch.no_grad()
    def update_ema(self):
        # the decay ramps up from 0.1 so the EMA of a short run is not stuck at the initial weights
        decay = min(self.cfg["ema_decay"], (1 + self.step_count) / (10 + self.step_count))
        for e, p in zip(self.ema.parameters(), self.net.parameters()):
            e.lerp_(p, 1 - decay)

    def state_dict(self):
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "opt": self.opt.state_dict(), "step": self.step_count}

    def load_state_dict(self, d):
        self.net.load_state_dict(d["net"])
        if self.ema is not None:
            self.ema.load_state_dict(d["ema"])
        self.opt.load_state_dict(d["opt"])
        self.step_count = d["step"]


def save_checkpoint(path, trainer, epoch, batch):
    """epoch: completed epochs; batch: batches done in the epoch under way (0 at an epoch boundary)."""
    data.atomic_save({"kind": KIND, "version": data.FORMAT_VERSION, "config": trainer.cfg,
                      **trainer.state_dict(), "epoch": epoch, "batch": batch, "rng": data.rng_state()}, path)


def load(path, device="cpu"):
    """Checkpoint -> (sampling network with the EMA weights where there are some, in eval mode; config)."""
    ckpt = data.load_checkpoint(path, KIND)
    cfg = ckpt["config"]
    net = build(cfg)
    net.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["net"])
    return net.to(device, memory_format=layout(cfg)).eval(), cfg  # the layout training used


# ----------------------------------------------------------------------------------------------------
# Sampling

@torch.no_grad()
def denoise(net, cfg, x, gen, sampler="ddim", steps=50, eta=0.0, progress=None, done=0, total=None):
    """Run the reverse process from x = x_T (on the net's device) to x_0 in [-1, 1].

    Fresh noise for stochastic steps comes from the CPU generator `gen`, drawn once per step."""
    sched = schedule(cfg["timesteps"], cfg["schedule"])
    ab = sched["alpha_bar"].tolist()
    if sampler == "ancestral":
        ts = list(range(cfg["timesteps"] - 1, -1, -1))
    elif sampler == "ddim":
        ts = ddim_timesteps(cfg["timesteps"], steps)[::-1]
    else:
        raise data.GanjiError(f"unknown sampler {sampler!r} (ancestral | ddim)")
    device = x.device
    stochastic = sampler == "ancestral" or eta > 0
    for i, t in enumerate(ts):
        tt = torch.full((len(x),), t, device=device, dtype=torch.long)
        with data.autocast(device, cfg["precision"]):
            out = net(x, tt).float()
        x0, eps = split_prediction(out, x, ab[t], cfg["pred"], clip=True)
        noise = torch.randn(x.shape, generator=gen).to(device) if stochastic else None
        if sampler == "ancestral":
            x = ancestral_step(x0, x, t, sched, noise)
        else:
            ab_prev = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
            x = ddim_step(x0, eps, ab[t], ab_prev, eta, noise)
        if progress is not None:
            progress(done + i + 1, total or len(ts))
    return x


def sample(net, cfg, n, seed=0, device="cpu", sampler="ddim", steps=50, eta=0.0, progress=None, batch_size=256):
    """n images (n, C, H, W) in [0, 1] on CPU, ink bright. Same seed -> same images; global RNG untouched.

    Works in chunks of batch_size; the start noise of all n images is drawn first, so DDIM with eta = 0
    gives the same images whatever the chunking. progress(i, total) is called after every denoising step."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    xT = torch.randn(n, cfg["channels"], cfg["image_size"], cfg["image_size"], generator=gen)
    per = len(ddim_timesteps(cfg["timesteps"], steps)) if sampler == "ddim" else cfg["timesteps"]
    chunks = xT.split(batch_size)
    out = [denoise(net, cfg, x.to(device), gen, sampler, steps, eta, progress, i * per, len(chunks) * per).cpu()
           for i, x in enumerate(chunks)]
    return data.denormalize(torch.cat(out), NORM)


def interpolate(net, cfg, rows, steps, seed=0, device="cpu", ddim_steps=50, progress=None):
    """(rows * steps, C, H, W) in [0, 1]: each row morphs between two start noises, decoded with DDIM eta = 0."""
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    z0, z1 = torch.randn(rows, 2, math.prod(shape), generator=gen).unbind(1)  # each (rows, C*H*W)
    xT = data.latent_morph(z0, z1, steps).view(rows * steps, *shape)
    x = denoise(net, cfg, xT.to(device), gen, "ddim", ddim_steps, 0.0, progress)
    return data.denormalize(x.cpu(), NORM)


# ----------------------------------------------------------------------------------------------------
# The training run

def explicit_flags(argv):
    """The dests given on the command line (to tell `--epochs 100` from the default 100 on --resume)."""
    p = get_parser()
    p.set_defaults(**{k: None for k in vars(p.parse_args([]))})
    return {k for k, v in vars(p.parse_args(argv)).items() if v is not None}


def main(argv=None):
    args = get_parser().parse_args(argv)
    device = data.pick_device(args.device)
    args.out = args.out or os.path.join("runs", f"{KIND}_{os.path.basename(os.path.normpath(args.dataset))}")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise data.GanjiError(f"--resume: no ckpt.pt in {args.out}")
        ckpt = data.load_checkpoint(ckpt_path, KIND)
        given, old = explicit_flags(argv if argv is not None else sys.argv[1:]), ckpt["config"]
        ignored = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {old[k]})"
                   for k in FIXED if k in given and getattr(args, k) != old[k]]
        if ignored:
            print(f"warning: resuming with the checkpoint's settings, ignoring {', '.join(ignored)}", file=sys.stderr)
        # the checkpoint's settings, except flags given now that do not change what the run is made of
        keep = {k: old[k] for k in vars(args) if k in old and (k in FIXED or k not in given)}
        args = argparse.Namespace(**{**vars(args), **keep, "out": args.out, "resume": True, "dry_run": args.dry_run})
    elif os.path.isfile(ckpt_path):
        raise data.GanjiError(f"{ckpt_path} exists: pass --resume to continue that run, or another --out")
    ds = data.data_from_args(args)
    cfg = config_from_args(args, ds)

    torch.manual_seed(cfg["seed"])  # weight init and the training noise
    trainer = Trainer(cfg, device)
    epoch, batch = 0, 0
    if args.resume:
        trainer.load_state_dict(ckpt)
        epoch, batch = ckpt["epoch"], ckpt["batch"]
        data.set_rng_state(ckpt["rng"])
    os.makedirs(args.out, exist_ok=True)
    data.write_config(args.out, cfg)
    batches = data.Batches(ds.images, cfg["batch_size"], device, NORM, cfg["seed"], cfg["hflip"],
                           cfg["channels_last"])
    log = data.MetricsLog(args.out)
    epochs = 1 if args.dry_run else cfg["epochs"]
    n_params = sum(p.numel() for p in trainer.net.parameters())
    print(f"ddpm: {n_params / 1e6:.2f} M parameters, {len(ds.images)} images {tuple(ds.images.shape[1:])}, "
          f"{len(batches)} batches/epoch, device {device}, {cfg['precision']}, run folder {args.out}")
    if epoch >= epochs:
        print(f"nothing to do: {ckpt_path} has already done {epoch} of {epochs} epochs")
        return

    try:
        for epoch in range(epoch, epochs):
            bar = tqdm(batches.epoch(epoch, start=batch), total=len(batches), initial=batch,
                       desc=f"epoch {epoch + 1}/{epochs}", leave=False)
            t0, seen, loss_sum, n_steps = time.perf_counter(), 0, 0.0, 0
            for x in bar:
                losses = trainer.step(x)
                if not math.isfinite(losses["loss"]):
                    print(f"error: non-finite loss {losses['loss']} at epoch {epoch + 1}, step {trainer.step_count + 1}; "
                          f"stopped, {ckpt_path} keeps the last good state", file=sys.stderr)
                    sys.exit(1)
                batch, seen, n_steps = batch + 1, seen + len(x), n_steps + 1
                loss_sum += losses["loss"]
                img_s = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{losses['loss']:.4f}", img_s=f"{img_s:.1f}")
                if trainer.step_count % cfg["log_every"] == 0:
                    log.write(epoch=epoch + 1, step=trainer.step_count, **losses, img_per_s=img_s, lr=trainer.lr)
                if args.dry_run and n_steps >= 2:
                    break
            bar.close()
            if n_steps:  # (none when resuming an epoch that was interrupted after its last batch)
                img_s, loss = seen / (time.perf_counter() - t0), loss_sum / n_steps
                log.write(epoch=epoch + 1, step=trainer.step_count, loss=loss, img_per_s=img_s, lr=trainer.lr)
                print(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}, {img_s:.1f} img/s, step {trainer.step_count}")
            if (epoch + 1) % cfg["sample_every"] == 0 or epoch + 1 == epochs:
                grid = sample(trainer.sample_net, cfg, 64, seed=cfg["seed"], device=device, steps=cfg["sample_steps"])
                data.save_grid(grid, os.path.join(args.out, f"samples_epoch{epoch + 1:03d}.png"), cfg["display_invert"])
            batch = 0
            save_checkpoint(ckpt_path, trainer, epoch + 1, 0)
    except KeyboardInterrupt:
        save_checkpoint(ckpt_path, trainer, epoch, batch)
        print(f"\ninterrupted: saved {ckpt_path} (epoch {epoch + 1}, batch {batch}); continue with --resume",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    data.cli(main)
