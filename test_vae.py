"""Tests for vae.py: shapes, the loss formula, checkpoints, exact resume, failure modes and the CLI.

Tiny configs throughout (width 0.125, 32x32, 64 images, batch 16 = 4 steps an epoch) so the file runs
in well under a minute on 2 CPU cores.
"""
import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

import data
import vae

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy shared CPU two threads are far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(data_dir, out, *extra):
    return ["--data-dir", data_dir, "--out", str(out), "--image-size", "32", "--limit", "64",
            "--batch-size", "16", "--width", "0.125", "--log-every", "1", *extra]


def tiny_cfg(**kw):
    args = vae.get_parser().parse_args(["--image-size", "32", "--width", "0.125", "--precision", "fp32"])
    return {**vae.config_from_args(args), **kw}


def states_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64])
def test_shapes(channels, size):
    cfg = tiny_cfg(image_size=size, channels=channels, latent_dim=16)
    net = vae.build(cfg)
    x = torch.rand(2, channels, size, size)
    logits, mu, logvar = net(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (2, 16)
    imgs = vae.sample(net, cfg, 3, seed=1)
    assert imgs.shape == (3, channels, size, size) and imgs.dtype == torch.float32
    assert 0 <= imgs.min() and imgs.max() <= 1


def test_bad_image_size_fails_before_any_work(tmp_path):
    with pytest.raises(data.GanjiError, match="8, 16, 32 or 64"):
        vae.build(tiny_cfg(image_size=48))
    with pytest.raises(data.GanjiError, match="8, 16, 32 or 64"):
        vae.main(["--image-size", "48", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "none")])
    assert os.listdir(tmp_path) == []  # no data rendered, no run folder


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


def test_step_optimizes_that_loss():
    cfg = tiny_cfg(beta=0.5)
    torch.manual_seed(0)
    trainer = vae.Trainer(cfg, "cpu")
    x = torch.rand(4, 1, 32, 32)
    ref = vae.build(cfg)
    ref.load_state_dict(trainer.model.state_dict())
    torch.manual_seed(1)
    logits, mu, logvar = ref(x)
    expected = vae.vae_loss(logits, x, mu, logvar, 0.5)
    torch.manual_seed(1)
    got = trainer.step(x)
    assert got["loss"] == pytest.approx(expected[0].item(), rel=1e-5)
    assert got["recon"] == pytest.approx(expected[1].item(), rel=1e-5)
    assert got["kl"] == pytest.approx(expected[2].item(), rel=1e-5)
    assert not states_equal(trainer.model.state_dict(), ref.state_dict())  # the step changed the weights


def test_checkpoint_round_trip_gives_identical_samples(data_dir, tmp_path):
    vae.main(tiny(data_dir, tmp_path, "--dry-run"))
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


def _run_interrupted(monkeypatch, argv, at_call):
    real_step, calls = vae.Trainer.step, [0]

    def step(self, x):
        calls[0] += 1
        if calls[0] == at_call:
            raise KeyboardInterrupt
        return real_step(self, x)

    with monkeypatch.context() as m:
        m.setattr(vae.Trainer, "step", step)
        with pytest.raises(SystemExit) as e:
            vae.main(argv)
    assert e.value.code == 130


KL_RAMP = ("--kl-warmup", "1.5")  # the KL ramp has to resume exactly too


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The reference: a 2-epoch run in one go (4 steps an epoch)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    vae.main(tiny(data_dir, out, "--epochs", "2", *KL_RAMP))
    return out


@pytest.mark.parametrize("how", ["ctrl-c mid-epoch", "after epoch 1"])
def test_resume_equals_uninterrupted_run(data_dir, uninterrupted, tmp_path, monkeypatch, capsys, how):
    if how == "ctrl-c mid-epoch":
        _run_interrupted(monkeypatch, tiny(data_dir, tmp_path, "--epochs", "2", *KL_RAMP), at_call=6)
        assert data.load_checkpoint(str(tmp_path / "ckpt.pt"))["batch"] == 1  # epoch 2, one batch in
        vae.main(tiny(data_dir, tmp_path, "--epochs", "2", "--resume", *KL_RAMP))
    else:
        vae.main(tiny(data_dir, tmp_path, "--epochs", "1", *KL_RAMP))
        capsys.readouterr()
        # an architecture flag that disagrees with the checkpoint is ignored with a warning
        vae.main(tiny(data_dir, tmp_path, "--epochs", "2", "--resume", "--latent-dim", "8", *KL_RAMP))
        assert "warning" in capsys.readouterr().err
    a = data.load_checkpoint(str(uninterrupted / "ckpt.pt"))
    b = data.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert (a["epoch"], a["step"], a["batch"]) == (b["epoch"], b["step"], b["batch"]) == (2, 8, 0)
    assert states_equal(a["model"], b["model"])
    assert states_equal(a["optimizer"], b["optimizer"])


def test_metrics_rows(uninterrupted):
    rows = [json.loads(line) for line in open(uninterrupted / "metrics.jsonl")]
    steps = [r for r in rows if r["row"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))  # --log-every 1
    assert steps[0]["kl_weight"] == 0 and steps[-1]["kl_weight"] == 1.0  # ramp over 1.5 of 2 epochs
    epochs = [r for r in rows if r["row"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(r["img_per_s"] > 0 and r["lr"] == 1e-3 and r["loss"] > r["recon"] > 0 for r in epochs)
    assert sorted(os.listdir(uninterrupted)) == [
        "ckpt.pt", "config.json", "metrics.jsonl", "recon_epoch001.png", "recon_epoch002.png",
        "samples_epoch001.png", "samples_epoch002.png"]


def test_nonfinite_loss_stops_and_keeps_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    vae.main(tiny(data_dir, tmp_path, "--epochs", "1"))
    path = tmp_path / "ckpt.pt"
    before = path.read_bytes()
    monkeypatch.setattr(data, "normalize", lambda x, norm: torch.full(x.shape, float("nan")))  # poisoned data
    with pytest.raises(SystemExit) as e:
        vae.main(tiny(data_dir, tmp_path, "--epochs", "2", "--resume"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "epoch 2 step 5" in err
    assert path.read_bytes() == before
    net, cfg = vae.load(str(path))
    assert torch.isfinite(vae.sample(net, cfg, 4)).all()


def test_refuses_to_overwrite_and_resume_needs_checkpoint(data_dir, tmp_path):
    with pytest.raises(data.GanjiError, match="no ckpt.pt"):
        vae.main(tiny(data_dir, tmp_path, "--resume"))
    vae.main(tiny(data_dir, tmp_path, "--dry-run"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(data.GanjiError, match="--resume"):
        vae.main(tiny(data_dir, tmp_path, "--dry-run"))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        vae.main(["-h"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--latent-dim", "--beta", "--kl-warmup", "--width", "--epochs", "--batch-size", "--lr",
                 "--precision", "--resume", "--dry-run", "--sample-every", "--out", "--dataset"):
        assert flag in text
    assert "(default: 64)" in text and "(default: 100)" in text


def test_interpolate():
    cfg = tiny_cfg(latent_dim=8)
    net = vae.build(cfg)
    for spherical in (True, False):
        out = vae.interpolate(net, cfg, rows=3, steps=5, seed=2, spherical=spherical)
        assert out.shape == (15, 1, 32, 32) and 0 <= out.min() and out.max() <= 1
        assert not torch.equal(out[0], out[4]) and not torch.equal(out[0], out[5])
    # slerp keeps its endpoints and the norm stays between them (a straight line would dip in the middle)
    z0, z1 = torch.randn(2, 4, 8)
    z = data.slerp(z0, z1, torch.linspace(0, 1, 5))
    assert torch.allclose(z[:, 0], z0, atol=1e-5) and torch.allclose(z[:, -1], z1, atol=1e-5)
    lo = torch.minimum(z0.norm(dim=1), z1.norm(dim=1))
    assert (z[:, 2].norm(dim=1) >= lo - 1e-4).all()


def test_cli_dry_run_writes_run_folder(data_dir, tmp_path):
    r = subprocess.run([sys.executable, "vae.py", *tiny(data_dir, tmp_path / "run", "--dry-run")],
                       cwd=HERE, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["ckpt.pt", "config.json", "metrics.jsonl",
                                       "recon_epoch001.png", "samples_epoch001.png"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "vae" and cfg["image_size"] == 32 and cfg["display_invert"] is True
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["step", "step", "epoch"]
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in rows)
    ckpt = data.load_checkpoint(str(run / "ckpt.pt"), "vae")
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch"]) == (1, 2, 0)
    png_size = lambda name: struct.unpack(">II", (run / name).read_bytes()[16:24])  # IHDR width, height
    assert png_size("samples_epoch001.png") == (8 * 34 + 2,) * 2  # 8x8 grid of 32 px, 2 px padding
    assert png_size("recon_epoch001.png") == (8 * 34 + 2,) * 2  # 4 rows of originals + 4 of reconstructions
