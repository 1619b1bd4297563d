"""vae.py: shapes, the loss formula, the KL warm-up, checkpoints and morphs (the run contract it shares with
the other two scripts is in test_models.py)."""
import json
import math
import os

import pytest
import torch

import data
import vae
from conftest import fake_dataset, run_cli, states_equal, tiny_args


def tiny_cfg(**kw):
    return {**vae.config_from_args(vae.get_parser().parse_args(tiny_args(".", "unused")), fake_dataset()), **kw}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64])
def test_shapes(channels, size):
    cfg = tiny_cfg(image_size=size, channels=channels, latent_dim=16)
    net = vae.build(cfg)
    x = torch.rand(2, channels, size, size)
    logits, mu, logvar = net(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (2, 16)
    imgs = vae.sample(net, cfg, 3, seed=1, prior="normal")  # untrained: no mixture fitted yet
    assert imgs.shape == (3, channels, size, size) and imgs.dtype == torch.float32
    assert 0 <= imgs.min() and imgs.max() <= 1


def test_bad_image_size_is_one_clear_error():
    with pytest.raises(data.GanjiError, match="8, 16, 32 or 64"):
        vae.build(tiny_cfg(image_size=48))


def test_loss_matches_hand_computation():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[0.0, 1.5], [-0.5, 4.0]]]])
    x = torch.tensor([[[[1.0, 0.0], [0.25, 0.0]]], [[[0.5, 1.0], [0.0, 1.0]]]])
    mu = torch.tensor([[0.3, -1.2], [0.0, 2.0]])
    logvar = torch.tensor([[0.1, -0.5], [1.0, 0.0]])
    sig = lambda v: 1 / (1 + math.exp(-v))
    bce = -sum(t * math.log(sig(l)) + (1 - t) * math.log(1 - sig(l))
               for l, t in zip(logits.flatten().tolist(), x.flatten().tolist())) / 2
    kl = sum(0.5 * (m * m + math.exp(lv) - 1 - lv)
             for m, lv in zip(mu.flatten().tolist(), logvar.flatten().tolist())) / 2
    loss, recon, klt = vae.vae_loss(logits, x, mu, logvar, beta=0.7)
    assert recon.item() == pytest.approx(bce, rel=1e-6)
    assert klt.item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(bce + 0.7 * kl, rel=1e-6)
    # free bits 0.9: per dimension, the batch-mean KL (0.2034 and 1.3866 here) counts as at least 0.9
    kl_dims = [sum(0.5 * (mu[i, j].item() ** 2 + math.exp(logvar[i, j].item()) - 1 - logvar[i, j].item())
                   for i in range(2)) / 2 for j in range(2)]
    assert kl_dims == pytest.approx([0.20336, 1.38663], abs=1e-5)
    loss, recon, klt = vae.vae_loss(logits, x, mu, logvar, beta=0.7, free_bits=0.9)
    assert klt.item() == pytest.approx(kl, rel=1e-6)  # the reported KL is the true one
    assert loss.item() == pytest.approx(bce + 0.7 * (0.9 + kl_dims[1]), rel=1e-6)


def test_step_optimizes_that_loss():
    cfg = tiny_cfg(beta=0.5)
    torch.manual_seed(0)
    trainer = vae.Trainer(cfg, "cpu")
    x = torch.rand(4, 1, 32, 32)
    ref = vae.build(cfg)
    ref.load_state_dict(trainer.net.state_dict())
    torch.manual_seed(1)
    logits, mu, logvar = ref(x)
    expected = vae.vae_loss(logits, x, mu, logvar, 0.5)
    torch.manual_seed(1)
    got = trainer.step(x)
    assert got["loss"] == pytest.approx(expected[0].item(), rel=1e-5)
    assert got["recon"] == pytest.approx(expected[1].item(), rel=1e-5)
    assert got["kl"] == pytest.approx(expected[2].item(), rel=1e-5)
    assert not states_equal(trainer.net.state_dict(), ref.state_dict())  # the step changed the weights


def test_checkpoint_round_trip_gives_identical_samples(data_dir, tmp_path):
    vae.main(tiny_args(data_dir, tmp_path, "--dry-run"))
    net, cfg = vae.load(str(tmp_path / "ckpt.pt"))
    assert not net.training and cfg["kind"] == "vae" and cfg["width"] == 0.125
    rng = torch.get_rng_state()
    a = vae.sample(net, cfg, 64, seed=cfg["seed"])
    assert torch.equal(torch.get_rng_state(), rng)  # sampling never touches the training RNG
    net2, _ = vae.load(str(tmp_path / "ckpt.pt"))
    assert torch.equal(a, vae.sample(net2, cfg, 64, seed=cfg["seed"]))
    assert not torch.equal(a, vae.sample(net2, cfg, 64, seed=cfg["seed"] + 1))
    # the same PNG, byte for byte, as the grid the training run drew from its in-memory model
    data.save_grid(a, str(tmp_path / "again.png"), cfg["display_invert"])
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "samples_epoch001.png").read_bytes()


def test_kl_warmup_ramps_with_the_step(data_dir, tmp_path):
    """--kl-warmup 1.5 over 2 epochs of 4 steps: the weight rises linearly over the first 6 steps."""
    vae.main(tiny_args(data_dir, tmp_path, "--epochs", "2", "--kl-warmup", "1.5", "--beta", "0.8"))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if r["row"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))  # --log-every 1
    assert [r["kl_weight"] for r in steps] == pytest.approx([0.8 * min(1, s / 6) for s in range(8)], abs=1e-6)
    epochs = [r for r in rows if r["row"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(r["img_per_s"] > 0 and r["lr"] == 1e-3 and r["loss"] > r["recon"] > 0 for r in epochs)
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt.pt", "config.json", "curves.png", "metrics.jsonl", "recon_epoch001.png", "recon_epoch002.png",
        "samples_epoch001.png", "samples_epoch002.png"]


def test_interpolate():
    cfg = tiny_cfg(latent_dim=8)
    net = vae.build(cfg)
    for spherical in (True, False):
        out = vae.interpolate(net, cfg, rows=3, frames=5, seed=2, spherical=spherical, prior="normal")
        assert out.shape == (15, 1, 32, 32) and 0 <= out.min() and out.max() <= 1
        assert not torch.equal(out[0], out[4]) and not torch.equal(out[0], out[5])
    # slerp keeps its endpoints and the norm stays between them (a straight line would dip in the middle)
    z0, z1 = torch.randn(2, 4, 8)
    z = data.slerp(z0, z1, torch.linspace(0, 1, 5))
    assert torch.allclose(z[:, 0], z0, atol=1e-5) and torch.allclose(z[:, -1], z1, atol=1e-5)
    lo = torch.minimum(z0.norm(dim=1), z1.norm(dim=1))
    assert (z[:, 2].norm(dim=1) >= lo - 1e-4).all()


def clustered_net(monkeypatch):
    """A --prior gmm VAE (latent 2, 2 components) whose encoder maps 64 images to two known clusters:
    48 posterior means around (4, 0) and 16 around (-4, 2), spread 0.5."""
    cfg = tiny_cfg(latent_dim=2, prior="gmm", gmm_components=2)
    torch.manual_seed(0)
    net = vae.build(cfg).eval()
    centres = torch.tensor([[4.0, 0.0]] * 48 + [[-4.0, 2.0]] * 16)
    mu = centres + 0.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(net, "encode", lambda x: (mu[:len(x)], None))  # the 64 images fit in one chunk
    return net, cfg, mu


def test_mixture_prior_fits_the_posterior_means_and_samples_deterministically(monkeypatch):
    images = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    net, cfg, mu = clustered_net(monkeypatch)
    with pytest.raises(data.GanjiError, match="no fitted mixture"):  # stopped before its first epoch ended
        vae.sample(net, cfg, 4)
    vae.fit_prior(net, images, cfg, "cpu")
    order = net.gmm_logw.argsort(descending=True)
    w, mean = net.gmm_logw.exp()[order], net.gmm_mean[order]
    assert w.tolist() == pytest.approx([0.75, 0.25], abs=1e-6)  # the clusters are far apart: a hard split
    # the maximum-likelihood mean and covariance of each cluster's own points
    for k, rows in enumerate((mu[:48], mu[48:])):
        assert torch.allclose(mean[k], rows.mean(0), atol=1e-5)
        cov = (rows - rows.mean(0)).T @ (rows - rows.mean(0)) / len(rows)
        tril = net.gmm_tril[order[k]]
        assert torch.allclose(tril @ tril.T, cov, atol=1e-4)  # (+ scikit-learn's 1e-6 on the diagonal)
    # the same weights, images and seed: the same mixture; the same sampling seed: the same latents
    net2, _, _ = clustered_net(monkeypatch)
    vae.fit_prior(net2, images, cfg, "cpu")
    assert states_equal(net.state_dict(), net2.state_dict())
    g = lambda seed: torch.Generator().manual_seed(seed)
    z = vae.draw_latents(net, cfg, 4000, g(1))
    assert torch.equal(z, vae.draw_latents(net2, cfg, 4000, g(1)))
    assert not torch.equal(z, vae.draw_latents(net, cfg, 4000, g(2)))
    near_first = ((z - mean[0]).norm(dim=1) < (z - mean[1]).norm(dim=1)).float().mean()
    assert near_first.item() == pytest.approx(0.75, abs=0.03)  # 4 standard errors of a 4,000-draw share
    assert torch.equal(vae.sample(net, cfg, 8, seed=5), vae.sample(net2, cfg, 8, seed=5))
    # the same checkpoint also samples from N(0, I), as a run without the mixture does
    assert torch.equal(vae.draw_latents(net, cfg, 8, g(3), prior="normal"), torch.randn(8, 2, generator=g(3)))


def test_gmm_run_carries_its_mixture_and_a_normal_run_has_none(data_dir, tmp_path):
    vae.main(tiny_args(data_dir, tmp_path / "gmm", "--dry-run", "--prior", "gmm", "--gmm-components", "3",
                       "--latent-dim", "8"))
    net, cfg = vae.load(str(tmp_path / "gmm" / "ckpt.pt"))
    assert net.gmm_tril.shape == (3, 8, 8) and torch.allclose(net.gmm_logw.exp().sum(), torch.tensor(1.0))
    a = vae.sample(net, cfg, 64, seed=cfg["seed"])  # the run's prior: what its grid drew
    data.save_grid(a, str(tmp_path / "again.png"), cfg["display_invert"])
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "gmm" / "samples_epoch001.png").read_bytes()
    vae.main(tiny_args(data_dir, tmp_path / "normal", "--dry-run", "--prior", "normal"))
    net, cfg = vae.load(str(tmp_path / "normal" / "ckpt.pt"))
    assert net.gmm_tril is None and not any(k.startswith("gmm") for k in net.state_dict())
    with pytest.raises(data.GanjiError, match="sample it with --prior normal"):
        vae.sample(net, cfg, 4, prior="gmm")


def test_gmm_components_below_one_is_refused_before_the_run_folder_exists(data_dir, tmp_path):
    res = run_cli("vae.py", *tiny_args(data_dir, tmp_path / "run", "--gmm-components", "0"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines()[-1].endswith("error: argument --gmm-components: must be at least 1, got 0")
    assert not (tmp_path / "run").exists()
