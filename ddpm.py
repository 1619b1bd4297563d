"""Denoising diffusion (DDPM) on kanji with a U-Net, sampled fast with DDIM or DPM-Solver++.

    python ddpm.py --epochs 9 --keep-every 3 --out runs/ddpm_30min   # the 30-minute CPU recipe (docs/ddpm.md)
    python ddpm.py --width 1.0                       # the reference U-Net, 100 epochs (a GPU job)
    python ddpm.py --image-size 32 --limit 2000 --epochs 2 --out runs/ddpm_small
    python ddpm.py --out runs/ddpm_small --resume --epochs 3

Training: pick a random step t, noise a clean batch in one shot with q(x_t | x_0), and teach the U-Net to
predict v = sqrt(ab) eps - sqrt(1 - ab) x0 (or the noise eps) with an MSE loss. Sampling walks back from pure
noise: `ancestral` is the full T-step DDPM reverse process; `ddim` and `dpm++2m` (a
second-order solver of the same ODE, the default: SAMPLER, STEPS) skip steps with the same trained network, and any
of them can be guided by a weaker checkpoint of the same run (autoguidance, Karras et al. 2024).
The diffusion math lives in small functions below so the tests can check each against its formula.

The file reads top to bottom like the other two scripts: parse -> data -> model -> step -> loop ->
checkpoint -> sampling API.
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
SAMPLERS = ("ddim", "dpm++2m", "ancestral")
# The sampling defaults, in one place: sample.py, the window and evaluate.py read them (a slim file's record may
# recommend its own sampler and guide, which they prefer). The steering defaults: docs/steering.md.
SAMPLER, STEPS, GUIDANCE = "dpm++2m", 20, 2.0
STRENGTH = 0.55         # edit(): how much of the noise schedule a variation goes back through
RESAMPLE, JUMP = 3, 5   # inpaint(): RePaint's resamplings and the length of each jump, in sampler moves
# the size-dependent training defaults, (at --width <= data.WIDE, above it): the CPU recipe, then the reference's
BATCH_SIZE, LR = (32, 64), (1e-3, 5e-4)


# ----------------------------------------------------------------------------------------------------
# Parse

def get_parser():
    p = argparse.ArgumentParser(description="Train a U-Net denoising diffusion model (DDPM, DDIM sampling).")
    data.add_common_args(p, epochs=100, batch_size=BATCH_SIZE, lr=LR, doc="docs/ddpm.md")
    g = p.add_argument_group("ddpm")
    g.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T (default: %(default)s)")
    g.add_argument("--schedule", default="linear", choices=("linear", "cosine"),
                   help="noise schedule: linear beta 1e-4..0.02 (scaled by 1000/T) or cosine (default: %(default)s)")
    g.add_argument("--pred", default="v", choices=("eps", "v"),
                   help="what the U-Net predicts: the noise eps or v = sqrt(ab) eps - sqrt(1-ab) x0 "
                        "(default: %(default)s; docs/ddpm.md)")
    g.add_argument("--loss-weight", default="uniform", choices=("uniform", "min-snr"),
                   help="per-step weight of the MSE: uniform, or min-SNR-gamma (Hang et al. 2023) "
                        "(default: %(default)s; docs/ddpm.md)")
    g.add_argument("--snr-gamma", type=float, default=5.0,
                   help="gamma of --loss-weight min-snr (default: %(default)s)")
    g.add_argument("--attn", action="store_true",
                   help="self-attention across the pixels of each image at 1/4 and 1/8 resolution (default: off)")
    g.add_argument("--warmup", type=int, default=500,
                   help="linear LR warm-up steps, at most a tenth of the run, then cosine decay to 0 "
                        "(default: %(default)s)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping, 0 = off (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--ema-decay", type=float, default=0.999,
                   help="decay of the EMA of the weights that draws the samples, lower early on; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--sample-steps", type=int, default=50,
                   help="DDIM steps (eta 0) for the per-epoch sample grids (default: %(default)s)")
    return p


def recipe(args):
    """The defaults that depend on --width, for what neither the command line nor a checkpoint gave (a fresh run's
    flags; on --resume and with --init-from the checkpoint's): -> args with concrete numbers."""
    return data.by_width(args, batch_size=BATCH_SIZE, lr=LR)


# ----------------------------------------------------------------------------------------------------
# Data

def config_from_args(args, ds=None):
    """vars(args) with the recipe's defaults filled in, plus what the dataset decides (real size, channels, display),
    the steps per epoch and the run's total steps (the learning-rate schedule's length)."""
    args = recipe(args)
    ds = ds if ds is not None else data.data_from_args(args)
    n, c, s = ds.images.shape[:3]
    per_epoch = data.steps_per_epoch(n, args.batch_size)
    return {**vars(args), "kind": KIND, "image_size": s, "channels": c, "display_invert": ds.display_invert,
            "n_images": n, "steps_per_epoch": per_epoch,
            "total_steps": min(2, per_epoch) if args.dry_run else args.epochs * per_epoch}


# ----------------------------------------------------------------------------------------------------
# Model, part 1: the diffusion math. Schedules in float64; x0 is the clean image, eps the unit Gaussian noise,
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


def loss_weight(ab, pred, kind="uniform", gamma=5.0):
    """Per-sample weights (B,) of the MSE at signal fractions ab (B,).

    min-snr (Hang et al. 2023): weight the x0 error by min(SNR, gamma), SNR = ab / (1 - ab). An eps error is the
    x0 error times SNR and a v error the x0 error times (SNR + 1), so the weight on their MSE is min(SNR, gamma) / SNR
    for eps and min(SNR, gamma) / (SNR + 1) for v."""
    if kind == "uniform":
        return torch.ones_like(ab)
    snr = ab / (1 - ab)
    return snr.clamp(max=gamma) / (snr if pred == "eps" else snr + 1)


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
# Model, part 2: the U-Net

def ch(n, width):
    """Channel count n scaled by --width, a multiple of 8 (so GroupNorm always has whole groups)."""
    return max(8, round(n * width / 8) * 8)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 under bf16 autocast: steadier statistics, and on CPU the bf16
    channels-last GroupNorm kernels are much slower than float32 ones (measured, docs/bench.md)."""

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
        # gradient until it has grown, which cost the first hundred-odd steps (measured)
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
    return torch.channels_last if cfg["channels_last"] else torch.contiguous_format


# ----------------------------------------------------------------------------------------------------
# Step

class Trainer:
    """The network, its EMA copy and AdamW; `step` is one training step on a normalized batch."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, torch.device(device)
        self.net = build(cfg).to(self.device, memory_format=layout(cfg))
        self.net_fwd = data.ddp(torch.compile(self.net) if cfg["compile"] else self.net, self.device)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False) if cfg["ema_decay"] > 0 else None
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.alpha_bar = schedule(cfg["timesteps"], cfg["schedule"])["alpha_bar"].float().to(self.device)
        self.step_count, self.lr = 0, cfg["lr"]

    @property
    def sample_net(self):
        return self.ema if self.ema is not None else self.net

    def step(self, x):
        """One AdamW step on x (N, C, S, S) in [-1, 1]; returns the loss and gradient norm as floats."""
        cfg = self.cfg
        self.lr = lr_at(self.step_count, cfg["total_steps"], cfg["lr"], cfg["warmup"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        # t and the noise are drawn for the global batch of n images and sliced to this rank's rows (data.shard); the
        # noise in x's memory layout, as torch.randn_like(x) draws it: one process draws the numbers it always drew
        n = len(x) * data.world_size()
        t = data.shard(torch.randint(0, cfg["timesteps"], (n,), device=x.device))
        eps = data.shard(torch.empty(n, *x.shape[1:], device=x.device, memory_format=layout(cfg)).normal_())
        xt = q_sample(x, t, eps, self.alpha_bar)
        with data.autocast(self.device, cfg["precision"]):
            out = self.net_fwd(xt, t)
        ab = self.alpha_bar[t]
        target = eps if cfg["pred"] == "eps" else v_target(x, eps, ab.view(-1, 1, 1, 1))
        weight = loss_weight(ab, cfg["pred"], cfg["loss_weight"], cfg["snr_gamma"])
        loss = (weight * (out.float() - target).pow(2).mean((1, 2, 3))).mean()  # uniform: plain MSE
        mean_loss = data.mean_over_ranks(loss.detach())  # the global batch's (all ranks alike)
        if not torch.isfinite(mean_loss):  # leave the weights as they were; the loop stops the run
            return {"loss": mean_loss.item()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under torchrun DDP averages the gradients: those of the global batch's mean loss
        grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), cfg["clip"] or float("inf"))
        self.optimizer.step()
        if self.ema is not None:  # warm-up: early on the average must not cling to the random init
            ema_update(self.ema, self.net, min(cfg["ema_decay"], (1 + self.step_count) / (10 + self.step_count)))
        self.step_count += 1
        return {"loss": mean_loss.item(), "grad_norm": grad_norm.item()}

    def state_dict(self):
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "step": self.step_count}

    def init_from(self, src, path):
        """--init-from: the network and its EMA both start from src's sampling weights; AdamW starts fresh."""
        for module in (self.net, self.ema) if self.ema is not None else (self.net,):
            data.load_weights(module, sampling_weights(src), path)

    def load_state_dict(self, d):
        self.net.load_state_dict(d["net"])
        if self.ema is not None:
            self.ema.load_state_dict(d["ema"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.step_count = d["step"]


@torch.no_grad()
def ema_update(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * net, parameter by parameter (the U-Net has no buffers)."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1 - decay)


# ----------------------------------------------------------------------------------------------------
# Loop

def main(argv=None):
    args, ckpt = data.open_run(get_parser(), argv, KIND)
    recipe(args)  # before anything reads --batch-size, and before the config is saved
    rank, world, device = data.distributed(args)  # (0, 1, the --device) without torchrun
    ds = data.data_from_args(args, progress=rank == 0)
    cfg = config_from_args(args, ds)
    if not ckpt:  # a fresh run settles --precision auto (timed once per machine); a resumed one keeps its own
        cfg["precision"] = data.resolve_precision(cfg, device, ds.images, NORM, Trainer)
    torch.manual_seed(cfg["seed"])  # weight init
    trainer = Trainer(cfg, device)
    epoch, batch, seconds = 0, 0, 0.0  # completed epochs, batches done in the epoch under way, training time
    if ckpt:
        trainer.load_state_dict(ckpt)
        epoch, batch, seconds = ckpt["epoch"], ckpt["batch"], ckpt["train_seconds"]
        data.set_rng_state(ckpt["rng"])
    elif cfg["init_from"]:
        trainer.init_from(data.load_checkpoint(cfg["init_from"], KIND), cfg["init_from"])
    ref = None  # FID's real side, on rank 0, which alone evaluates; before the run folder, which a failure never leaves
    if cfg["eval_every"] and rank == 0:
        import evaluate  # only when asked for: it loads its feature network
        ref = evaluate.reference(ds.images, ds.name, device=device)
    out, ckpt_path = cfg["out"], os.path.join(cfg["out"], "ckpt.pt")
    if rank == 0:  # rank 0 alone writes the run folder: logs, grids, evaluations, checkpoints
        os.makedirs(out, exist_ok=True)
        data.write_config(out, cfg)
    log = data.MetricsLog(out)
    batches = data.Batches(ds.images, cfg["batch_size"], device, NORM, cfg["seed"], cfg["hflip"],
                           cfg["channels_last"], rank, world)  # this rank's share of each global batch
    epochs, per_epoch = (1, min(2, len(batches))) if cfg["dry_run"] else (cfg["epochs"], len(batches))
    n_params = sum(p.numel() for p in trainer.net.parameters())
    if rank == 0:
        print(f"{KIND}: {n_params / 1e6:.2f} M parameters, {len(ds.images)} images {tuple(ds.images.shape[1:])}, "
              f"{device}{f' x {world} processes' if world > 1 else ''}, "
              f"bf16 {data.use_bf16(device, cfg['precision'])}, epoch {epoch}/{epochs}, run folder {out}")
    t_run = time.perf_counter()
    save = lambda: save_checkpoint(ckpt_path, trainer, epoch, batch, seconds + time.perf_counter() - t_run)

    with data.CtrlC() as stop:
        while epoch < epochs:
            sums, seen, t0 = {}, 0, time.perf_counter()
            bar = tqdm(total=per_epoch, initial=batch, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                       disable=rank > 0)
            for x in batches.epoch(epoch, start=batch):
                if batch >= per_epoch or stop.requested():
                    break
                losses = trainer.step(x)  # under torchrun: the global batch's, on every rank
                if not math.isfinite(losses["loss"]):
                    bar.close()
                    data.exit_all(f"error: non-finite loss {losses['loss']} at epoch {epoch + 1} step "
                                  f"{trainer.step_count + 1}; stopped, {ckpt_path} keeps the last good state")
                batch, seen = batch + 1, seen + len(x) * world  # images of the global batch
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v * len(x) * world
                img_s = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{losses['loss']:.4f}", img_s=f"{img_s:.1f}")
                bar.update()
                if trainer.step_count % cfg["log_every"] == 0 and rank == 0:
                    log.write(row="step", epoch=epoch + 1, step=trainer.step_count, **losses, img_per_s=img_s,
                              lr=trainer.lr)
            bar.close()
            if stop.requested():
                if rank == 0:
                    save()
                    print(f"interrupted: saved {ckpt_path} at epoch {epoch} + {batch} batches; continue with "
                          "--resume", file=sys.stderr)
                data.exit_all(130)
            epoch, batch = epoch + 1, 0
            if rank > 0:
                continue  # the others train on while rank 0 logs, draws, evaluates and saves
            if seen:
                log.write(row="epoch", epoch=epoch, step=trainer.step_count, **{k: v / seen for k, v in sums.items()},
                          img_per_s=seen / (time.perf_counter() - t0), lr=trainer.lr)
                print(f"epoch {epoch}/{epochs}: loss {sums['loss'] / seen:.4f}, step {trainer.step_count}")
            if epoch % cfg["sample_every"] == 0 or epoch == epochs:  # the same fixed start noise every time
                data.save_grid(sample(trainer.sample_net, cfg, 64, seed=cfg["seed"], device=device,
                                      steps=cfg["sample_steps"]),
                               os.path.join(out, f"samples_epoch{epoch:03d}.png"), cfg["display_invert"])
            if cfg["eval_every"] and epoch % cfg["eval_every"] == 0:
                n = min(1000, len(ds.images))  # samples the FID is measured on
                fake = sample(trainer.sample_net, cfg, n, seed=cfg["seed"] + 1, device=device,
                              steps=cfg["sample_steps"])
                log.write(row="eval", epoch=epoch, step=trainer.step_count, **evaluate.fid_kid(fake, ref))
            save()  # before the picture: a checkpoint never waits on a plot
            data.keep_copy(ckpt_path, epoch, cfg["keep_every"])
            data.plot_curves(log.path, os.path.join(out, "curves.png"))
    if rank == 0:
        print(f"done: {epoch} epochs, {trainer.step_count} steps; {out}")


# ----------------------------------------------------------------------------------------------------
# Checkpoint

def save_checkpoint(path, trainer, epoch, batch, train_seconds):
    """The self-describing checkpoint. epoch: completed epochs; batch: batches done in the epoch under way."""
    data.atomic_save({"kind": KIND, "version": data.FORMAT_VERSION, "config": trainer.cfg, **trainer.state_dict(),
                      "epoch": epoch, "batch": batch, "train_seconds": train_seconds,
                      "machine": data.machines(trainer.cfg.get("machine_before"), data.machine(trainer.device)),
                      "rng": data.rng_state()}, path)


def load(path, device="cpu"):
    """A checkpoint (full or slim) -> (U-Net with the EMA weights where there are some, eval mode, config)."""
    ckpt = data.load_checkpoint(path, KIND)
    cfg = ckpt["config"]
    net = build(cfg)
    net.load_state_dict(sampling_weights(ckpt))  # a slim file's bf16 weights are copied into fp32 parameters
    return net.to(device, memory_format=layout(cfg)).eval(), cfg  # the layout training used


def sampling_weights(ckpt):
    """The state_dict that draws samples: a slim file's, else the EMA's, else the trained network's."""
    return ckpt.get("sample_net") or (ckpt["ema"] if ckpt["ema"] is not None else ckpt["net"])


# ----------------------------------------------------------------------------------------------------
# Sampling API (sample.py, the GUI, evaluate.py)

def check_guide(cfg, guide_cfg):
    """A guide must denoise the same diffusion: same image shape, noise schedule and prediction target."""
    keys = ("image_size", "channels", "timesteps", "schedule", "pred")
    diff = [f"{k} {guide_cfg[k]} vs {cfg[k]}" for k in keys if guide_cfg[k] != cfg[k]]
    if diff:
        raise data.GanjiError(f"the guide does not fit this model ({', '.join(diff)})")


def timesteps(cfg, sampler, steps, t_start=None):
    """The step indices a sampler visits, noisiest first, from t_start (default T - 1, where every free sample
    starts from pure noise) down to 0: all of them for ancestral, else `steps` with trailing spacing."""
    t_start = cfg["timesteps"] - 1 if t_start is None else t_start
    if sampler == "ancestral":
        return list(range(t_start, -1, -1))
    return ddim_timesteps(t_start + 1, steps)[::-1]


def predict(net, cfg, x, t, ab_t, guide=None, guidance=1.0, guide_min_t=0):
    """The (x0, eps) pair the network sees in x at step t, x0 clipped to [-1, 1].

    guide: a weaker network of the same diffusion (check_guide), e.g. an early checkpoint of the same run, for
    autoguidance (Karras et al. 2024): the prediction becomes guidance * net + (1 - guidance) * guide, which moves
    samples away from where the weaker model goes wrong; guidance 1 is the net alone. guide_min_t: guide only the
    steps at t >= guide_min_t, the noisier part of the path, where the layout of a glyph is decided (a guidance
    interval, Kynkäänniemi et al. 2024); 0 guides every step."""
    tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
    with data.autocast(x.device, data.sampling_precision(x.device)):
        out = net(x, tt).float()
        # x0 and eps are affine in out at fixed x_t, so mixing outputs mixes the denoisers, as in the paper
        if guide is not None and guidance != 1 and t >= guide_min_t:
            out = guidance * out + (1 - guidance) * guide(x, tt).float()
    return split_prediction(out, x, ab_t, cfg["pred"], clip=True)


def reverse_step(sampler, x, x0, eps, t, ab_t, ab_next, sched, gen, eta=0.0, state=None):
    """One move of a sampler from step t (signal ab_t) to the next step it visits (ab_next; 1.0 = clean).

    state: DPM-Solver++'s previous x0 estimate and log-SNR step, None at the start. Fresh noise for stochastic
    moves comes from the CPU generator gen. -> (x_next, state)."""
    if sampler == "ancestral":
        return ancestral_step(x0, x, t, sched, torch.randn(x.shape, generator=gen).to(x.device)), None
    if sampler == "ddim":
        noise = torch.randn(x.shape, generator=gen).to(x.device) if eta > 0 else None
        return ddim_step(x0, eps, ab_t, ab_next, eta, noise), None
    x0_prev, h_prev = state or (None, None)
    x_next, h = dpm_solver_2m_step(x, x0, x0_prev, h_prev, ab_t, ab_next)
    return x_next, (x0, h)


@torch.no_grad()
def denoise(net, cfg, x, gen, sampler=SAMPLER, steps=STEPS, eta=0.0, progress=None, done=0, total=None,
            guide=None, guidance=1.0, guide_min_t=0, t_start=None):
    """Run the reverse process from x = x_t_start (on the net's device; default pure noise at T - 1) to x_0 in
    [-1, 1]. progress(i, total) is called after every step."""
    if sampler not in SAMPLERS:
        raise data.GanjiError(f"unknown sampler {sampler!r} ({' | '.join(SAMPLERS)})")
    sched = schedule(cfg["timesteps"], cfg["schedule"])
    ab = sched["alpha_bar"].tolist()
    ts = timesteps(cfg, sampler, steps, t_start)
    state = None
    for i, t in enumerate(ts):
        x0, eps = predict(net, cfg, x, t, ab[t], guide, guidance, guide_min_t)
        x, state = reverse_step(sampler, x, x0, eps, t, ab[t], ab[ts[i + 1]] if i + 1 < len(ts) else 1.0,
                                sched, gen, eta, state)
        if progress is not None:
            progress(done + i + 1, total or len(ts))
    return x


def dpm_solver_2m_step(x, x0, x0_prev, h_prev, ab_t, ab_next):
    """One DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2) from signal fraction ab_t to ab_next > ab_t.

    With alpha = sqrt(ab), sigma = sqrt(1 - ab) and lambda = log(alpha / sigma), the step h = lambda_next -
    lambda_t; x0 is extrapolated linearly in lambda from this and the previous estimate (D = (1 + 1/2r) x0 -
    1/2r x0_prev, r = h_prev / h), then x_next = sigma_next / sigma_t x - alpha_next (e^-h - 1) D. The first step
    (no previous estimate) is first order, which is exactly DDIM; the last (ab_next = 1) returns x0 itself.
    -> (x_next, h)."""
    if ab_next >= 1.0:
        return x0, None
    lam = lambda a: 0.5 * math.log(a / (1 - a))
    h = lam(ab_next) - lam(ab_t)
    d = x0 if x0_prev is None else x0 + (x0 - x0_prev) / (2 * h_prev / h)
    return ((1 - ab_next) / (1 - ab_t)) ** 0.5 * x - ab_next ** 0.5 * math.expm1(-h) * d, h


def in_chunks(x, batch_size, device, run):
    """run(chunk on device, index) over the rows of x, batch_size at a time -> [0, 1] images on the CPU."""
    return data.denormalize(torch.cat([run(part.to(device), i).cpu() for i, part in enumerate(x.split(batch_size))]),
                            NORM)


def start_noise(cfg, n, seed):
    """(generator, x_T): every sampler here draws its n start noises first, from a generator of its own."""
    gen = torch.Generator().manual_seed(seed)
    return gen, torch.randn(n, cfg["channels"], cfg["image_size"], cfg["image_size"], generator=gen)


def sample(net, cfg, n, seed=0, device="cpu", sampler=SAMPLER, steps=STEPS, eta=0.0, progress=None,
           batch_size=256, guide=None, guidance=1.0, guide_min_t=0):
    """n images (n, C, H, W) in [0, 1] on CPU, ink bright. Same seed -> same images; global RNG untouched.

    Works in chunks of batch_size; the start noise of all n images is drawn first, so the deterministic
    samplers give the same images whatever the chunking. progress(i, total) is called after every step."""
    gen, xT = start_noise(cfg, n, seed)
    per, chunks = len(timesteps(cfg, sampler, steps)), math.ceil(n / batch_size)
    return in_chunks(xT, batch_size, torch.device(device), lambda x, i: denoise(
        net, cfg, x, gen, sampler, steps, eta, progress, i * per, chunks * per, guide, guidance, guide_min_t))


def interpolate(net, cfg, rows, frames, seed=0, device="cpu", sampler=SAMPLER, steps=STEPS, progress=None,
                guide=None, guidance=1.0, guide_min_t=0):
    """(rows * frames, C, H, W) in [0, 1]: each row morphs between two start noises, decoded with a
    deterministic sampler (ddim with eta 0, or dpm++2m)."""
    if sampler == "ancestral":
        raise data.GanjiError("a morph needs a deterministic sampler (ddim or dpm++2m), not ancestral")
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    z0, z1 = torch.randn(rows, 2, math.prod(shape), generator=gen).unbind(1)  # each (rows, C*H*W)
    xT = data.latent_morph(z0, z1, frames).view(rows * frames, *shape)
    x = denoise(net, cfg, xT.to(device), gen, sampler, steps, 0.0, progress, guide=guide, guidance=guidance,
                guide_min_t=guide_min_t)
    return data.denormalize(x.cpu(), NORM)


# ----------------------------------------------------------------------------------------------------
# Steering: variations of a given glyph, a glyph completed around a part of it, a morph between two glyphs.
# All of it happens at sampling time with the trained network, no training. Glyphs come in as (1, C, S, S) in
# [0, 1], ink bright (data.glyph / 255).

def edit(net, cfg, x0, strength=STRENGTH, n=16, seed=0, device="cpu", sampler=SAMPLER, steps=STEPS, eta=0.0,
         progress=None, batch_size=256, guide=None, guidance=1.0, guide_min_t=0):
    """SDEdit (Meng et al. 2022): n variations of the glyph x0 (1, C, S, S; or n glyphs, one each), each noised to the step that `strength` names
    (t = ceil(strength * T) - 1) and denoised from there with the sampler, in ceil(strength * steps) steps.

    strength near 0 gives the glyph back (one step from almost no noise); strength 1 starts from pure noise, the
    very start noise sample() draws for this seed, so it is a free sample. Same inputs and seed, same images."""
    if not 0 < strength <= 1:
        raise data.GanjiError(f"--strength must be in (0, 1], got {strength}")
    T = cfg["timesteps"]
    t_start, k = max(0, math.ceil(strength * T) - 1), max(1, math.ceil(strength * steps))
    gen, eps = start_noise(cfg, n, seed)
    ab = schedule(T, cfg["schedule"])["alpha_bar"][t_start].item()
    x = eps if t_start == T - 1 else ab ** 0.5 * (2 * x0.float() - 1) + (1 - ab) ** 0.5 * eps  # q(x_t | x_0)
    per, chunks = len(timesteps(cfg, sampler, k, t_start)), math.ceil(n / batch_size)
    return in_chunks(x, batch_size, torch.device(device), lambda xc, i: denoise(
        net, cfg, xc, gen, sampler, k, eta, progress, i * per, chunks * per, guide, guidance, guide_min_t, t_start))


def repaint_plan(n_steps, resample, jump):
    """RePaint's walk (Lugmayr et al. 2022, its "jumps") over a sampler's n_steps moves, as a list of +1 (one
    denoising move) and -jump (noise back up by jump moves). At every jump-th move the walk goes back and denoises
    those moves again, resample - 1 times, so the network runs about resample times as often as for a sample."""
    plan, i, done = [], 0, {}
    while i < n_steps:
        plan.append(1)
        i += 1
        if i % jump == 0 and i < n_steps and done.get(i, 0) < resample - 1:
            done[i] = done.get(i, 0) + 1
            plan.append(-jump)
            i -= jump
    return plan


@torch.no_grad()
def inpaint(net, cfg, x0, keep, n=16, seed=0, device="cpu", sampler=SAMPLER, steps=STEPS, resample=RESAMPLE,
            jump=JUMP, eta=0.0, progress=None, batch_size=256, guide=None, guidance=1.0, guide_min_t=0):
    """RePaint (Lugmayr et al. 2022): n completions of the glyph x0 (1, C, S, S; or n of them, one per completion)
    that keep its pixels where keep (1, 1, S, S) is 1 and invent the rest. After every move of the sampler the kept pixels are put back, noised to the new
    step (q(x_t | x_0)); walking back up by `jump` moves (q(x_b | x_a) = N(sqrt(ab_b / ab_a) x_a, (1 - ab_b / ab_a)
    I)) and denoising again, resample - 1 times, lets the invented part agree with the kept one. Any sampler; the
    multistep DPM-Solver++ restarts its history after each jump. The start noise is sample()'s for this seed, so
    an empty mask with resample 1 is sample() itself, and the full mask gives x0 back."""
    if resample < 1 or jump < 1:
        raise data.GanjiError(f"--resample and --jump must be at least 1, got {resample} and {jump}")
    sched = schedule(cfg["timesteps"], cfg["schedule"])
    ab = sched["alpha_bar"].tolist()
    ts = timesteps(cfg, sampler, steps)
    level = lambda i: ab[ts[i]] if i < len(ts) else 1.0  # signal at the plan's level i (len(ts): clean)
    plan = repaint_plan(len(ts), resample, jump)
    gen, xT = start_noise(cfg, n, seed)
    total = sum(m > 0 for m in plan) * math.ceil(n / batch_size)
    calls = [0]

    def run(x, chunk):
        part = x0 if len(x0) == 1 else x0[chunk * batch_size:chunk * batch_size + len(x)]  # one source, or one each
        src, m = (2 * part.float() - 1).to(x.device), keep.float().to(x.device)
        i, state = 0, None
        for move in plan:
            if move > 0:
                x0_hat, eps = predict(net, cfg, x, ts[i], level(i), guide, guidance, guide_min_t)
                x, state = reverse_step(sampler, x, x0_hat, eps, ts[i], level(i), level(i + 1), sched, gen, eta,
                                        state)
                i += 1
                a = level(i)
                known = src if a >= 1 else a ** 0.5 * src + (1 - a) ** 0.5 * torch.randn(x.shape, generator=gen).to(
                    x.device)
                x = m * known + (1 - m) * x
                calls[0] += 1
                if progress is not None:
                    progress(calls[0], total)
            else:
                r = level(i + move) / level(i)
                x = r ** 0.5 * x + (1 - r) ** 0.5 * torch.randn(x.shape, generator=gen).to(x.device)
                i, state = i + move, None
        return x

    return in_chunks(xT, batch_size, torch.device(device), run)


@torch.no_grad()
def invert(net, cfg, x0, steps=STEPS, device="cpu", guide=None, guidance=1.0, guide_min_t=0):
    """DDIM inversion (Song et al. 2021, section 4.3: the deterministic DDIM step run from x0 towards noise, with
    each move's prediction taken at its start): the start noise (N, C, S, S) from which DDIM with eta 0 and
    `steps` steps draws about the glyphs x0 (N, C, S, S) in [0, 1]."""
    ab = schedule(cfg["timesteps"], cfg["schedule"])["alpha_bar"].tolist()
    levels = sorted({0, *timesteps(cfg, "ddim", steps)})
    x = (2 * x0.float() - 1).to(device)
    for a, b in zip(levels, levels[1:]):
        x0_hat, eps = predict(net, cfg, x, a, ab[a], guide, guidance, guide_min_t)
        x = ab[b] ** 0.5 * x0_hat + (1 - ab[b]) ** 0.5 * eps
    return x.cpu()


def morph(net, cfg, xa, xb, frames=16, device="cpu", steps=STEPS, progress=None, guide=None, guidance=1.0,
          guide_min_t=0):
    """(frames, C, S, S) in [0, 1]: glyph xa turning into glyph xb. Both are inverted to their DDIM start noises
    (invert), which are joined along the great circle (data.latent_morph) and decoded with DDIM."""
    za, zb = (invert(net, cfg, x, steps, device, guide, guidance, guide_min_t).flatten(1) for x in (xa, xb))
    z = data.latent_morph(za, zb, frames).view(frames, *xa.shape[1:])
    x = denoise(net, cfg, z.to(device), None, "ddim", steps, 0.0, progress, guide=guide, guidance=guidance,
                guide_min_t=guide_min_t)
    return data.denormalize(x.cpu(), NORM)


if __name__ == "__main__":
    data.cli(main)
