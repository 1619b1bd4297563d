"""gan.py: shapes, loss and penalty math, EMA, sampling side effects and checkpoints (the run contract it
shares with the other two scripts is in test_models.py)."""
import copy
import json
import math

import pytest
import torch

import data
import gan
from conftest import fake_dataset, tiny_args, write_cifar10, write_mnist


def tiny_cfg(*extra, size=32, channels=1):
    args = gan.get_parser().parse_args(tiny_args(".", "unused", *extra))
    return gan.config_from_args(args, fake_dataset(channels=channels, size=size))


def batch(n=16, size=32, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("size,channels", [(64, 1), (32, 1), (32, 3)])  # kanji, MNIST, CIFAR-10
def test_shapes(size, channels):
    cfg = tiny_cfg(size=size, channels=channels)
    G, D = gan.build(cfg)
    x = G(torch.randn(5, cfg["latent_dim"]))
    assert x.shape == (5, channels, size, size) and x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (5,)
    s = gan.sample(G, cfg, 3, seed=1)
    assert s.shape == (3, channels, size, size) and 0 <= s.min() and s.max() <= 1
    assert gan.interpolate(G, cfg, 2, 4).shape == (8, channels, size, size)


def test_reference_size():
    """Width 1.0 on 64x64 kanji: channels taper toward the image side in both networks."""
    G, D = gan.build(gan.config_from_args(gan.get_parser().parse_args(["--width", "1.0"]), fake_dataset(size=64)))
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
    assert 3.5e6 < n_g < 3.7e6 and 4.8e6 < n_d < 4.9e6
    assert [b.conv2.out_channels for b in D.blocks] == [64, 128, 256, 512]
    assert [b.conv2.out_channels for b in G.blocks] == [256, 128, 64, 32] and G.fc.out_features == 512 * 4 * 4
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in D.modules())


def test_bad_image_size():
    with pytest.raises(data.GanjiError, match="multiple of 16"):
        tiny_cfg(size=40)


# ---------------------------------------------------------------------------------------------- math

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def softplus(v):
    return math.log(1 + math.exp(v))


def test_hinge_loss():
    # D: mean(relu(1 - real)) + mean(relu(1 + fake)) = (0 + 0.5 + 2)/3 + (0 + 1 + 2.5)/3 = 2
    assert gan.d_loss("hinge", REAL, FAKE).item() == pytest.approx(2.0)
    assert gan.g_loss("hinge", FAKE).item() == pytest.approx(0.5 / 3)  # -mean(fake)


def test_wasserstein_loss():
    assert gan.d_loss("wasserstein", REAL, FAKE).item() == pytest.approx(-0.5 / 3 - 1.5 / 3)
    assert gan.g_loss("wasserstein", FAKE).item() == pytest.approx(0.5 / 3)


def test_bce_loss():
    # D: -log sigmoid(r) = softplus(-r); -log(1 - sigmoid(f)) = softplus(f); G (non-saturating): softplus(-f)
    d = sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3
    g = sum(softplus(-f) for f in FAKE.tolist()) / 3
    assert gan.d_loss("bce", REAL, FAKE).item() == pytest.approx(d)
    assert gan.g_loss("bce", FAKE).item() == pytest.approx(g)


def test_relativistic_pairing_loss():
    """rpgan pairs image i of the real batch with image i of the fakes: D -log sigmoid(r - f), G -log sigmoid(f - r)."""
    d = sum(softplus(f - r) for r, f in zip(REAL.tolist(), FAKE.tolist())) / 3
    g = sum(softplus(r - f) for r, f in zip(REAL.tolist(), FAKE.tolist())) / 3
    assert gan.d_loss("rpgan", REAL, FAKE).item() == pytest.approx(d)
    assert gan.g_loss("rpgan", FAKE, REAL).item() == pytest.approx(g)


def test_r1_r2_for_critics_with_known_input_gradients():
    """R1/R2 = E ||grad_x D(x)||^2: |w|^2 for a linear critic, E ||x||^2 for D(x) = ||x||^2 / 2 (gradient x)."""
    x = batch(6, 8)
    w = torch.randn(64, generator=torch.Generator().manual_seed(1))
    assert gan.zero_centred_penalty(linear_critic(w), x).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)
    quadratic = lambda v: 0.5 * v.flatten(1).pow(2).sum(1)
    want = sum(img.pow(2).sum().item() for img in x) / 6
    assert gan.zero_centred_penalty(quadratic, x).item() == pytest.approx(want, rel=1e-5)
    # the penalty's own gradient reaches the critic's weights (double backward)
    lin = torch.nn.Linear(64, 1)
    pen = gan.zero_centred_penalty(lambda v: lin(v.flatten(1)).squeeze(1), x)
    pen.backward()
    torch.testing.assert_close(lin.weight.grad, 2 * lin.weight.detach())  # d|w|^2/dw = 2w


def test_lazy_penalty_is_every_kth_d_step_weighted_by_k():
    assert [gan.penalty_scale(s, 1) for s in range(4)] == [1, 1, 1, 1]
    assert [gan.penalty_scale(s, 4) for s in range(9)] == [4, 0, 0, 0, 4, 0, 0, 0, 4]
    torch.manual_seed(0)
    tr = gan.Trainer(tiny_cfg("--penalty", "r1r2", "--gamma", "2", "--penalty-every", "3"), "cpu")
    logged = [tr.step(batch())["penalty"] for _ in range(4)]
    assert logged[0] > 0 and logged[3] > 0 and logged[1] == logged[2] == 0
    # the term at a lazy step is 3 * gamma / 2 * (R1 + R2) of what D saw, with D's weights before that step
    D = copy.deepcopy(tr.D)
    real, fake = batch(), tr.G(torch.randn(16, 128)).detach()
    want = 3 * 2 / 2 * (gan.zero_centred_penalty(D, real) + gan.zero_centred_penalty(D, fake))
    assert tr.penalty(real, fake, d_step=6).item() == pytest.approx(want.item(), rel=1e-4)


def test_lr_decay_by_hand_and_started_on_resume(data_dir, tmp_path):
    """10 steps, the last 4 decayed: factors 1 (steps 0-6, (10 - 6) / 4 = 1 too), then 3/4, 2/4, 1/4."""
    assert [gan.lr_scale(s, 10, 4) for s in range(10)] == [1] * 7 + [0.75, 0.5, 0.25]
    assert [gan.lr_scale(s, 10, 0) for s in range(10)] == [1] * 10
    # a tiny run (4 steps an epoch) at constant rates, then resumed for a 2nd epoch that is its cool-down
    gan.main(tiny_args(data_dir, tmp_path, "--epochs", "1", "--lr", "1e-3", "--lr-d", "2e-3", "--lr-decay-epochs", "0"))
    gan.main(["--out", str(tmp_path), "--resume", "--data-dir", data_dir, "--epochs", "2", "--lr-decay-epochs", "1"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if r["row"] == "step"]  # one per step; step k logs the rates of 0-based step k - 1
    assert [r["step"] for r in steps] == list(range(1, 9))
    want = [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [r["lr"] for r in steps] == pytest.approx([1e-3 * f for f in want])
    assert [r["lr_d"] for r in steps] == pytest.approx([2e-3 * f for f in want])
    ckpt = data.load_checkpoint(str(tmp_path / "ckpt.pt"), "gan")  # the rates the Adams took the last step with
    assert ckpt["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 4)
    assert ckpt["optimizer_d"]["param_groups"][0]["lr"] == pytest.approx(2e-3 / 4)
    with pytest.raises(data.GanjiError, match="--lr-decay-epochs must be between 0 and --epochs"):
        gan.main(tiny_args(data_dir, tmp_path / "bad", "--epochs", "2", "--lr-decay-epochs", "3"))


def fake_checkpoint(path, **config):
    """A gan checkpoint with no weights: what open_run reads of one (kind, version, config, counters, machine)."""
    cfg = {**tiny_cfg(), "commands": ["python gan.py ..."], "trained_before": None, **config}
    data.atomic_save({"kind": "gan", "version": data.FORMAT_VERSION, "config": cfg, "epoch": 1, "step": 4,
                      "batch": 0, "train_seconds": 1.0, "machine": "Some CPU"}, str(path))


def test_size_dependent_defaults_come_from_the_width_only_in_a_fresh_run(tmp_path):
    """A fresh run takes --batch-size and --lr by --width and --lr-decay-epochs from --epochs; --resume and
    --init-from take them from the checkpoint (--lr-decay-epochs, a run setting, only on --resume)."""
    def resolved(*argv):
        args, _ = data.open_run(gan.get_parser(), list(argv), "gan")
        return vars(gan.recipe(args))

    pick = lambda a: (a["width"], a["batch_size"], a["lr"], a["lr_decay_epochs"])
    assert pick(resolved("--out", str(tmp_path / "a"), "--epochs", "19")) == (0.25, 16, 1e-3, 5)
    assert pick(resolved("--out", str(tmp_path / "a"), "--width", "1.0")) == (1.0, 64, 2e-4, 25)
    assert pick(resolved("--out", str(tmp_path / "a"), "--width", "0.5", "--epochs", "8")) == (0.5, 16, 1e-3, 2)
    assert pick(resolved("--out", str(tmp_path / "a"), "--width", "1.0", "--batch-size", "8", "--lr", "5e-4",
                         "--lr-decay-epochs", "0")) == (1.0, 8, 5e-4, 0)
    (tmp_path / "run").mkdir()
    fake_checkpoint(tmp_path / "run" / "ckpt.pt", width=1.0, batch_size=24, lr=3e-4, epochs=10, lr_decay_epochs=1)
    assert pick(resolved("--out", str(tmp_path / "run"), "--resume", "--epochs", "30")) == (1.0, 24, 3e-4, 1)
    assert pick(resolved("--out", str(tmp_path / "new"), "--init-from", str(tmp_path / "run" / "ckpt.pt"),
                         "--epochs", "8")) == (1.0, 24, 3e-4, 2)
    assert pick(resolved("--out", str(tmp_path / "new"), "--init-from", str(tmp_path / "run" / "ckpt.pt"),
                         "--width", "0.25", "--lr", "1e-4")) == (0.25, 24, 1e-4, 25)


def test_augment_is_differentiable_drawn_per_image_and_off_by_default(monkeypatch):
    x = batch(8, 32)[:1].expand(8, -1, -1, -1).clone().requires_grad_(True)  # 8 copies of one image
    torch.manual_seed(0)
    y = gan.augment(x)
    assert y.shape == x.shape and len({tuple(img.flatten().tolist()) for img in y}) == 8  # each image its own draw
    assert (y == -1).float().mean() > (x == -1).float().mean()  # paper where it was shifted in or cut out
    y.sum().backward()
    assert x.grad is not None and 0 < x.grad.sum() < x.numel()  # gradient flows to the pixels that were kept
    calls = []
    monkeypatch.setattr(gan, "augment", lambda images: calls.append(1) or images)
    gan.Trainer(tiny_cfg(), "cpu").step(batch())
    assert calls == []
    gan.Trainer(tiny_cfg("--augment", "--loss", "hinge"), "cpu").step(batch())
    assert len(calls) == 3  # the real and the fake batch of the D step, the fakes of the G step
    gan.Trainer(tiny_cfg("--augment", "--loss", "rpgan"), "cpu").step(batch())
    assert len(calls) == 3 + 4  # rpgan's G step scores the paired reals too, each image drawn anew


def linear_critic(w):
    return lambda x: x.flatten(1) @ w + 0.3


def test_gradient_penalty_linear_critic():
    """D(x) = w.x + b has input gradient w everywhere: penalty (|w| - 1)^2, zero exactly when |w| = 1."""
    torch.manual_seed(0)
    real, fake = batch(8, 8), batch(8, 8, seed=1)
    unit = torch.randn(64)
    unit /= unit.norm()
    assert gan.gradient_penalty(linear_critic(unit), real, fake).item() == pytest.approx(0.0, abs=1e-10)
    assert gan.gradient_penalty(linear_critic(3 * unit), real, fake).item() == pytest.approx(4.0, rel=1e-5)
    assert gan.gradient_penalty(linear_critic(0.5 * unit), real, fake).item() == pytest.approx(0.25, rel=1e-5)
    _, D = gan.build(tiny_cfg())
    gp = gan.gradient_penalty(D, batch(4), batch(4, seed=1))
    assert gp.item() > 0 and gp.requires_grad  # a real critic: positive, and differentiable w.r.t. D's weights


def test_conv3x3_pool_is_conv_then_average_pool():
    """The D blocks' folded stride-2 4x4 conv equals a 3x3 conv followed by a 2x2 average pool."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1).double()
    x = torch.randn(3, 5, 12, 12, dtype=torch.float64)
    ref = torch.nn.functional.avg_pool2d(conv(x), 2)
    assert torch.allclose(gan.conv3x3_pool(x, conv), ref, atol=1e-12)


def test_gradient_penalty_bf16_matches_fp32():
    """Under bf16 autocast the penalty and its gradient w.r.t. D's weights stay within bf16 rounding of fp32."""
    torch.manual_seed(0)
    _, D = gan.build(tiny_cfg())
    real, fake = batch(16), batch(16, seed=1)
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)  # the same interpolation weights
        with data.autocast(torch.device("cpu"), precision):
            gp = gan.gradient_penalty(D, real, fake)
        params = [p for name, p in D.named_parameters() if name != "fc.bias"]  # the input gradient ignores it
        out[precision] = gp.item(), torch.cat([g.flatten() for g in torch.autograd.grad(gp, params)])
    (gp32, g32), (gp16, g16) = out["fp32"], out["bf16"]
    assert gp16 == pytest.approx(gp32, rel=0.02)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert g16.norm().item() == pytest.approx(g32.norm().item(), rel=0.05)


def test_interpolation_weight_per_sample():
    torch.manual_seed(0)
    real, fake = batch(6), batch(6, seed=1)
    x_hat, a = gan.interpolates(real, fake)
    assert a.shape == (6, 1, 1, 1)
    # every pixel of image i lies at the same fraction a_i of the way from fake_i to real_i
    frac = (x_hat - fake) / (real - fake)
    per_image = frac.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-4)
    assert torch.allclose(per_image[:, 0], a.flatten(), atol=1e-4)
    assert len(set(a.flatten().tolist())) == 6  # a different weight for each image


def test_ema_update_math():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = copy.deepcopy(net)
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net(torch.randn(8, 3))  # changes the BN running statistics
    gan.ema_update(ema, net, 0.9)
    for e, b, p in zip(ema.parameters(), before, net.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)
    for e, b in zip(ema.buffers(), net.buffers()):
        assert torch.equal(e, b)


def test_ema_decay_half_life_in_images():
    """After half_life / batch steps at the returned decay, the old weights' share is exactly 1/2."""
    d = gan.ema_decay(images_seen=10**9, batch_size=64, kimg=10, rampup=0.05)
    assert d ** (10_000 / 64) == pytest.approx(0.5)
    # ramp: after 20,000 images the half-life is 0.05 * 20,000 = 1,000 images, not 10,000
    assert gan.ema_decay(20_000, 64, 10, 0.05) ** (1_000 / 64) == pytest.approx(0.5)
    assert gan.ema_decay(20_000, 64, 10, 0) == d  # no ramp


def test_trainer_ema_ramp():
    """Step 1 has seen one batch b: half-life 0.05 * b images, decay 0.5 ** (b / (0.05 b)) = 0.5 ** 20."""
    torch.manual_seed(0)
    tr = gan.Trainer(tiny_cfg(), "cpu")
    g0 = [p.detach().clone() for p in tr.G.parameters()]
    tr.step(batch())
    d = 0.5 ** 20
    for e, a, b in zip(tr.ema.parameters(), g0, tr.G.parameters()):
        assert torch.allclose(e, d * a + (1 - d) * b, atol=1e-6)
    assert not tr.ema.training and tr.G.training


# ---------------------------------------------------------------------------------------------- sampling

def test_sampling_leaves_training_state_alone():
    torch.manual_seed(0)
    tr = gan.Trainer(tiny_cfg(), "cpu")
    tr.step(batch())
    nets = [tr.G, tr.D, tr.ema]
    flags = [[m.training for m in net.modules()] for net in nets]
    buffers = [[b.clone() for b in net.buffers()] for net in nets]
    rng = torch.get_rng_state()
    a = gan.sample(tr.sample_net, tr.cfg, 8, seed=5)
    b = gan.sample(tr.G, tr.cfg, 8, seed=5)  # the no-EMA path samples from G itself
    gan.interpolate(tr.G, tr.cfg, 2, 3)
    assert [[m.training for m in net.modules()] for net in nets] == flags
    for net, saved in zip(nets, buffers):
        assert all(torch.equal(x, y) for x, y in zip(net.buffers(), saved))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a, gan.sample(tr.sample_net, tr.cfg, 8, seed=5)) and not torch.equal(a, b)


@pytest.mark.parametrize("ema_kimg", ["10", "0"])
def test_checkpoint_round_trip(tmp_path, ema_kimg):
    torch.manual_seed(0)
    cfg = tiny_cfg("--ema-kimg", ema_kimg)
    tr = gan.Trainer(cfg, "cpu")
    assert tr.sample_net is (tr.ema if ema_kimg != "0" else tr.G)
    tr.step(batch())
    path = str(tmp_path / "ckpt.pt")
    gan.save_checkpoint(path, tr, epoch=1, batch=0, train_seconds=1.0)
    net, cfg2 = gan.load(path)
    assert cfg2 == cfg and not net.training
    assert torch.equal(gan.sample(net, cfg2, 8, seed=3), gan.sample(tr.sample_net, cfg, 8, seed=3))
    tr2 = gan.Trainer(cfg, "cpu")
    tr2.load_state_dict(data.load_checkpoint(path, "gan"))
    assert tr2.step_count == 1 and tr2.optimizer_d.state_dict()["state"][0]["step"] == 1


# ---------------------------------------------------------------------------------------------- other datasets

@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_trains_on_mnist_and_cifar10(tmp_path, monkeypatch, dataset):
    """The default recipe on the real file formats (written by conftest, nothing downloaded): two epochs of
    two steps, finite losses, a grid and a checkpoint that samples images of the dataset's shape."""
    if dataset == "mnist":
        write_mnist(tmp_path)
    else:
        write_cifar10(tmp_path, monkeypatch)
    out = tmp_path / "run"
    gan.main(tiny_args(tmp_path, out, "--dataset", dataset, "--epochs", "2", "--batch-size", "8"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows and all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss"))
    assert (out / "samples_epoch002.png").is_file()
    net, cfg = gan.load(str(out / "ckpt.pt"))
    channels = 1 if dataset == "mnist" else 3
    assert gan.sample(net, cfg, 2, seed=0).shape == (2, channels, 32, 32)


def test_minibatch_std_by_hand_and_only_within_its_group():
    # 4 images of 2 features at 1x1: feature 0 is 0, 2, 4, 6 (std 2.2361 across the group), feature 1 is 1 each (0)
    h = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0], [6.0, 1.0]]).view(4, 2, 1, 1)
    expected = (math.sqrt(5 + 1e-8) + math.sqrt(1e-8)) / 2
    assert gan.minibatch_std(h).flatten().tolist() == pytest.approx([expected] * 4, rel=1e-6)
    # 6 images: groups of gcd(4, 6) = 2, each its own std
    h6 = torch.tensor([0.0, 2.0, 5.0, 5.0, 1.0, 4.0]).view(6, 1, 1, 1)
    assert gan.minibatch_std(h6).flatten().tolist() == pytest.approx([1, 1, 1e-4, 1e-4, 1.5, 1.5], rel=1e-5)
    torch.manual_seed(0)
    d = gan.Discriminator(1, 0.125, mbstd=True).eval().to(memory_format=torch.channels_last)  # as it trains
    assert d.fc.in_features == gan.Discriminator(1, 0.125).fc.in_features + 1
    x = torch.rand(8, 1, 32, 32)
    y = x.clone()
    y[5] = 0  # another image in the second group of 4
    sx, sy = d(x), d(y)
    assert torch.equal(sx[:4], sy[:4]) and not torch.allclose(sx[4], sy[4])  # the first group never sees it


@pytest.mark.parametrize("flag", ["--n-critic", "--penalty-every"])
def test_step_count_flags_refuse_zero_with_one_line(flag, capsys):
    with pytest.raises(SystemExit) as e:
        gan.get_parser().parse_args([flag, "0"])  # refused while parsing, before any data is read
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: argument {flag}: must be at least 1, got 0")
