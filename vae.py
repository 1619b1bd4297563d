"""GANji VAE: a ResNet variational autoencoder that learns kanji (or MNIST, CIFAR-10, a folder of images).

    python vae.py                                          # built-in kanji, 64x64, reference width 1.0
    python vae.py --width 0.25 --limit 2000 --epochs 2 --out runs/vae_small
    python vae.py --width 0.25 --limit 2000 --epochs 3 --out runs/vae_small --resume

Encoder: conv -> 7 residual blocks (64 -> 512 channels, 64x64 -> 4x4) -> linear -> (mu, logvar).
Decoder: the mirror image, ending in per-pixel logits. Loss: BCE on the logits summed over pixels
+ beta * KL(q(z|x) || N(0, I)), both per image, averaged over the batch.
Images live in [0, 1] with ink bright ("01"), the range of the Bernoulli likelihood.
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
# on --resume these come from the command line; everything else (architecture, data, seed, lr, beta, ...)
# from the checkpoint's config, so that the continued run is the run that was stopped
RUN_KEYS = ("epochs", "device", "precision", "compile", "channels_last", "out", "resume", "sample_every",
            "log_every", "dry_run", "data_dir")


def get_parser():
    p = argparse.ArgumentParser(description="Train the GANji ResNet VAE.")
    data.add_common_args(p, epochs=100, batch_size=64, lr=1e-3, precision="bf16", sample_every=1,
                         channels_last=False)  # NCHW: 1.14x (width 1) to 1.40x (width 0.25) faster on a CPU
    g = p.add_argument_group("vae")
    g.add_argument("--latent-dim", type=int, default=64, help="size of the latent z (default: %(default)s)")
    g.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (default: %(default)s)")
    g.add_argument("--kl-warmup", type=float, default=0.0,
                   help="epochs over which the KL weight ramps linearly from 0 to --beta; 0 = off "
                        "(default: %(default)s)")
    return p


def config_from_args(args):
    """vars(args) plus the real image size, channels and display inversion of the chosen dataset."""
    cfg = dict(vars(args))
    size0, ch0 = data.NATIVE.get(args.dataset, (64, 1))
    cfg["image_size"] = args.image_size or size0
    cfg["channels"] = args.channels or ch0
    cfg["display_invert"] = args.dataset == "kanji" or (args.dataset not in data.NATIVE and cfg["channels"] == 1)
    cfg["kind"] = KIND
    return cfg


# ----------------------------------------------------------------------------------------------------
# Model

def norm(c):
    # 32 groups, fewer for thin layers so that a group never has fewer than 4 channels
    return nn.GroupNorm(math.gcd(32, c // 4), c)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, conv3x3) twice, plus a skip path.

    resample="down": the first conv has stride 2 and the skip is a 2x2 average pool (H -> H/2).
    resample="up":   the input is first doubled by nearest-neighbour upsampling (H -> 2H).
    A 1x1 conv on the skip path only where the channel count changes.
    """

    def __init__(self, cin, cout, resample=None):
        super().__init__()
        self.up = resample == "up"
        self.norm1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if resample == "down" else 1, padding=1)
        self.norm2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        skip = [nn.AvgPool2d(2)] if resample == "down" else []
        skip += [nn.Conv2d(cin, cout, 1)] if cin != cout else []
        self.skip = nn.Sequential(*skip)  # empty Sequential = identity

    def forward(self, x):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class VAE(nn.Module):
    def __init__(self, image_size=64, channels=1, width=1.0, latent_dim=64):
        super().__init__()
        n_down = int(math.log2(image_size)) - 2  # down to 4x4
        if image_size != 2 ** (n_down + 2) or not 1 <= n_down <= 4:
            raise data.GanjiError(f"the VAE needs --image-size 8, 16, 32 or 64, got {image_size}")
        ch = lambda c: max(8, round(c * width / 8) * 8)  # channel counts stay multiples of 8
        # (in, out, downsample?) for the encoder; 64x64 downsamples in blocks 0, 2, 4, 6; a smaller
        # image skips the first ones (32x32: blocks 0 and 1 both run at 32x32), always ending at 4x4.
        plan = [(64, 64, True), (64, 128, False), (128, 128, True), (128, 256, False),
                (256, 256, True), (256, 512, False), (512, 512, True)]
        down_slots = [i for i, (_, _, d) in enumerate(plan) if d][4 - n_down:]
        plan = [(ch(a), ch(b), i in down_slots) for i, (a, b, _) in enumerate(plan)]
        self.top = top = plan[-1][1]
        self.enc_in = nn.Conv2d(channels, plan[0][0], 3, padding=1)
        self.enc = nn.Sequential(*[ResBlock(a, b, "down" if d else None) for a, b, d in plan])
        self.enc_out = nn.Sequential(norm(top), nn.SiLU(), nn.Flatten(), nn.Linear(top * 16, 2 * latent_dim))
        self.dec_in = nn.Linear(latent_dim, top * 16)
        self.dec = nn.Sequential(*[ResBlock(b, a, "up" if d else None) for a, b, d in reversed(plan)])
        self.dec_out = nn.Sequential(norm(plan[0][0]), nn.SiLU(), nn.Conv2d(plan[0][0], channels, 3, padding=1))

    def encode(self, x):
        """(N, C, S, S) in [0, 1] -> mu, logvar, each (N, latent_dim), in fp32."""
        h = self.enc_out(self.enc(self.enc_in(x)))
        mu, logvar = h.float().chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        """(N, latent_dim) -> per-pixel logits (N, C, S, S)."""
        h = self.dec_in(z).view(-1, self.top, 4, 4)
        return self.dec_out(self.dec(h))

    def forward(self, x):
        """Training pass: logits of a reconstruction from z ~ q(z|x) (reparameterized), mu, logvar."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar


def build(cfg):
    return VAE(cfg["image_size"], cfg["channels"], cfg["width"], cfg["latent_dim"])


def vae_loss(logits, x, mu, logvar, beta):
    """-> (loss, recon, kl), each a per-image sum averaged over the batch. Call it with fp32 tensors.

    recon = BCE(sigmoid(logits), x) summed over pixels; kl = 0.5 * sum(mu^2 + var - 1 - log var).
    """
    n = x.shape[0]
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / n
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum() / n
    return recon + beta * kl, recon, kl


# ----------------------------------------------------------------------------------------------------
# Training step

class Trainer:
    """Model + Adam + autocast; `step` is the whole hot path (bench.py times it)."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, torch.device(device)
        layout = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
        self.model = build(cfg).to(self.device, memory_format=layout)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"])
        self.net = torch.compile(self.model) if cfg["compile"] else self.model
        self.kl_weight = cfg["beta"]  # the training loop lowers it during --kl-warmup

    @property
    def sample_net(self):
        return self.model  # no EMA for the VAE: it samples with the trained weights

    def step(self, x):
        """One Adam step on a normalized batch x (N, C, S, S) in [0, 1]; returns the losses as floats."""
        with data.autocast(self.device, self.cfg["precision"]):
            logits, mu, logvar = self.net(x)
        loss, recon, kl = vae_loss(logits.float(), x.float(), mu, logvar, self.kl_weight)  # fp32 loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        loss, recon, kl = torch.stack([loss, recon, kl]).tolist()  # one device sync
        return {"loss": loss, "recon": recon, "kl": kl}

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, d):
        self.model.load_state_dict(d["model"])
        self.opt.load_state_dict(d["optimizer"])


# ----------------------------------------------------------------------------------------------------
# Sampling API (sample.py, the GUI, evaluate.py)

def load(path, device="cpu"):
    """A checkpoint -> (VAE in eval mode on `device`, config)."""
    ckpt = data.load_checkpoint(path, KIND)
    net = build(ckpt["config"])
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), ckpt["config"]


@torch.no_grad()
def decode(net, z, device="cpu", chunk=256):
    """Latents (N, latent_dim) -> images (N, C, S, S) in [0, 1] on the CPU, decoded `chunk` at a time."""
    return torch.cat([torch.sigmoid(net.decode(part.to(device)).float()).cpu() for part in z.split(chunk)])


@torch.no_grad()
def reconstruct(net, x, device="cpu"):
    """Images (N, C, S, S) in [0, 1] -> their reconstructions through the posterior mean."""
    return decode(net, net.encode(x.to(device))[0], device)


def sample(net, cfg, n, seed=0, device="cpu"):
    """n images (n, C, S, S) in [0, 1], ink bright, decoded from z ~ N(0, I) drawn with its own generator."""
    z = torch.randn(n, cfg["latent_dim"], generator=torch.Generator().manual_seed(seed))
    return decode(net, z, device)


def interpolate(net, cfg, rows, steps, seed=0, device="cpu", spherical=True):
    """rows*steps images (row-major) in [0, 1]: each row morphs between two random latents."""
    z0, z1 = torch.randn(2, rows, cfg["latent_dim"], generator=torch.Generator().manual_seed(seed))
    return decode(net, data.latent_morph(z0, z1, steps, spherical), device)


# ----------------------------------------------------------------------------------------------------
# Training loop

def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    out, ckpt, cfg = data.open_run(KIND, parser, args, RUN_KEYS, config_from_args)
    ckpt_path = os.path.join(out, "ckpt.pt")
    device = data.pick_device(cfg["device"])
    torch.manual_seed(cfg["seed"])  # weight init
    trainer = Trainer(cfg, device)  # before the data: a bad architecture flag fails at once
    ds = data.data_from_args(argparse.Namespace(**cfg))
    os.makedirs(out, exist_ok=True)
    data.write_config(out, cfg)
    log = data.MetricsLog(out)
    epoch, step, batch = 0, 0, 0  # completed epochs, global steps, batches done in the current epoch
    if ckpt:
        trainer.load_state_dict(ckpt)
        epoch, step, batch = ckpt["epoch"], ckpt["step"], ckpt["batch"]
        data.set_rng_state(ckpt["rng"])
    epochs = 1 if cfg["dry_run"] else cfg["epochs"]
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"{KIND}: {n_params / 1e6:.2f} M parameters, {len(ds.images)} images "
          f"{tuple(ds.images.shape[1:])}, {device}, {cfg['precision']}, epoch {epoch}/{epochs}")

    batches = data.Batches(ds.images, cfg["batch_size"], device, NORM, cfg["seed"], cfg["hflip"],
                           cfg["channels_last"])
    # a fixed spread of 32 dataset images for the reconstruction grid
    fixed = data.normalize(ds.images[torch.linspace(0, len(ds.images) - 1, min(32, len(ds.images))).long()], NORM)
    per_epoch = 2 if cfg["dry_run"] else len(batches)

    def save():
        data.atomic_save({"kind": KIND, "version": data.FORMAT_VERSION, "config": cfg, **trainer.state_dict(),
                          "epoch": epoch, "step": step, "batch": batch, "rng": data.rng_state()}, ckpt_path)

    def save_grids():
        net = trainer.sample_net
        data.save_grid(sample(net, cfg, 64, seed=cfg["seed"], device=device),
                       os.path.join(out, f"samples_epoch{epoch:03d}.png"), ds.display_invert)
        recon = reconstruct(net, fixed, device)
        data.save_grid(torch.cat([fixed, recon]), os.path.join(out, f"recon_epoch{epoch:03d}.png"),
                       ds.display_invert)

    from tqdm import tqdm
    try:
        while epoch < epochs:
            sums, seen, t0 = {}, 0, time.perf_counter()
            bar = tqdm(total=per_epoch, initial=batch, desc=f"epoch {epoch + 1}/{epochs}", leave=True)
            t_log, seen_log = t0, 0
            for x in batches.epoch(epoch, start=batch):
                if batch >= per_epoch:
                    break
                if cfg["kl_warmup"] > 0:
                    trainer.kl_weight = cfg["beta"] * min(1.0, (epoch + batch / per_epoch) / cfg["kl_warmup"])
                losses = trainer.step(x)
                if not math.isfinite(losses["loss"]):
                    bar.close()
                    print(f"error: non-finite loss ({losses['loss']}) at epoch {epoch + 1} step {step + 1}; "
                          f"stopping, {ckpt_path} keeps the last good state", file=sys.stderr)
                    sys.exit(1)
                step, batch = step + 1, batch + 1
                seen, seen_log = seen + len(x), seen_log + len(x)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v * len(x)
                ips = seen / (time.perf_counter() - t0)
                bar.set_postfix(**{k: f"{v:.2f}" for k, v in losses.items()}, img_s=f"{ips:.1f}")
                bar.update()
                if step % cfg["log_every"] == 0:
                    now = time.perf_counter()
                    log.write(row="step", epoch=epoch + 1, step=step, **losses, kl_weight=trainer.kl_weight,
                              img_per_s=seen_log / (now - t_log), lr=cfg["lr"])
                    t_log, seen_log = now, 0
            bar.close()
            elapsed = time.perf_counter() - t0
            epoch, batch = epoch + 1, 0
            if seen:
                log.write(row="epoch", epoch=epoch, step=step, **{k: v / seen for k, v in sums.items()},
                          kl_weight=trainer.kl_weight, img_per_s=seen / elapsed, lr=cfg["lr"])
            if epoch % cfg["sample_every"] == 0 or epoch == epochs:
                save_grids()
            save()
    except KeyboardInterrupt:
        save()
        print(f"\ninterrupted: saved {ckpt_path} at epoch {epoch} + {batch} batches; continue with --resume",
              file=sys.stderr)
        sys.exit(130)
    print(f"done: {epoch} epochs, {step} steps; {out}")


if __name__ == "__main__":
    data.cli(main)
