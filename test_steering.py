"""Steering: SDEdit variations, RePaint completions and morphs of given glyphs (ddpm.py, vae.py), the glyph to start
from and the masks (data.py, sample.py), against closed forms and exact denoisers, and every bad input of the CLI."""
import importlib
import math

import pytest
import torch

import data
import ddpm
import sample
import vae
from conftest import fake_dataset, run_cli, tiny_args
from test_ddpm import Mixture, randomized_net, tiny_cfg


class GaussianMixture(torch.nn.Module):
    """The exact denoiser of a mixture of isotropic Gaussians N(mu_k, s^2 I), weights w_k. Given mode k, x_t ~
    N(sqrt(ab) mu_k, v I) with v = ab s^2 + 1 - ab, and E[x0 | x_t, k] = mu_k + sqrt(ab) s^2 / v (x_t - sqrt(ab)
    mu_k); the modes are weighted by w_k N(x_t; sqrt(ab) mu_k, v I)."""

    def __init__(self, cfg, mus, s, w):
        super().__init__()
        self.ab = ddpm.schedule(cfg["timesteps"], cfg["schedule"])["alpha_bar"].double()
        self.mus, self.s, self.logw, self.pred = mus.double(), s, torch.tensor(w).double().log(), cfg["pred"]

    def forward(self, x, t):
        ab, x = self.ab[t].view(-1, 1, 1, 1), x.double()
        v = ab * self.s ** 2 + 1 - ab
        d2 = ((x[:, None] - ab[:, None].sqrt() * self.mus[None]) ** 2).flatten(2).sum(-1)  # (B, K)
        w = torch.softmax(self.logw[None] - d2 / (2 * v.view(-1, 1)), 1)
        x0k = self.mus[None] + (ab.sqrt() * self.s ** 2 / v)[:, None] * (x[:, None] - ab[:, None].sqrt() * self.mus)
        x0 = torch.einsum("bk,bkchw->bchw", w, x0k)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return (eps if self.pred == "eps" else ddpm.v_target(x0, eps, ab)).float()


def glyph01(seed=0, size=32):
    """A binary glyph-like image (1, 1, S, S) in [0, 1]."""
    return (torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(seed)) > 0.7).float()


# ----------------------------------------------------------------------------------------------------
# SDEdit variations

@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_edit_with_strength_near_0_returns_the_glyph(sampler):
    """One step from almost no noise: the x0 estimate at t = 0 is x_t up to sqrt(1 - ab_0) = 1 % of the output."""
    cfg = tiny_cfg()
    x0 = glyph01()
    out = ddpm.edit(randomized_net(cfg), cfg, x0, 1e-4, n=3, sampler=sampler, steps=10)
    assert (out - x0).abs().max() < 0.05


@pytest.mark.parametrize("kw", [dict(sampler="ddim", steps=7), dict(sampler="dpm++2m", steps=5),
                                dict(sampler="ddim", steps=4, eta=0.5), dict(sampler="ancestral")])
def test_edit_with_strength_1_is_the_free_sample_from_the_same_noise(kw):
    cfg = tiny_cfg(timesteps=50)
    net = randomized_net(cfg, seed=2)
    got = ddpm.edit(net, cfg, glyph01(), 1.0, n=4, seed=9, **kw)
    assert torch.equal(got, ddpm.sample(net, cfg, 4, seed=9, **kw))


def test_edit_noises_to_the_step_strength_names_and_takes_that_share_of_the_steps():
    cfg = tiny_cfg(timesteps=100)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t[0].item())
            return torch.zeros_like(x)

    ddpm.edit(Recorder(), cfg, glyph01(), 0.5, n=2, sampler="ddim", steps=10)
    assert seen == [49, 39, 29, 19, 9]  # t_start = ceil(0.5 * 100) - 1, then ceil(0.5 * 10) trailing steps
    a = ddpm.edit(Recorder(), cfg, glyph01(), 0.3, n=2, seed=1)
    assert torch.equal(a, ddpm.edit(Recorder(), cfg, glyph01(), 0.3, n=2, seed=1))  # seeded
    assert not torch.equal(a, ddpm.edit(Recorder(), cfg, glyph01(), 0.3, n=2, seed=2))
    with pytest.raises(data.GanjiError, match=r"in \(0, 1\]"):
        ddpm.edit(Recorder(), cfg, glyph01(), 0.0)


# ----------------------------------------------------------------------------------------------------
# RePaint completions

def test_repaint_plan_walks_down_with_resample_minus_1_jumps_back_at_every_jump_th_move():
    assert ddpm.repaint_plan(6, 1, 2) == [1] * 6
    assert ddpm.repaint_plan(6, 2, 2) == [1, 1, -2, 1, 1, 1, 1, -2, 1, 1, 1, 1]
    for n, r, j in ((20, 3, 5), (20, 10, 2), (7, 4, 3), (5, 3, 10)):
        plan = ddpm.repaint_plan(n, r, j)
        levels = [sum(plan[:i + 1]) for i in range(len(plan))]
        assert sum(plan) == n and min(levels) >= 0 and max(levels) == n
        # each jump point strictly inside the walk is gone back from r - 1 times: network calls of the whole plan
        assert sum(m > 0 for m in plan) == n + (r - 1) * j * ((n - 1) // j)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "ancestral"])
def test_inpaint_with_the_full_mask_returns_the_source(sampler):
    cfg = tiny_cfg(timesteps=40)
    x0 = glyph01(3)
    got = ddpm.inpaint(randomized_net(cfg), cfg, x0, torch.ones(1, 1, 32, 32), n=2, sampler=sampler, steps=6)
    torch.testing.assert_close(got, x0.expand(2, -1, -1, -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_inpaint_with_an_empty_mask_and_no_resampling_is_the_free_sample(sampler):
    cfg = tiny_cfg(timesteps=40)
    net = randomized_net(cfg, seed=4)
    got = ddpm.inpaint(net, cfg, glyph01(), torch.zeros(1, 1, 32, 32), n=3, seed=5, sampler=sampler, steps=6,
                       resample=1)
    assert torch.equal(got, ddpm.sample(net, cfg, 3, seed=5, sampler=sampler, steps=6))


def two_modes(kept_value, s=0.1):
    """A mixture of two Gaussians on 2x2 images, centres +-(0.5, 0.5, -0.5, -0.5), std s, and the source whose first
    pixel (the kept one) has the given value."""
    cfg = tiny_cfg(timesteps=1000, schedule="cosine", pred="v", image_size=2)
    mus = torch.tensor([[0.5, 0.5, -0.5, -0.5], [-0.5, -0.5, 0.5, 0.5]]).view(2, 1, 2, 2)
    src = torch.full((1, 1, 2, 2), (kept_value + 1) / 2)
    return cfg, GaussianMixture(cfg, mus, s, [0.5, 0.5]), src, torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2)


def test_inpaint_keeps_the_kept_pixel_and_resampling_draws_the_rest_from_its_conditional():
    """The kept pixel at 0.8 makes mode A e^80 times likelier than B: every completion belongs in A, its three free
    pixels N(centre, 0.1^2) each. Putting the kept pixel back alone (resample 1) lets a fifth of them end in B, since
    the free pixels choose a mode while the noise still hides the kept one; RePaint's resampling lets them change
    their minds (DDIM 50 steps, 10 resamplings, jumps of 10: within 0.1 of all). Halfway, at 0, both are equally
    likely. n = 1000: 4 standard errors of a share near 1/2 are 0.063, of a mean of std 0.1 draws 0.013."""
    cfg, net, src, keep = two_modes(0.8)
    run = lambda r: ddpm.inpaint(net, cfg, src, keep, n=1000, sampler="ddim", steps=50, resample=r, jump=10) * 2 - 1
    plain, x = run(1).flatten(1).double(), run(10).flatten(1).double()
    assert (x[:, 0] - 0.8).abs().max() < 1e-6 and (plain[:, 0] - 0.8).abs().max() < 1e-6
    share = (x[:, 1] > 0).double().mean().item()
    assert share > 0.9 and share > (plain[:, 1] > 0).double().mean().item() + 0.1
    in_a = x[x[:, 1] > 0, 1:]
    torch.testing.assert_close(in_a.mean(0), torch.tensor([0.5, -0.5, -0.5], dtype=torch.double), rtol=0, atol=0.02)
    assert in_a.std(0).sub(0.1).abs().max() < 0.02
    cfg, net, src, keep = two_modes(0.0)
    x = ddpm.inpaint(net, cfg, src, keep, n=1000, seed=1, sampler="dpm++2m", steps=20) * 2 - 1
    assert abs((x.flatten(1)[:, 1] > 0).double().mean().item() - 0.5) < 0.065


def test_inpaint_of_point_masses_never_makes_a_hybrid():
    """Three glyphs of 4 pixels; two share the kept pixel's value, so each completion is one of those two, whole."""
    cfg = tiny_cfg(timesteps=1000, schedule="cosine", pred="v", image_size=2)
    targets = torch.tensor([[0.8, 0.6, -0.6, 0.2], [0.8, -0.6, 0.6, -0.2], [-0.8, 0.6, 0.6, 0.6]]).view(3, 1, 2, 2)
    keep = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2)
    x = ddpm.inpaint(Mixture(cfg, targets), cfg, (targets[:1] + 1) / 2, keep, n=400, steps=20) * 2 - 1
    d = (x[:, None] - targets[None]).flatten(2).norm(dim=2)  # (n, 3) distance to each glyph
    assert (d.min(1).values < 0.02).all() and (d.argmin(1) < 2).all()
    assert 0.4 < (d.argmin(1) == 0).float().mean() < 0.6


# ----------------------------------------------------------------------------------------------------
# Morphs

def test_ddpm_morph_starts_and_ends_on_the_two_glyphs():
    """On the exact denoiser of two glyphs, each inverts to a start noise that DDIM brings back to it."""
    cfg = tiny_cfg(timesteps=1000, schedule="cosine", pred="v", image_size=4)
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float() * 1.6 - 0.8
    a, b = ((t[None] + 1) / 2 for t in targets)
    frames = ddpm.morph(Mixture(cfg, targets), cfg, a, b, frames=7, steps=20)
    assert frames.shape == (7, 1, 4, 4)
    torch.testing.assert_close(frames[0], a[0], rtol=0, atol=0.01)
    torch.testing.assert_close(frames[-1], b[0], rtol=0, atol=0.01)


def test_vae_variations_and_morph():
    args = vae.get_parser().parse_args(tiny_args(".", "unused"))
    cfg = vae.config_from_args(args, fake_dataset())
    torch.manual_seed(0)
    net = vae.build(cfg).eval()
    x0, x1 = glyph01(0), glyph01(1)
    recon = vae.reconstruct(net, x0)
    near = vae.variations(net, cfg, x0, n=3, strength=1e-6)
    torch.testing.assert_close(near, recon.expand(3, -1, -1, -1), rtol=0, atol=1e-4)
    far = vae.variations(net, cfg, x0, n=3, strength=1.0, seed=1)
    assert (far - recon).abs().amax((1, 2, 3)).min() > 1e-3
    assert torch.equal(far, vae.variations(net, cfg, x0, n=3, strength=1.0, seed=1))
    m = vae.morph(net, cfg, x0, x1, frames=5)
    torch.testing.assert_close(m[[0, -1]], torch.cat([recon, vae.reconstruct(net, x1)]), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The glyph to start from, the masks, and the command line

def test_a_typed_kanji_is_rendered_as_the_training_data(data_dir, tmp_path, monkeypatch):
    images, cps = data.load_kanji(None, 32, data_dir, progress=False)
    i = int((cps == ord("海")).nonzero()[0, 0])
    assert torch.equal(data.glyph("海", 32, data_dir=data_dir), images[i][None])
    with pytest.raises(data.GanjiError, match="has no glyph for"):
        data.glyph("\U0001F600", 32, data_dir=data_dir)
    kana = data.glyph("あ", 32, data_dir=data_dir)  # in the font, not a kanji: drawn in the kanji's em box
    assert kana.shape == (1, 1, 32, 32) and kana.max() == 255
    # that drawing is the training render: a kanji missing from the set comes out exactly as the set has it
    real_load = data.load_kanji
    monkeypatch.setattr(data, "load_kanji", lambda *a, **k: (real_load(*a, **k)[0][:0], real_load(*a, **k)[1][:0]))
    assert torch.equal(data.glyph("海", 32, data_dir=data_dir), images[i][None])
    with pytest.raises(data.GanjiError, match="neither one character nor an image file"):
        data.glyph("海海", 32, data_dir=data_dir)
    from PIL import Image
    im = Image.new("L", (50, 50), 255)  # black ink on white paper, another size
    im.paste(0, (10, 10, 40, 20))
    im.save(tmp_path / "ink.png")
    x = data.glyph(str(tmp_path / "ink.png"), 32)
    assert x.shape == (1, 1, 32, 32) and set(x.unique().tolist()) == {0, 255}
    assert x[0, 0, 9, 16] == 255 and x[0, 0, 25, 16] == 0  # the bar is ink (bright), the paper dark


def test_named_and_png_masks(tmp_path):
    left, outside = sample.keep_mask("left", 64), sample.keep_mask("outside", 64)
    assert left[..., :32].all() and not left[..., 32:].any()
    assert torch.equal(sample.keep_mask("right", 64), 1 - left)
    assert torch.equal(sample.keep_mask("top", 64), left.transpose(-1, -2))
    assert torch.equal(sample.keep_mask("bottom", 64), 1 - left.transpose(-1, -2))
    band = round(64 / 5)
    assert outside[..., :band, :].all() and outside[..., :, -band:].all() and not outside[..., band:-band, band:-band].any()
    from PIL import Image
    im = Image.new("L", (16, 16), 0)
    im.paste(255, (0, 0, 8, 16))
    im.save(tmp_path / "m.png")
    assert torch.equal(sample.keep_mask(str(tmp_path / "m.png"), 64), left)
    with pytest.raises(data.GanjiError, match="--keep takes"):
        sample.keep_mask("middle", 64)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, data_dir):
    runs = tmp_path_factory.mktemp("runs")
    paths = {}
    for kind in data.KINDS:
        importlib.import_module(kind).main(tiny_args(data_dir, runs / kind, "--dry-run"))
        paths[kind] = str(runs / kind / "ckpt.pt")
    return paths


def test_sample_py_steering_draws_what_the_functions_draw(ckpts, data_dir, tmp_path):
    net, cfg = ddpm.load(ckpts["ddpm"])
    x0 = data.glyph("海", 32, data_dir=data_dir).float() / 255
    common = ["--data-dir", data_dir, "--sampler", "ddim", "--steps", "4"]
    cases = {"like": (["--like", "海", "--strength", "0.5"], ddpm.edit(net, cfg, x0, 0.5, 16, sampler="ddim", steps=4)),
             "keep": (["--keep", "left", "--from", "海", "--resample", "2"],
                      ddpm.inpaint(net, cfg, x0, sample.keep_mask("left", 32), 16, sampler="ddim", steps=4,
                                   resample=2))}
    for name, (flags, want) in cases.items():
        out = tmp_path / f"{name}.png"
        sample.main(["ddpm", ckpts["ddpm"], *common, *flags, "--out", str(out)])
        data.save_grid(want, tmp_path / "want.png", True, nrow=4)
        assert out.read_bytes() == (tmp_path / "want.png").read_bytes(), name
    res = run_cli("sample.py", "ddpm", ckpts["ddpm"], "--data-dir", data_dir, "--steps", "3", "--interpolate",
                  "--from", "森", "--to", "林", "--n", "8", "--out", str(tmp_path / "morph.png"))
    assert res.returncode == 0, res.stderr
    res = run_cli("sample.py", "vae", ckpts["vae"], "--data-dir", data_dir, "--like", "海", "--out",
                  str(tmp_path / "vae.png"))
    assert res.returncode == 0, res.stderr


def test_sample_py_steering_bad_input_is_one_line_exit_2(ckpts, data_dir, tmp_path, capsys):
    d = ["--data-dir", data_dir]
    for args, message in (
            (("gan", ckpts["gan"], "--keep", "left", "--from", "海"), "the GAN cannot start from a given glyph"),
            (("gan", ckpts["gan"], "--like", "海"), "the GAN cannot start from a given glyph"),
            (("vae", ckpts["vae"], "--keep", "left", "--from", "海"), "completion (--keep) needs a DDPM"),
            (("ddpm", ckpts["ddpm"], "--like", "海", "--strength", "1.5"), "--strength must be in (0, 1], got 1.5"),
            (("ddpm", ckpts["ddpm"], "--like", "海", "--strength", "0"), "--strength must be in (0, 1], got 0.0"),
            (("ddpm", ckpts["ddpm"], "--like", "海海"), "neither one character nor an image file"),
            (("ddpm", ckpts["ddpm"], "--like", "\U0001F600"), "has no glyph for"),
            (("ddpm", ckpts["ddpm"], "--like", "海", "--keep", "left"), "--like draws variations: give it alone"),
            (("ddpm", ckpts["ddpm"], "--keep", "left"), "give it with --from"),
            (("ddpm", ckpts["ddpm"], "--from", "海"), "--from needs --keep MASK"),
            (("ddpm", ckpts["ddpm"], "--interpolate", "--from", "森"), "takes --interpolate --from A --to B"),
            (("ddpm", ckpts["ddpm"], "--to", "林"), "takes --interpolate --from A --to B"),
            (("ddpm", ckpts["ddpm"], "--strength", "0.5"), "give it with --like"),
            (("ddpm", ckpts["ddpm"], "--keep", "middle", "--from", "海"), "--keep takes left, right"),
            (("ddpm", ckpts["ddpm"], "--keep", "left", "--from", "海", "--resample", "0"), "at least 1"),
            (("ddpm", ckpts["ddpm"], "--resample", "2"), "give them with --keep"),
            (("ddpm", ckpts["ddpm"], "--interpolate", "--from", "森", "--to", "林", "--sampler", "ancestral"),
             "runs DDIM"),
            (("ddpm", ckpts["ddpm"], "--like", str(tmp_path / "nope.png")), "neither one character nor an image")):
        with pytest.raises(SystemExit) as e:  # the path of a real command line, data.cli, in this process
            data.cli(lambda: sample.main([*args, *d, "--steps", "2", "--out", str(tmp_path / "x.png")]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "x.png").exists()
    res = run_cli("sample.py", "gan", ckpts["gan"], "--like", "海", *d)  # and one through a real process
    assert res.returncode == 2 and res.stderr.startswith("error: the GAN cannot") and res.stderr.count("\n") == 1


def test_pair_iou_by_hand():
    import evaluate
    a = torch.zeros(3, 1, 16, 16)
    a[:, :, 4:8, 4:12] = 1                                    # a bar of 32 pixels
    b = a.clone()
    b[1] = torch.roll(a[1], (2, -2), (-2, -1))                # the same bar 2 px off: a copy within COPY_SHIFT
    b[2] = 0
    b[2, :, 4:8, 4:8] = 1                                     # half of it
    torch.testing.assert_close(evaluate.pair_iou(a, b), torch.tensor([1.0, 1.0, 0.5]))
    keep = torch.zeros(1, 1, 16, 16)
    keep[..., :8] = 1                                         # the left half: where the half bar agrees
    torch.testing.assert_close(evaluate.pair_iou(a, b, keep)[2], torch.tensor(1.0))
    # unshifted, left half: a has rows 4-7 x cols 4-7 (16 px), b rows 6-9 x cols 2-7 (24), both rows 6-7 x cols 4-7
    torch.testing.assert_close(evaluate.pair_iou(a, b, keep)[1], torch.tensor(8 / (16 + 24 - 8)))


def test_evaluate_steering_table(ckpts, data_dir, tmp_path):
    import json
    res = run_cli("evaluate.py", "ddpm", ckpts["ddpm"], "--steering", "--sources", "4", "--per", "2", "--strengths",
                  "0.5,1", "--masks", "left", "--steps", "2", "--limit", "200", "--data-dir", data_dir,
                  "--json", str(tmp_path / "s.json"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    rows = json.load(open(tmp_path / "s.json"))["results"]
    assert [r["row"] for r in rows] == ["free samples", "variations, strength 0.5", "variations, strength 1",
                                        "completions, keep left"]
    assert all(r["n"] == 8 and 0 <= r["source_iou_median"] <= 1 for r in rows)
    assert rows[3]["kept_iou_median"] > 0.95 and rows[0]["kept_iou_median"] is None
    assert rows[2]["fid"] == rows[0]["fid"]  # strength 1 is the free sample from the same noise
