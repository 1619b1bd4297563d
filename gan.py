"""GANji GAN: a ResNet generator and discriminator trained with the relativistic pairing loss and zero-centred
gradient penalties (R3GAN's objective).

    python gan.py --epochs 19 --out runs/gan_30min         # the 30-minute CPU recipe, width 0.25 (docs/gan.md)
    python gan.py --width 1.0                              # the reference architecture, 100 epochs (a GPU job)
    python gan.py --dataset mnist --epochs 20              # MNIST at 32x32
    python gan.py --out runs/gan_30min --resume --epochs 30 --lr-decay-epochs 5

Generator: z (latent_dim) -> linear -> 512 x S/16 x S/16 -> 4 residual up blocks (256, 128, 64, 32 channels,
BatchNorm) -> BN, ReLU, conv3x3, tanh -> image in [-1, 1].
Discriminator: 4 residual down blocks (64, 128, 256, 512 channels, no normalization, so that each score depends
on its own image only, as the gradient penalties assume) -> ReLU, global average pool -> linear -> one score.
Losses: rpgan (default), hinge, wasserstein or non-saturating bce, plus a penalty: --gamma / 2 * (R1 + R2), the
zero-centred ||grad_x D||^2 on reals and fakes (default, lazily every 4th D step), or the original GANji's
--gp * E[(||grad_x D(x_hat)|| - 1)^2] on x_hat = a * real + (1 - a) * fake with one a ~ U(0, 1) per image.
--augment shows D every image translated and cut out (DiffAugment). Samples come from an EMA copy of G.

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

KIND = "gan"
NORM = "11"  # images in [-1, 1], the range of the generator's tanh
# Fewer channels where there are more pixels (as in StyleGAN): about half the FLOPs of a design that kept 128
# channels at the high resolutions, with as many weights (docs/gan.md).
G_CHANNELS = (512, 256, 128, 64, 32)  # the latent tensor, then the output of each of the 4 up blocks
D_CHANNELS = (64, 128, 256, 512)  # the output of each of the 4 down blocks
# the size-dependent defaults, (at --width <= data.WIDE, above it): the CPU recipe, then the reference GAN's
BATCH_SIZE, LR = (16, 64), (1e-3, 2e-4)


# ----------------------------------------------------------------------------------------------------
# Parse

def get_parser():
    p = argparse.ArgumentParser(description="Train the GANji ResNet GAN (relativistic pairing loss + R1/R2 penalties).")
    data.add_common_args(p, epochs=100, batch_size=BATCH_SIZE, lr=LR, doc="docs/gan.md", run_keys=("lr_decay_epochs",))
    g = p.add_argument_group("gan")
    g.add_argument("--latent-dim", type=int, default=128, help="size of the latent z (default: %(default)s)")
    g.add_argument("--loss", default="rpgan", choices=("hinge", "wasserstein", "bce", "rpgan"),
                   help="adversarial loss; bce: non-saturating, rpgan: R3GAN's relativistic pairing "
                        "(default: %(default)s; docs/gan.md)")
    g.add_argument("--penalty", default="r1r2", choices=("gp", "r1r2"),
                   help="r1r2: zero-centred ||grad D||^2 on reals and fakes; gp: WGAN-GP's "
                        "(default: %(default)s; docs/gan.md)")
    g.add_argument("--gp", type=float, default=10.0, help="weight of --penalty gp; 0 = off (default: %(default)s)")
    g.add_argument("--gamma", type=float, default=5.0,
                   help="weight of --penalty r1r2: gamma / 2 * (R1 + R2); 0 = off (default: %(default)s; docs/gan.md)")
    g.add_argument("--penalty-every", type=data.at_least(1), default=4,
                   help="lazy penalty: only every N-th D step, weighted by N (default: %(default)s)")
    g.add_argument("--augment", action="store_true",
                   help="DiffAugment (a translation and a cutout per image) of all D sees (default: off; docs/gan.md)")
    g.add_argument("--mbstd", action="store_true",
                   help="minibatch standard deviation in D (Karras et al. 2018) (default: off; docs/gan.md)")
    g.add_argument("--n-critic", type=data.at_least(1), default=1,
                   help="discriminator steps per generator step, on the same batch (default: %(default)s)")
    g.add_argument("--lr-d", type=float, default=None,
                   help="discriminator learning rate; --lr is the generator's (default: same as --lr)")
    g.add_argument("--lr-decay-epochs", type=data.at_least(0), default=None,
                   help="both learning rates fall linearly to 0 over the last N epochs "
                        "(default: --epochs / 4, rounded; docs/gan.md)")
    g.add_argument("--betas", type=float, nargs=2, default=[0.0, 0.99], metavar=("B1", "B2"),
                   help="Adam betas of the generator (default: 0.0 0.99; docs/gan.md)")
    g.add_argument("--betas-d", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="Adam betas of the discriminator (default: same as --betas)")
    g.add_argument("--ema-kimg", type=float, default=10.0,
                   help="half-life of the EMA of G that draws the samples, in thousands of images; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--ema-rampup", type=float, default=0.05,
                   help="cap the half-life at this fraction of the images seen so far; 0 = no cap "
                        "(default: %(default)s)")
    return p


def recipe(args):
    """The defaults that depend on other flags, for what neither the command line nor a checkpoint gave (a fresh
    run's flags; on --resume and with --init-from the checkpoint's): -> args with concrete numbers."""
    data.by_width(args, batch_size=BATCH_SIZE, lr=LR)
    if args.lr_decay_epochs is None:  # a run setting: on --resume the run's value
        args.lr_decay_epochs = round(args.epochs / 4)  # the last quarter cools down
    return args


# ----------------------------------------------------------------------------------------------------
# Data

def config_from_args(args, ds=None):
    """vars(args) with the recipe's defaults filled in, plus what the dataset decides (real size, channels, display),
    the steps per epoch and the resolved D optimizer settings."""
    args = recipe(args)
    ds = ds if ds is not None else data.data_from_args(args)
    n, c, s = ds.images.shape[:3]
    if s % 16 or s < 32:
        raise data.GanjiError(f"the GAN needs an --image-size that is a multiple of 16 and at least 32, got {s}")
    if not 0 <= args.lr_decay_epochs <= args.epochs:
        raise data.GanjiError(f"--lr-decay-epochs must be between 0 and --epochs ({args.epochs}), "
                              f"got {args.lr_decay_epochs}")
    return {**vars(args), "kind": KIND, "image_size": s, "channels": c, "display_invert": ds.display_invert,
            "n_images": n, "steps_per_epoch": data.steps_per_epoch(n, args.batch_size),
            "lr_d": args.lr if args.lr_d is None else args.lr_d,
            "betas_d": args.betas if args.betas_d is None else args.betas_d}


# ----------------------------------------------------------------------------------------------------
# Model

def scaled(channels, width):
    return [max(4, round(c * width)) for c in channels]


def xavier(layer, gain=1.0):
    """Xavier-uniform weights, zero bias. Gain sqrt(2) for the 3x3 convs that feed a ReLU, 1 elsewhere.

    PyTorch's default init (gain ~1/sqrt(3)) shrinks the signal block after block: G's samples then start
    nearly alike and the GAN collapses to one image within a few dozen steps (measured on kanji, docs/gan.md).
    """
    nn.init.xavier_uniform_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class UpBlock(nn.Module):
    """(N, cin, H, W) -> (N, cout, 2H, 2W): BN, ReLU, upsample, conv3x3, BN, ReLU, conv3x3 + upsampled skip."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = xavier(nn.Conv2d(cin, cout, 3, padding=1, bias=False), math.sqrt(2))  # bn2 cancels a bias
        self.conv2 = xavier(nn.Conv2d(cout, cout, 3, padding=1), math.sqrt(2))
        self.skip = xavier(nn.Conv2d(cin, cout, 1)) if cin != cout else nn.Identity()

    def forward(self, x):
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        # a 1x1 conv commutes with nearest upsampling: run it at the low resolution, 4x cheaper
        return h + F.interpolate(self.skip(x), scale_factor=2, mode="nearest")


class DownBlock(nn.Module):
    """(N, cin, H, W) -> (N, cout, H/2, W/2): ReLU, conv3x3, ReLU, conv3x3, avg-pool + pooled skip.

    No normalization: with BatchNorm a score would depend on the other images of the batch, and the
    per-sample gradient the penalty constrains would no longer be that of a function of one image.
    """

    def __init__(self, cin, cout, first=False):
        super().__init__()
        self.first = first  # the first block sees the image itself: no ReLU that would drop its negative half
        self.conv1 = xavier(nn.Conv2d(cin, cout, 3, padding=1), math.sqrt(2))
        self.conv2 = xavier(nn.Conv2d(cout, cout, 3, padding=1), math.sqrt(2))
        self.skip = xavier(nn.Conv2d(cin, cout, 1)) if cin != cout else nn.Identity()

    def forward(self, x):
        h = x if self.first else F.relu(x)
        h = conv3x3_pool(F.relu(self.conv1(h)), self.conv2)
        return h + self.skip(F.avg_pool2d(x, 2))  # pool first: the 1x1 conv then runs on 4x fewer pixels


def conv3x3_pool(x, conv):
    """F.avg_pool2d(conv(x), 2) for a 3x3 conv (padding 1), computed as ONE stride-2 4x4 conv.

    Each output pixel averages the 3x3 kernel over a 2x2 window: that is the 3x3 kernel summed at the 4
    shifts into a 4x4 one, divided by 4. Same result, 16 instead of 36 multiply-adds per output, and no
    full-resolution tensor to keep for backward: the D+G step with its double backward runs faster (docs/bench.md)."""
    w = conv.weight  # (cout, cin, 3, 3)
    w = (F.pad(w, (0, 1, 0, 1)) + F.pad(w, (1, 0, 0, 1)) + F.pad(w, (0, 1, 1, 0)) + F.pad(w, (1, 0, 1, 0))) / 4
    return F.conv2d(x, w, conv.bias, stride=2, padding=1)


class Generator(nn.Module):
    def __init__(self, latent_dim=128, channels=1, image_size=64, width=1.0):
        super().__init__()
        ch = scaled(G_CHANNELS, width)
        self.start = image_size // 16  # 4 up blocks double the side 4 times: 4x4 for 64x64, 2x2 for 32x32
        self.fc = xavier(nn.Linear(latent_dim, ch[0] * self.start ** 2))
        self.blocks = nn.Sequential(*[UpBlock(a, b) for a, b in zip(ch, ch[1:])])
        self.bn = nn.BatchNorm2d(ch[-1])
        self.out = xavier(nn.Conv2d(ch[-1], channels, 3, padding=1))

    def forward(self, z):
        """(N, latent_dim) -> (N, C, S, S) in [-1, 1]."""
        h = self.fc(z).view(z.shape[0], -1, self.start, self.start)
        return torch.tanh(self.out(F.relu(self.bn(self.blocks(h)))))


def minibatch_std(h, group=4):
    """(N, C, H, W) features -> (N, 1): for each group of `group` consecutive images (gcd(group, N) where N is not a
    multiple), the standard deviation of every feature across the group, averaged over features and positions
    (Karras et al. 2018, "Progressive growing of GANs", section 3). Identical images give 0."""
    n = h.shape[0]
    g = math.gcd(group, n)
    std = (h.float().reshape(n // g, g, -1).var(1, unbiased=False) + 1e-8).sqrt().mean(1)  # (N/g,)
    return std.repeat_interleave(g)[:, None].to(h.dtype)


class Discriminator(nn.Module):
    def __init__(self, channels=1, width=1.0, mbstd=False):
        super().__init__()
        ch = scaled(D_CHANNELS, width)
        self.blocks = nn.Sequential(*[DownBlock(a, b, first=i == 0)
                                      for i, (a, b) in enumerate(zip([channels] + ch, ch))])
        self.mbstd = mbstd
        self.fc = xavier(nn.Linear(ch[-1] + mbstd, 1))  # one more input with --mbstd

    def forward(self, x):
        """(N, C, S, S) -> (N,) unbounded scores, high = real."""
        h = F.relu(self.blocks(x))
        pooled = h.mean((2, 3))  # global average pool: the same head for any image size
        if self.mbstd:
            pooled = torch.cat([pooled, minibatch_std(h)], 1)
        return self.fc(pooled).squeeze(1)


def build(cfg):
    """(generator, discriminator) from a config."""
    return (Generator(cfg["latent_dim"], cfg["channels"], cfg["image_size"], cfg["width"]),
            Discriminator(cfg["channels"], cfg["width"], cfg.get("mbstd", False)))  # older configs: no mbstd


def layout(cfg):
    return torch.channels_last if cfg["channels_last"] else torch.contiguous_format


# ----------------------------------------------------------------------------------------------------
# Model, part 2: losses, penalties, augmentation, EMA (module level so the tests check them on fixed numbers)

def d_loss(loss, real, fake):
    """Discriminator loss from its scores (N,) on real and on fake images, averaged over the batch."""
    if loss == "hinge":  # push real scores above +1 and fake ones below -1
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if loss == "wasserstein":
        return fake.mean() - real.mean()
    if loss == "bce":  # -log sigmoid(real) - log(1 - sigmoid(fake))
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if loss == "rpgan":  # relativistic pairing: -log sigmoid(real_i - fake_i), image i of each batch paired
        return F.softplus(fake - real).mean()
    raise ValueError(f"unknown loss {loss!r}")


def g_loss(loss, fake, real=None):
    """Generator loss from the discriminator's scores (N,) on its fakes (and, for rpgan, on the paired reals)."""
    if loss == "bce":  # non-saturating: -log sigmoid(fake), strong gradients while D wins
        return F.softplus(-fake).mean()
    if loss in ("hinge", "wasserstein"):
        return -fake.mean()
    if loss == "rpgan":  # -log sigmoid(fake_i - real_i)
        return F.softplus(real - fake).mean()
    raise ValueError(f"unknown loss {loss!r}")


def interpolates(real, fake):
    """Random points between real and fake: a * real + (1 - a) * fake with ONE a ~ U(0, 1) per image.

    -> (x_hat (N, C, H, W), a (N, 1, 1, 1)). A weight per pixel would give points on no real-fake line.
    """
    # drawn for the global batch, this rank's rows kept (data.shard): under torchrun as one process draws it
    a = data.shard(torch.rand(real.shape[0] * data.world_size(), 1, 1, 1, device=real.device))
    return torch.lerp(fake, real, a), a


def gradient_penalty(D, real, fake):
    """E[(||grad_x D(x_hat)|| - 1)^2] over the batch. create_graph=True so that the penalty's own gradient
    reaches D's weights (a double backward).

    Runs in the caller's autocast: under bf16 the convolutions of all three passes (forward, input gradient,
    double backward) run in bf16, which carries the same exponent range as fp32 (no loss scaling needed);
    the gradient itself, its norm and the penalty are fp32.
    """
    x = interpolates(real.detach().float(), fake.detach().float())[0].requires_grad_(True)
    score = D(x).float()
    grad, = torch.autograd.grad(score.sum(), x, create_graph=True)  # D(x_i) depends on x_i only; fp32 like x
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def zero_centred_penalty(D, x):
    """E[||grad_x D(x)||^2] at the images x themselves: R1 on reals, R2 on fakes (Mescheder et al. 2018, "Which
    training methods for GANs do actually converge?"; R3GAN, Huang et al. 2024). A double backward, like the gp."""
    x = x.detach().float().requires_grad_(True)
    grad, = torch.autograd.grad(D(x).float().sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def penalty_scale(d_step, every):
    """Lazy regularization (StyleGAN2): the penalty runs on every `every`-th D step only, weighted by `every`,
    so its average weight per step stays the same. d_step counts D steps from 0."""
    return every if d_step % every == 0 else 0


def augment(x, fill=-1.0):
    """DiffAugment (Zhao et al. 2020) for glyphs, drawn independently for each image: a translation by up to 1/8
    of the side, then a cutout of a square half the side; uncovered and cut pixels become paper (fill, -1 in
    [-1, 1]). Gathers and masks only, so it is differentiable in x and G learns through it. (N, C, H, W) -> same."""
    n, c, h, w = x.shape
    dev = x.device
    N = n * data.world_size()  # draws for the global batch, this rank's n kept (data.shard), as one process draws
    shift = data.shard(torch.randint(-(h // 8), h // 8 + 1, (2, N, 1, 1), device=dev), dim=1)  # (dy, dx) per image
    ys = torch.arange(h, device=dev).view(1, h, 1) - shift[0]  # the source row of every output pixel
    xs = torch.arange(w, device=dev).view(1, 1, w) - shift[1]
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)  # (N, H, W)
    idx = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).flatten(1)  # (N, H*W)
    moved = x.flatten(2).gather(2, idx[:, None].expand(-1, c, -1)).view(n, c, h, w)
    centre = data.shard(torch.randint(0, h, (2, N, 1, 1), device=dev), dim=1)
    cut = ((torch.arange(h, device=dev).view(1, h, 1) - centre[0]).abs() < h // 4) & \
        ((torch.arange(w, device=dev).view(1, 1, w) - centre[1]).abs() < w // 4)
    return torch.where((inside & ~cut)[:, None], moved, torch.full_like(moved, fill))


def ema_decay(images_seen, batch_size, kimg, rampup):
    """The per-step decay of an EMA whose half-life is kimg * 1000 images, capped at rampup * images_seen
    (StyleGAN2-ADA, Karras et al. 2020): after half_life / batch_size steps a weight's share has halved."""
    half_life = kimg * 1000
    if rampup:
        half_life = min(half_life, rampup * images_seen)
    return 0.5 ** (batch_size / max(half_life, 1e-8))


@torch.no_grad()
def ema_update(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * net for the weights; buffers (BN statistics) are copied."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def lr_scale(step, total, decay):
    """The factor on both learning rates at 0-based step `step` < `total`: 1, then over the last `decay` steps a
    linear fall, (total - step) / decay, to 1 / decay at the last step. A pure function of the step: --resume is
    exact."""
    return 1.0 if decay <= 0 else min(1.0, (total - step) / decay)


# ----------------------------------------------------------------------------------------------------
# Step

class Trainer:
    """G, D, their Adam optimizers and the EMA of G; `step` is the whole hot path (bench.py times it)."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, torch.device(device)
        self.G, self.D = (m.to(self.device, memory_format=layout(cfg)) for m in build(cfg))
        # under torchrun on GPUs BatchNorm over the global batch, as on one GPU; a CPU rank normalizes its own share
        if self.device.type == "cuda" and data.world_size() > 1:  # (docs/torchrun.md)
            self.G = nn.SyncBatchNorm.convert_sync_batchnorm(self.G)
        # compiled views for the forward passes; the penalty's double backward runs on the plain D
        # (torch.compile does not support create_graph=True), state_dicts come from the plain modules
        self.G_fwd, self.D_fwd = (torch.compile(m) if cfg["compile"] else m for m in (self.G, self.D))
        # under torchrun DDP averages G's gradients; D's are averaged in step() by one all_reduce of our own, because
        # DDP's hooks do not support the double backward (create_graph=True) of D's penalty
        self.G_fwd = data.ddp(self.G_fwd, self.device)
        # the EMA copy stays in eval mode for good: sampling from it never touches G's train/eval state
        self.ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg["ema_kimg"] > 0 else None
        self.optimizer_g = torch.optim.Adam(self.G.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]))
        self.optimizer_d = torch.optim.Adam(self.D.parameters(), lr=cfg["lr_d"], betas=tuple(cfg["betas_d"]))
        self.step_count, self.lr, self.lr_d = 0, cfg["lr"], cfg["lr_d"]

    @property
    def sample_net(self):
        return self.ema if self.ema is not None else self.G

    def autocast(self):
        return data.autocast(self.device, self.cfg["precision"])

    def penalty(self, real, fake, d_step):
        """The weighted penalty term of the D loss at this D step (0 when off, or skipped by --penalty-every)."""
        cfg = self.cfg
        weight = cfg["gp"] if cfg["penalty"] == "gp" else cfg["gamma"] / 2
        scale = penalty_scale(d_step, cfg["penalty_every"]) * weight
        if scale == 0:
            return torch.zeros((), device=self.device)
        with self.autocast():
            if cfg["penalty"] == "gp":
                return scale * gradient_penalty(self.D, real, fake)
            return scale * (zero_centred_penalty(self.D, real) + zero_centred_penalty(self.D, fake))

    def step(self, x):
        """n_critic D steps and one G step on a normalized batch x (N, C, S, S) in [-1, 1] -> losses as floats."""
        cfg, n = self.cfg, x.shape[0]
        per_epoch = cfg["steps_per_epoch"]
        scale = lr_scale(self.step_count, cfg["epochs"] * per_epoch, cfg["lr_decay_epochs"] * per_epoch)
        self.lr, self.lr_d = cfg["lr"] * scale, cfg["lr_d"] * scale
        for optimizer, lr in ((self.optimizer_g, self.lr), (self.optimizer_d, self.lr_d)):
            for group in optimizer.param_groups:
                group["lr"] = lr
        seen = augment if cfg["augment"] else (lambda images: images)  # what D sees of an image
        for i in range(cfg["n_critic"]):
            # z of the global batch, this rank's rows kept (data.shard): under torchrun as one process draws it
            z = data.shard(torch.randn(n * data.world_size(), cfg["latent_dim"], device=self.device))
            last = i == cfg["n_critic"] - 1  # the last batch of fakes is reused by the G step below
            with torch.set_grad_enabled(last), self.autocast():
                fake = self.G_fwd(z)
            real_in, fake_in = seen(x), seen(fake.detach().to(x.dtype))
            with self.autocast():  # one D pass over real and fake together (D has no batch statistics)
                real_s, fake_s = self.D_fwd(torch.cat([real_in, fake_in])).float().split(n)
            loss_d = d_loss(cfg["loss"], real_s, fake_s)
            penalty = self.penalty(real_in, fake_in, self.step_count * cfg["n_critic"] + i)
            total = data.mean_over_ranks((loss_d + penalty).detach())  # the global batch's (all ranks alike)
            if not torch.isfinite(total):  # leave the weights as they were; the loop stops the run
                return {"loss_d": total.item()}
            self.optimizer_d.zero_grad(set_to_none=True)
            (loss_d + penalty).backward()
            data.average_gradients(self.D.parameters())  # under torchrun: the global batch's mean loss's gradient
            self.optimizer_d.step()

        self.D.requires_grad_(False)  # the G step needs D's input gradient only, not its weight gradients
        with self.autocast():  # the updated D scores the same fakes (and, for rpgan, their paired reals again)
            real_g = self.D_fwd(seen(x)).float() if cfg["loss"] == "rpgan" else None
            loss_g = g_loss(cfg["loss"], self.D_fwd(seen(fake)).float(), real_g)
        self.optimizer_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.optimizer_g.step()
        self.D.requires_grad_(True)

        self.step_count += 1
        if self.ema is not None:
            b = cfg["batch_size"]  # images seen counted in full (global) batches
            ema_update(self.ema, self.G, ema_decay(self.step_count * b, b, cfg["ema_kimg"], cfg["ema_rampup"]))
        vals = torch.stack([loss_d, loss_g, penalty, real_s.mean(), fake_s.mean()]).detach()
        vals = data.mean_over_ranks(vals).tolist()  # the global batch's means; one device sync
        return dict(zip(("loss_d", "loss_g", "penalty", "d_real", "d_fake"), vals))

    def state_dict(self):
        return {"G": self.G.state_dict(), "D": self.D.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer_g": self.optimizer_g.state_dict(), "optimizer_d": self.optimizer_d.state_dict(),
                "step": self.step_count}

    def init_from(self, src, path):
        """--init-from: G and its EMA start from src's sampling weights, D from src's D where src has one (a slim
        file keeps only G, so D starts from scratch); both Adams start fresh."""
        for module in (self.G, self.ema) if self.ema is not None else (self.G,):
            data.load_weights(module, sampling_weights(src), path)
        if "D" in src:
            data.load_weights(self.D, src["D"], path)

    def load_state_dict(self, d):
        self.G.load_state_dict(d["G"])
        self.D.load_state_dict(d["D"])
        if self.ema is not None:
            self.ema.load_state_dict(d["ema"])
        self.optimizer_g.load_state_dict(d["optimizer_g"])
        self.optimizer_d.load_state_dict(d["optimizer_d"])
        self.step_count = d["step"]


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
    n_g, n_d = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (trainer.G, trainer.D))
    if rank == 0:
        print(f"{KIND}: G {n_g:.2f} M + D {n_d:.2f} M parameters, {len(ds.images)} images "
              f"{tuple(ds.images.shape[1:])}, {device}{f' x {world} processes' if world > 1 else ''}, "
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
                if not all(math.isfinite(v) for v in losses.values()):
                    bar.close()
                    data.exit_all(f"error: non-finite loss ({', '.join(f'{k}={v:.4g}' for k, v in losses.items())}) "
                                  f"at epoch {epoch + 1} step {trainer.step_count + 1}; stopped, {ckpt_path} keeps "
                                  "the last good state")
                batch, seen = batch + 1, seen + len(x) * world  # images of the global batch
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v * len(x) * world
                img_s = seen / (time.perf_counter() - t0)
                bar.set_postfix(d=f"{losses['loss_d']:.3f}", g=f"{losses['loss_g']:.3f}",
                                pen=f"{losses['penalty']:.3f}", img_s=f"{img_s:.1f}")
                bar.update()
                if trainer.step_count % cfg["log_every"] == 0 and rank == 0:
                    log.write(row="step", epoch=epoch + 1, step=trainer.step_count, **losses, img_per_s=img_s,
                              lr=trainer.lr, lr_d=trainer.lr_d)
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
                          img_per_s=seen / (time.perf_counter() - t0), lr=trainer.lr, lr_d=trainer.lr_d)
                print(f"epoch {epoch}/{epochs}: loss_d {sums['loss_d'] / seen:.3f}, "
                      f"loss_g {sums['loss_g'] / seen:.3f}, step {trainer.step_count}")
            if epoch % cfg["sample_every"] == 0 or epoch == epochs:  # the same fixed latents every time
                data.save_grid(sample(trainer.sample_net, cfg, 64, seed=cfg["seed"], device=device),
                               os.path.join(out, f"samples_epoch{epoch:03d}.png"), cfg["display_invert"])
            if cfg["eval_every"] and epoch % cfg["eval_every"] == 0:
                n = min(1000, len(ds.images))  # samples the FID is measured on
                fake = sample(trainer.sample_net, cfg, n, seed=cfg["seed"] + 1, device=device)
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
    """A checkpoint (full or slim) -> (generator with the EMA weights where there are some, eval mode, config)."""
    ckpt = data.load_checkpoint(path, KIND)
    cfg = ckpt["config"]
    G, _ = build(cfg)
    G.load_state_dict(sampling_weights(ckpt))  # a slim file's bf16 weights are copied into fp32 parameters
    return G.to(device, memory_format=layout(cfg)).eval(), cfg  # the layout of training: the very same numbers


def sampling_weights(ckpt):
    """The state_dict that draws samples: a slim file's, else the EMA generator's, else the generator's."""
    return ckpt.get("sample_net") or (ckpt["ema"] if ckpt["ema"] is not None else ckpt["G"])


# ----------------------------------------------------------------------------------------------------
# Sampling API (sample.py, the GUI, evaluate.py)

@torch.no_grad()
def generate(net, z, device="cpu", chunk=256):
    """Latents (N, latent_dim) -> images (N, C, S, S) in [0, 1] on the CPU, `chunk` at a time.

    The net runs in eval mode (BatchNorm uses its running statistics and updates nothing); every
    module's train/eval flag is put back afterwards, so drawing a grid mid-training changes nothing.
    """
    device = torch.device(device)
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with data.autocast(device):
            return torch.cat([data.denormalize(net(part.to(device)), NORM).cpu() for part in z.split(chunk)])
    finally:
        for m, training in modes:
            m.training = training


def sample(net, cfg, n, seed=0, device="cpu"):
    """n images (n, C, S, S) in [0, 1], ink bright, from z ~ N(0, I) drawn with its own generator."""
    z = torch.randn(n, cfg["latent_dim"], generator=torch.Generator().manual_seed(seed))
    return generate(net, z, device)


def interpolate(net, cfg, rows, frames, seed=0, device="cpu", spherical=True):
    """rows * frames images (row-major) in [0, 1]: each row morphs between two random latents."""
    z0, z1 = torch.randn(2, rows, cfg["latent_dim"], generator=torch.Generator().manual_seed(seed))
    return generate(net, data.latent_morph(z0, z1, frames, spherical), device)


if __name__ == "__main__":
    data.cli(main)
