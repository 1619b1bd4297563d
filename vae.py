"""GANji VAE: a ResNet variational autoencoder that learns kanji (or MNIST, CIFAR-10, a folder of images).

    python vae.py                                          # built-in kanji, 64x64, width 0.25, 100 epochs
    python vae.py --width 1.0                              # the reference architecture (a GPU job)
    python vae.py --limit 2000 --epochs 2 --out runs/vae_small
    python vae.py --out runs/vae_small --resume --epochs 3

Encoder: conv -> 7 residual blocks (64 -> 512 channels, 64x64 -> 4x4) -> linear -> (mu, logvar).
Decoder: the mirror image, ending in per-pixel logits. Loss: BCE on the logits summed over pixels
+ beta * KL(q(z|x) || N(0, I)) (beta 0.1 by default), both per image, averaged over the batch.
Sampling decodes z from a Gaussian mixture fitted after every epoch to the posterior means of the training images
(--prior gmm, the default): an ex-post density (Ghosh et al. 2020), which puts z where the decoder was trained
instead of in the holes N(0, I) leaves between the encodings; or from N(0, I) (--prior normal).
Images live in [0, 1] with ink bright ("01"), the range of the Bernoulli likelihood.

The file reads top to bottom like the other two scripts: parse -> data -> model -> step -> loop ->
checkpoint -> sampling API.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

KIND = "vae"
NORM = "01"


# ----------------------------------------------------------------------------------------------------
# Parse

def get_parser():
    p = argparse.ArgumentParser(description="Train the GANji ResNet VAE.")
    # channels_last: faster in fp32 on a CPU; in bf16 on one with AVX-512 BF16 NCHW was faster, so a bf16 run there
    # passes --no-channels-last (measured with bench.py, docs/bench.md)
    data.add_common_args(p, epochs=100, batch_size=64, lr=1e-3)
    g = p.add_argument_group("vae")
    g.add_argument("--latent-dim", type=int, default=64, help="size of the latent z (default: %(default)s)")
    # beta 0.1 with --prior gmm scored best among 0.1, 0.25 and 1, and each beta better with the mixture than with
    # N(0, I) (measured with evaluate.py, docs/vae.md)
    g.add_argument("--beta", type=float, default=0.1,
                   help="weight of the KL term (default: %(default)s; docs/vae.md)")
    g.add_argument("--kl-warmup", type=float, default=0.0,
                   help="epochs over which the KL weight ramps linearly from 0 to --beta; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--free-bits", type=float, default=0.0,
                   help="nats of KL per latent dimension left unpenalised (Kingma et al. 2016); 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--prior", default="gmm", choices=("normal", "gmm"),
                   help="samples decode z ~ N(0, I), or a mixture fitted to the posterior means "
                        "(default: %(default)s; docs/vae.md)")
    g.add_argument("--gmm-components", type=data.at_least(1), default=10,
                   help="components of the --prior gmm mixture, full covariance (default: %(default)s)")
    return p


# ----------------------------------------------------------------------------------------------------
# Data

def config_from_args(args, ds=None):
    """vars(args) plus what the dataset decides (real size, channels, display) and the steps per epoch."""
    ds = ds if ds is not None else data.data_from_args(args)
    n, c, s = ds.images.shape[:3]
    return {**vars(args), "kind": KIND, "image_size": s, "channels": c, "display_invert": ds.display_invert,
            "n_images": n, "steps_per_epoch": data.steps_per_epoch(n, args.batch_size)}


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
    def __init__(self, image_size=64, channels=1, width=1.0, latent_dim=64, gmm_components=0):
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
        # the --prior gmm mixture (fit_prior): log weights (K,), means (K, D), Cholesky factors of the
        # covariances (K, D, D); buffers, so checkpoints and slim files carry it. All zeros = not fitted yet;
        # None (no state_dict entry) without --prior gmm.
        k, d = gmm_components, latent_dim
        self.register_buffer("gmm_logw", torch.zeros(k) if k else None)
        self.register_buffer("gmm_mean", torch.zeros(k, d) if k else None)
        self.register_buffer("gmm_tril", torch.zeros(k, d, d) if k else None)

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
        """Training pass: logits of a reconstruction from z ~ q(z|x) (reparameterized), mu, logvar.
        Under torchrun eps is this rank's rows of a draw for the global batch (data.shard)."""
        mu, logvar = self.encode(x)
        eps = data.shard(torch.randn(len(mu) * data.world_size(), mu.shape[1], device=mu.device))  # (N, latent_dim)
        z = mu + eps * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar


def build(cfg):
    # older configs have no prior key; a tiny dataset cannot fill more components than it has images
    k = min(cfg["gmm_components"], cfg["n_images"]) if cfg.get("prior", "normal") == "gmm" else 0
    return VAE(cfg["image_size"], cfg["channels"], cfg["width"], cfg["latent_dim"], k)


def layout(cfg):
    return torch.channels_last if cfg["channels_last"] else torch.contiguous_format


def vae_loss(logits, x, mu, logvar, beta, free_bits=0.0):
    """-> (loss, recon, kl), each a per-image sum averaged over the batch. Call it with fp32 tensors.

    recon = BCE(sigmoid(logits), x) summed over pixels; kl = 0.5 * sum(mu^2 + var - 1 - log var).
    free_bits λ > 0: the loss counts each latent dimension's batch-mean KL as at least λ nats (Kingma et al. 2016,
    IAF, "free bits"), so no gradient pushes a dimension below λ; the returned kl is the true one.
    """
    n = x.shape[0]
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / n
    kl_dims = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(0) / n  # (latent_dim,)
    kl_loss = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl_dims.sum()
    return recon + beta * kl_loss, recon, kl_dims.sum()


# ----------------------------------------------------------------------------------------------------
# Step

class Trainer:
    """The network and Adam; `step` is one training step on a normalized batch (bench.py times it)."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, torch.device(device)
        self.net = build(cfg).to(self.device, memory_format=layout(cfg))
        self.net_fwd = data.ddp(torch.compile(self.net) if cfg["compile"] else self.net, self.device)
        self.ema = None  # no EMA for the VAE: it samples with the trained weights
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg["lr"])
        self.step_count, self.lr = 0, cfg["lr"]

    @property
    def sample_net(self):
        return self.net

    def kl_weight(self):
        """beta, ramped linearly from 0 over the first --kl-warmup epochs (a pure function of the step)."""
        warmup_steps = self.cfg["kl_warmup"] * self.cfg["steps_per_epoch"]
        return self.cfg["beta"] * (min(1.0, self.step_count / warmup_steps) if warmup_steps > 0 else 1.0)

    def step(self, x):
        """One Adam step on x (N, C, S, S) in [0, 1]; returns the losses as floats."""
        kl_weight = self.kl_weight()
        with data.autocast(self.device, self.cfg["precision"]):
            logits, mu, logvar = self.net_fwd(x)
        loss, recon, kl = vae_loss(logits.float(), x.float(), mu, logvar, kl_weight,
                                   self.cfg["free_bits"])  # fp32 loss
        means = data.mean_over_ranks(torch.stack([loss, recon, kl]).detach())  # the global batch's (all ranks alike)
        if not torch.isfinite(means[0]):  # leave the weights as they were; the loop stops the run
            return {"loss": means[0].item()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under torchrun DDP averages the gradients: those of the global batch's mean loss
        self.optimizer.step()
        self.step_count += 1
        loss, recon, kl = means.tolist()  # one device sync
        return {"loss": loss, "recon": recon, "kl": kl, "kl_weight": kl_weight}

    def state_dict(self):
        return {"net": self.net.state_dict(), "ema": None, "optimizer": self.optimizer.state_dict(),
                "step": self.step_count}

    def init_from(self, src, path):
        """--init-from: the network starts from src's weights; Adam starts fresh."""
        data.load_weights(self.net, sampling_weights(src), path)

    def load_state_dict(self, d):
        self.net.load_state_dict(d["net"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.step_count = d["step"]


# ----------------------------------------------------------------------------------------------------
# Loop

def main(argv=None):
    args, ckpt = data.open_run(get_parser(), argv, KIND)
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
    # a fixed spread of 32 dataset images for the reconstruction grid
    fixed = data.normalize(ds.images[torch.linspace(0, len(ds.images) - 1, min(32, len(ds.images))).long()], NORM)
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
                bar.set_postfix(loss=f"{losses['loss']:.1f}", kl=f"{losses['kl']:.1f}", img_s=f"{img_s:.1f}")
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
                print(f"epoch {epoch}/{epochs}: loss {sums['loss'] / seen:.2f}, step {trainer.step_count}")
            if cfg["prior"] == "gmm":  # before the grids and FID, which sample from it
                fit_prior(trainer.net, ds.images, cfg, device)
            if epoch % cfg["sample_every"] == 0 or epoch == epochs:
                save_grids(trainer.sample_net, cfg, fixed, device, epoch)
            if cfg["eval_every"] and epoch % cfg["eval_every"] == 0:
                n = min(1000, len(ds.images))  # samples the FID is measured on
                fake = sample(trainer.sample_net, cfg, n, seed=cfg["seed"] + 1, device=device)
                log.write(row="eval", epoch=epoch, step=trainer.step_count, **evaluate.fid_kid(fake, ref))
            save()  # before the picture: a checkpoint never waits on a plot
            data.keep_copy(ckpt_path, epoch, cfg["keep_every"])
            data.plot_curves(log.path, os.path.join(out, "curves.png"))
    if rank == 0:
        print(f"done: {epoch} epochs, {trainer.step_count} steps; {out}")


def save_grids(net, cfg, fixed, device, epoch):
    """Samples from the fixed seed, and the fixed images above their reconstructions."""
    data.save_grid(sample(net, cfg, 64, seed=cfg["seed"], device=device),
                   os.path.join(cfg["out"], f"samples_epoch{epoch:03d}.png"), cfg["display_invert"])
    recon = reconstruct(net, fixed, device)
    data.save_grid(torch.cat([fixed, recon]), os.path.join(cfg["out"], f"recon_epoch{epoch:03d}.png"),
                   cfg["display_invert"])


# ----------------------------------------------------------------------------------------------------
# Checkpoint

def save_checkpoint(path, trainer, epoch, batch, train_seconds):
    """The self-describing checkpoint. epoch: completed epochs; batch: batches done in the epoch under way."""
    data.atomic_save({"kind": KIND, "version": data.FORMAT_VERSION, "config": trainer.cfg, **trainer.state_dict(),
                      "epoch": epoch, "batch": batch, "train_seconds": train_seconds,
                      "machine": data.machines(trainer.cfg.get("machine_before"), data.machine(trainer.device)),
                      "rng": data.rng_state()}, path)


def load(path, device="cpu"):
    """A checkpoint (full or slim) -> (VAE in eval mode on `device`, config)."""
    ckpt = data.load_checkpoint(path, KIND)
    cfg = ckpt["config"]
    net = build(cfg)
    net.load_state_dict(sampling_weights(ckpt))  # a slim file's bf16 weights are copied into fp32 parameters
    return net.to(device, memory_format=layout(cfg)).eval(), cfg


def sampling_weights(ckpt):
    """The state_dict that draws samples: a slim file's, else the trained network's."""
    return ckpt.get("sample_net") or ckpt["net"]


# ----------------------------------------------------------------------------------------------------
# Sampling API (sample.py, the GUI, evaluate.py)

@torch.no_grad()
def decode(net, z, device="cpu", chunk=256):
    """Latents (N, latent_dim) -> images (N, C, S, S) in [0, 1] on the CPU, decoded `chunk` at a time."""
    device = torch.device(device)
    with data.autocast(device):
        return torch.cat([torch.sigmoid(net.decode(part.to(device)).float()).cpu() for part in z.split(chunk)])


@torch.no_grad()
def reconstruct(net, x, device="cpu"):
    """Images (N, C, S, S) in [0, 1] -> their reconstructions through the posterior mean."""
    return decode(net, net.encode(x.to(device))[0], device)


@torch.no_grad()
def fit_prior(net, images, cfg, device, chunk=256):
    """Fit the --prior gmm mixture into net's buffers: EM (scikit-learn's GaussianMixture, k-means start, seeded)
    on the posterior means of `images` (N, C, S, S) uint8. Deterministic for the same weights, images and seed."""
    from sklearn.mixture import GaussianMixture

    with data.autocast(torch.device(device), cfg["precision"]):
        mu = torch.cat([net.encode(data.normalize(part, NORM).to(device, memory_format=layout(cfg)))[0].cpu()
                        for part in images.split(chunk)]).double()  # (N, latent_dim)
    gm = GaussianMixture(len(net.gmm_logw), covariance_type="full", random_state=cfg["seed"]).fit(mu.numpy())
    net.gmm_logw.copy_(torch.from_numpy(gm.weights_).log())
    net.gmm_mean.copy_(torch.from_numpy(gm.means_))
    net.gmm_tril.copy_(torch.linalg.cholesky(torch.from_numpy(gm.covariances_)))


def draw_latents(net, cfg, n, g, prior=None):
    """(n, latent_dim) latents from the prior (None: the run's --prior), drawn with generator g on the CPU."""
    prior = prior or cfg.get("prior", "normal")
    if prior == "normal":
        return torch.randn(n, cfg["latent_dim"], generator=g)
    if prior != "gmm":
        raise data.GanjiError(f"unknown VAE prior {prior!r}: choose normal or gmm")
    if net.gmm_tril is None or not net.gmm_tril.any():
        raise data.GanjiError("this VAE has no fitted mixture (it was not trained with --prior gmm, or stopped "
                              "before its first epoch ended): sample it with --prior normal")
    logw, mean, tril = (b.detach().float().cpu() for b in (net.gmm_logw, net.gmm_mean, net.gmm_tril))
    comp = torch.multinomial(logw.exp(), n, replacement=True, generator=g)  # (n,) component of each latent
    eps = torch.randn(n, cfg["latent_dim"], 1, generator=g)
    return mean[comp] + (tril[comp] @ eps).squeeze(-1)  # mean + L eps ~ N(mean, L L^T)


def sample(net, cfg, n, seed=0, device="cpu", prior=None):
    """n images (n, C, S, S) in [0, 1], ink bright, decoded from latents of the prior (None: the run's --prior),
    drawn with their own generator."""
    return decode(net, draw_latents(net, cfg, n, torch.Generator().manual_seed(seed), prior), device)


def interpolate(net, cfg, rows, frames, seed=0, device="cpu", spherical=True, prior=None):
    """rows * frames images (row-major) in [0, 1]: each row morphs between two latents of the prior."""
    z0, z1 = draw_latents(net, cfg, 2 * rows, torch.Generator().manual_seed(seed), prior).view(2, rows, -1)
    return decode(net, data.latent_morph(z0, z1, frames, spherical), device)


# ----------------------------------------------------------------------------------------------------
# Steering: a given glyph's cousins, and a morph between two glyphs. Glyphs come in as (1, C, S, S) in [0, 1],
# ink bright (data.glyph / 255).

# variations(): at strength 1 the latents stray by this many posterior standard deviations. A beta-0.1 VAE's
# posterior is narrow: within a few of its deviations every decode is the same glyph (docs/steering.md).
SPREAD = 30.0


@torch.no_grad()
def variations(net, cfg, x0, n=16, strength=0.5, seed=0, device="cpu"):
    """n decodes of latents drawn around the glyph's posterior, z = mu + strength * SPREAD * sigma * eps, eps ~
    N(0, I): strength near 0 gives its reconstruction, larger ones stray further."""
    if not 0 < strength <= 1:
        raise data.GanjiError(f"--strength must be in (0, 1], got {strength}")
    mu, logvar = net.encode(x0.float().to(device, memory_format=layout(cfg)))
    eps = torch.randn(n, cfg["latent_dim"], generator=torch.Generator().manual_seed(seed))
    return decode(net, mu.cpu() + strength * SPREAD * (0.5 * logvar.cpu()).exp() * eps, device)


@torch.no_grad()
def morph(net, cfg, xa, xb, frames=16, device="cpu"):
    """(frames, C, S, S) in [0, 1]: the decodes along the straight line between the two glyphs' latent means."""
    mu = net.encode(torch.cat([xa, xb]).float().to(device, memory_format=layout(cfg)))[0].cpu()
    return decode(net, data.latent_morph(mu[:1], mu[1:], frames, spherical=False), device)


if __name__ == "__main__":
    data.cli(main)
