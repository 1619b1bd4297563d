"""ddpm.py: the diffusion math against hand-written formulas, the U-Net, the samplers and checkpoints (the run
contract it shares with the other two scripts is in test_models.py)."""
import copy
import math

import pytest
import torch

import ddpm
from conftest import fake_dataset, tiny_args



def tiny_cfg(**kw):
    """The tiny run's config, from ddpm.py's own parser, with some keys overridden."""
    args = ddpm.get_parser().parse_args(tiny_args(".", "unused", "--lr", "1e-3", "--ema-decay", "0.9",
                                                  "--warmup", "2"))
    return {**ddpm.config_from_args(args, fake_dataset()), "total_steps": 10, **kw}


def randomized_net(cfg, seed=0):
    """An untrained U-Net: its random predictions are enough for the samplers to follow."""
    torch.manual_seed(seed)
    return ddpm.build(cfg).eval()


# ----------------------------------------------------------------------------------------------------
# Schedules

def test_linear_schedule_endpoints():
    s = ddpm.schedule(1000, "linear")
    assert s["betas"].dtype == torch.float64
    assert s["betas"][0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s["betas"][-1].item() == pytest.approx(0.02, rel=1e-12)
    # alpha_bar_T = prod(1 - beta) with beta linear in [1e-4, 0.02]: about 4.04e-5 (Ho et al.)
    prod = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert s["alpha_bar"][-1].item() == pytest.approx(prod, rel=1e-9)
    assert 4.0e-5 < prod < 4.1e-5
    assert s["alpha_bar_prev"][0].item() == 1.0
    # another T keeps the same ends after rescaling by 1000 / T
    s2 = ddpm.schedule(250, "linear")
    assert s2["betas"][0].item() == pytest.approx(4e-4) and s2["betas"][-1].item() == pytest.approx(0.08)


def test_cosine_schedule_endpoints():
    T, s0 = 1000, 0.008
    s = ddpm.schedule(T, "cosine")
    f = lambda t: math.cos((t / T + s0) / (1 + s0) * math.pi / 2) ** 2
    for t in (0, 1, 250, 500, 900):  # alpha_bar at index t is f(t + 1) / f(0) (index 0 = after one step)
        assert s["alpha_bar"][t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert 1 - s["alpha_bar"][0].item() < 1e-4  # almost no noise after the first step
    assert s["alpha_bar"][-1].item() < 1e-8     # pure noise at the end
    assert s["betas"].max().item() <= 0.999 and s["betas"][-1].item() == 0.999
    assert (s["betas"] > 0).all() and (s["alpha_bar"].diff() < 0).all()


# ----------------------------------------------------------------------------------------------------
# Forward process

def test_q_sample_matches_step_by_step_noising():
    """x_t = sqrt(1 - b_t) x_{t-1} + sqrt(b_t) z_t applied t times is x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.

    The chain's result is a linear function of x0 and z_1..z_t: its x0 coefficient (product of sqrt(1 - b))
    must equal sqrt(ab_t) and its noise coefficients' squares must sum to 1 - ab_t (both to 1e-12 in float64).
    With the same noises, eps = (sum_s c_s z_s) / sqrt(1 - ab_t) is a unit Gaussian, and q_sample with that eps
    gives the chain's x_t to 1e-12 (float64). A Monte-Carlo check of mean/variance closes the loop (5 sigma)."""
    T = 1000
    s = ddpm.schedule(T, "linear")
    betas, ab = s["betas"], s["alpha_bar"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    for t in (0, 10, 500, 999):
        x, coef_x0, coef_z = x0.clone(), 1.0, torch.zeros(t + 1, dtype=torch.float64)
        zs = torch.randn(t + 1, *x0.shape, generator=g, dtype=torch.float64)
        for k in range(t + 1):
            x = (1 - betas[k]).sqrt() * x + betas[k].sqrt() * zs[k]
            coef_z = (1 - betas[k]).sqrt() * coef_z
            coef_z[k] = betas[k].sqrt()
            coef_x0 = coef_x0 * (1 - betas[k]).sqrt().item()
        assert coef_x0 == pytest.approx(ab[t].sqrt().item(), rel=1e-12)
        assert (coef_z ** 2).sum().item() == pytest.approx(1 - ab[t].item(), rel=1e-12)
        eps = (coef_z.view(-1, 1, 1, 1, 1) * zs).sum(0) / (1 - ab[t]).sqrt()
        closed = ddpm.q_sample(x0, torch.full((4,), t), eps, ab)
        torch.testing.assert_close(closed, x, rtol=0, atol=1e-12)

    # Monte Carlo: 20000 chains from x0 = 0.5 to t = 200 vs N(sqrt(ab) 0.5, 1 - ab)
    t, n = 200, 20000
    x = torch.full((n,), 0.5, dtype=torch.float64)
    for k in range(t + 1):
        x = (1 - betas[k]).sqrt() * x + betas[k].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    mean, var = 0.5 * ab[t].sqrt().item(), 1 - ab[t].item()
    assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / n)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x0) from multiplying the Gaussians q(x_{t-1} | x0) and q(x_t | x_{t-1}) by hand."""
    for kind in ("linear", "cosine"):
        s = ddpm.schedule(1000, kind)
        g = torch.Generator().manual_seed(1)
        x0, xt = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        for t in (1, 2, 100, 999):
            b, ab_prev = s["betas"][t].item(), s["alpha_bar"][t - 1].item()
            precision = 1 / (1 - ab_prev) + (1 - b) / b
            var = 1 / precision
            mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - b) * xt / b)
            m, v = ddpm.posterior(x0, xt, t, s)
            assert v == pytest.approx(var, rel=1e-9)
            torch.testing.assert_close(m, mean, rtol=1e-9, atol=1e-12)
        m, v = ddpm.posterior(x0, xt, 0, s)  # the last step returns x0 itself
        assert v == 0 and torch.allclose(m, x0, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# Reverse steps

def test_prediction_split_consistent():
    """x0 and eps recovered from an eps or v prediction reproduce x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    for ab in (0.999, 0.5, 1e-3):
        xt = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps
        for pred, out in (("eps", eps), ("v", ddpm.v_target(x0, eps, ab))):
            x0p, epsp = ddpm.split_prediction(out, xt, ab, pred)
            torch.testing.assert_close(x0p, x0, rtol=0, atol=1e-9)
            torch.testing.assert_close(epsp, eps, rtol=0, atol=1e-9)
        # clipping keeps the pair coherent with x_t
        x0c, epsc = ddpm.split_prediction(eps * 3, xt, ab, "eps", clip=True)
        assert x0c.abs().max() <= 1
        torch.testing.assert_close(ab ** 0.5 * x0c + (1 - ab) ** 0.5 * epsc, xt, rtol=0, atol=1e-9)


def test_ddim_eta0_stays_on_the_x0_eps_line():
    """With the true eps, a deterministic DDIM step lands exactly on q(x_prev | x0) with the same eps,
    and the final step (ab_prev = 1) returns x0."""
    s = ddpm.schedule(1000, "cosine")
    ab = s["alpha_bar"].tolist()
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    for t, prev in ((999, 979), (500, 100), (20, 0)):
        xt = ab[t] ** 0.5 * x0 + (1 - ab[t]) ** 0.5 * eps
        x0p, epsp = ddpm.split_prediction(eps, xt, ab[t], "eps")
        x = ddpm.ddim_step(x0p, epsp, ab[t], ab[prev], eta=0.0)
        torch.testing.assert_close(x, ab[prev] ** 0.5 * x0 + (1 - ab[prev]) ** 0.5 * eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(ddpm.ddim_step(x0p, epsp, ab[20], 1.0, eta=0.0), x0, rtol=0, atol=1e-9)


def test_ddim_eta1_consecutive_is_the_ancestral_step():
    """DDIM with eta = 1 between t and t - 1 equals the DDPM step, in both of Ho et al.'s forms:
    posterior mean with x0, and 1/sqrt(a_t) (x_t - b_t / sqrt(1 - ab_t) eps) + sqrt(post_var) z."""
    s = ddpm.schedule(1000, "linear")
    ab, betas = s["alpha_bar"].tolist(), s["betas"].tolist()
    g = torch.Generator().manual_seed(4)
    xt, out, z = torch.randn(3, 2, 1, 8, 8, generator=g, dtype=torch.float64)
    for t in (999, 500, 1):
        x0, eps = ddpm.split_prediction(out, xt, ab[t], "eps")
        anc = ddpm.ancestral_step(x0, xt, t, s, z)
        ho = (xt - betas[t] / (1 - ab[t]) ** 0.5 * eps) / (1 - betas[t]) ** 0.5 + s["post_var"][t].item() ** 0.5 * z
        ddim = ddpm.ddim_step(x0, eps, ab[t], ab[t - 1], eta=1.0, noise=z)
        torch.testing.assert_close(anc, ho, rtol=0, atol=1e-9)
        torch.testing.assert_close(ddim, anc, rtol=0, atol=1e-9)


def test_min_snr_weights_at_known_snrs():
    """SNR 1, 9 and 1/9 (ab = 0.5, 0.9, 0.1), gamma 5: eps weights min(SNR, 5) / SNR, v weights
    min(SNR, 5) / (SNR + 1)."""
    ab = torch.tensor([0.5, 0.9, 0.1], dtype=torch.float64)
    torch.testing.assert_close(ddpm.loss_weight(ab, "eps", "min-snr", 5.0), torch.tensor([1.0, 5 / 9, 1.0]).double())
    torch.testing.assert_close(ddpm.loss_weight(ab, "v", "min-snr", 5.0), torch.tensor([0.5, 0.5, 0.1]).double())
    assert torch.equal(ddpm.loss_weight(ab, "eps", "uniform"), torch.ones(3).double())


def test_uniform_weight_is_the_plain_mse_and_min_snr_weights_each_image():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    losses = {}
    for kind in ("uniform", "min-snr"):
        torch.manual_seed(1)
        tr = ddpm.Trainer(tiny_cfg(image_size=16, pred="v", loss_weight=kind, snr_gamma=5.0), "cpu")
        net = copy.deepcopy(tr.net)
        torch.manual_seed(2)
        losses[kind] = tr.step(x)["loss"]
        torch.manual_seed(2)  # the same t and eps the step drew
        t = torch.randint(0, 1000, (4,))
        eps = torch.randn_like(x)
        ab = tr.alpha_bar[t]
        v = ddpm.v_target(x, eps, ab.view(-1, 1, 1, 1))
        per_image = (net(ddpm.q_sample(x, t, eps, tr.alpha_bar), t) - v).pow(2).mean((1, 2, 3))
        want = per_image.mean() if kind == "uniform" else (ddpm.loss_weight(ab, "v", "min-snr", 5.0) * per_image).mean()
        assert losses[kind] == pytest.approx(want.item(), rel=1e-5)
    assert losses["uniform"] != pytest.approx(losses["min-snr"])


def test_ddim_timesteps():
    assert ddpm.ddim_timesteps(1000, 50)[-1] == 999 and len(set(ddpm.ddim_timesteps(1000, 50))) == 50
    assert ddpm.ddim_timesteps(20, 20) == list(range(20))
    assert ddpm.ddim_timesteps(20, 500) == list(range(20))  # never more steps than T


# ----------------------------------------------------------------------------------------------------
# Samplers on a real (random) U-Net

def test_ddim_sampler_deterministic_for_a_seed():
    cfg = tiny_cfg(timesteps=100)
    net = randomized_net(cfg)
    state = torch.get_rng_state()
    calls = []
    a = ddpm.sample(net, cfg, 4, seed=7, steps=10, progress=lambda i, n: calls.append((i, n)))
    torch.manual_seed(123)  # whatever the global RNG does, the images depend on the seed only
    again = ddpm.sample(net, cfg, 4, seed=7, steps=10)
    torch.set_rng_state(state)
    b = ddpm.sample(net, cfg, 4, seed=7, steps=10, batch_size=3)  # other chunking, same start noise
    c = ddpm.sample(net, cfg, 4, seed=8, steps=10)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    assert a.shape == (4, 1, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, again)
    # another batch size may pick other conv kernels: equal up to float32 rounding
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (a - c).abs().max() > 0.05
    assert calls == [(i, 10) for i in range(1, 11)]


def test_ddim_all_steps_eta1_follows_ancestral_sampler():
    """Same seed -> same start noise and same per-step noise -> the same trajectory (float32, atol 1e-4)."""
    cfg = tiny_cfg(timesteps=30, schedule="cosine")
    net = randomized_net(cfg, seed=1)
    anc = ddpm.sample(net, cfg, 3, seed=5, sampler="ancestral")
    ddim = ddpm.sample(net, cfg, 3, seed=5, sampler="ddim", steps=30, eta=1.0)
    ddim0 = ddpm.sample(net, cfg, 3, seed=5, sampler="ddim", steps=30, eta=0.0)
    torch.testing.assert_close(ddim, anc, rtol=0, atol=1e-4)
    assert (ddim0 - anc).abs().max() > 1e-2  # and the comparison is not vacuous


def test_bf16_sampling_draws_the_fp32_pictures_within_rounding(monkeypatch):
    """Where the DDPM samples in bf16 (data.sampling_precision), it draws the fp32 images up to bf16's rounding."""
    cfg = tiny_cfg(timesteps=100)
    net = randomized_net(cfg, seed=2)
    fp32 = ddpm.sample(net, cfg, 8, seed=3, steps=10)
    monkeypatch.setattr(ddpm.data, "sampling_precision", lambda device: "bf16")
    bf16 = ddpm.sample(net, cfg, 8, seed=3, steps=10)
    err = (bf16 - fp32).abs()
    assert 0 < err.max() and err.mean() < 0.02, (err.mean(), err.max())


class Oracle(torch.nn.Module):
    """The exact denoiser of a one-image dataset x*: eps = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t) (or its v)."""

    def __init__(self, cfg, target):
        super().__init__()
        self.ab = ddpm.schedule(cfg["timesteps"], cfg["schedule"])["alpha_bar"].float()
        self.target, self.pred = target, cfg["pred"]

    def forward(self, x, t):
        ab = self.ab[t].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.target) / (1 - ab).sqrt()
        return eps if self.pred == "eps" else ddpm.v_target(self.target, eps, ab)


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_samplers_recover_the_image_of_a_one_image_dataset(pred):
    """Every sampler, fed the exact denoiser of a single image, must end on that image (uint8 precision)."""
    cfg = tiny_cfg(timesteps=200, schedule="cosine", pred=pred, image_size=8)
    target = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    net = Oracle(cfg, target)
    for kw in (dict(sampler="ancestral"), dict(steps=10), dict(steps=3, eta=0.5), dict(steps=1),
               dict(sampler="dpm++2m", steps=10), dict(sampler="dpm++2m", steps=2)):
        x = ddpm.sample(net, cfg, 3, seed=1, **kw)
        torch.testing.assert_close(x, ((target + 1) / 2).expand(3, -1, -1, -1), rtol=0, atol=1 / 255, msg=str(kw))


def test_dpm_solver_first_step_is_the_ddim_step():
    """Without a previous estimate DPM-Solver++ is first order, which is DDIM (eta 0) exactly."""
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    ab_t, ab_next = 0.3, 0.6
    eps = (x - ab_t ** 0.5 * x0) / (1 - ab_t) ** 0.5
    got, h = ddpm.dpm_solver_2m_step(x, x0, None, None, ab_t, ab_next)
    torch.testing.assert_close(got, ddpm.ddim_step(x0, eps, ab_t, ab_next, 0.0), rtol=0, atol=1e-6)
    assert h == pytest.approx(0.5 * math.log(ab_next / (1 - ab_next)) - 0.5 * math.log(ab_t / (1 - ab_t)))
    assert ddpm.dpm_solver_2m_step(x, x0, x0, h, ab_t, 1.0)[0] is x0  # the last step lands on the estimate


def test_dpm_solver_second_order_extrapolates_x0_in_log_snr():
    """D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h (Lu et al. 2022, Algorithm 2), by hand for numbers."""
    x, x0, x0_prev = torch.tensor([0.5]), torch.tensor([0.2]), torch.tensor([-0.4])
    ab_t, ab_next, h_prev = 0.2, 0.5, 0.7
    lam = lambda a: 0.5 * math.log(a / (1 - a))
    h = lam(ab_next) - lam(ab_t)
    d = 0.2 + (0.2 + 0.4) * h / (2 * h_prev)
    want = math.sqrt(0.5 / 0.8) * 0.5 - math.sqrt(0.5) * (math.exp(-h) - 1) * d
    got, _ = ddpm.dpm_solver_2m_step(x, x0, x0_prev, h_prev, ab_t, ab_next)
    assert got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_dpm_solver_with_many_steps_agrees_with_ddim(pred):
    """Both solve the same probability-flow ODE, here for the exact denoiser of 8 tiny 2x2 images, whose ODE
    really bends: with 200 steps both end on the same points (to 1e-3 on [0, 1] pixels); with 15 steps the
    second-order solver ends nearer the 1000-step DDIM solution than DDIM does (mean error 0.15 vs 0.42 max)."""
    cfg = tiny_cfg(timesteps=1000, schedule="cosine", pred=pred, image_size=2)
    net = Mixture(cfg, torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9)
    run = lambda sampler, steps: ddpm.sample(net, cfg, 64, seed=2, sampler=sampler, steps=steps)
    exact = run("ddim", 1000)
    assert (run("dpm++2m", 200) - run("ddim", 200)).abs().max() < 1e-3
    assert (run("dpm++2m", 15) - exact).abs().mean() < 0.5 * (run("ddim", 15) - exact).abs().mean()


class Mixture(torch.nn.Module):
    """The exact denoiser of a dataset of a few images: E[x0 | x_t] is a softmax-weighted mean of them."""

    def __init__(self, cfg, targets):
        super().__init__()
        self.ab = ddpm.schedule(cfg["timesteps"], cfg["schedule"])["alpha_bar"].double()
        self.targets, self.pred = targets.double(), cfg["pred"]

    def forward(self, x, t):
        ab = self.ab[t].view(-1, 1, 1, 1)
        x = x.double()
        d2 = ((x[:, None] - ab[:, None].sqrt() * self.targets[None]) ** 2).flatten(2).sum(-1)  # (B, K)
        w = torch.softmax(-d2 / (2 * (1 - ab.view(-1, 1))), dim=1)
        x0 = torch.einsum("bk,kchw->bchw", w, self.targets)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return (eps if self.pred == "eps" else ddpm.v_target(x0, eps, ab)).float()


class Constant(torch.nn.Module):
    """A "network" whose prediction is the same number everywhere."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, t):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_autoguidance_mixes_the_predictions_by_hand(pred):
    """One DDIM step from x_T lands on the x0 of the mixed prediction w * net + (1 - w) * guide (Karras et al.
    2024), clamped to [-1, 1]: by hand for constant predictions 0.3 (net) and -0.5 (guide), w = 2.5."""
    cfg = tiny_cfg(timesteps=100, pred=pred, image_size=4)
    ab = ddpm.schedule(100, cfg["schedule"])["alpha_bar"][-1].item()
    xT = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))  # sample()'s start noise for seed 4
    out = 2.5 * 0.3 + (1 - 2.5) * -0.5
    x0 = (xT - (1 - ab) ** 0.5 * out) / ab ** 0.5 if pred == "eps" else ab ** 0.5 * xT - (1 - ab) ** 0.5 * out
    got = ddpm.sample(Constant(0.3), cfg, 3, seed=4, steps=1, guide=Constant(-0.5), guidance=2.5)
    torch.testing.assert_close(got, (x0.clamp(-1, 1) + 1) / 2, rtol=0, atol=1e-6)
    unguided = ddpm.sample(Constant(0.3), cfg, 3, seed=4, steps=1)
    assert torch.equal(ddpm.sample(Constant(0.3), cfg, 3, seed=4, steps=1, guide=Constant(-0.5), guidance=1.0),
                       unguided)
    assert (got - unguided).abs().max() > 0.01


def test_a_model_guided_by_itself_samples_as_unguided():
    """w D + (1 - w) D = D: the exact denoiser guided by itself ends on its image for any weight."""
    cfg = tiny_cfg(timesteps=200, schedule="cosine", pred="v", image_size=8)
    target = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    net = Oracle(cfg, target)
    for kw in (dict(sampler="dpm++2m", steps=10), dict(steps=5)):
        x = ddpm.sample(net, cfg, 2, seed=1, guide=net, guidance=3.0, **kw)
        torch.testing.assert_close(x, ((target + 1) / 2).expand(2, -1, -1, -1), rtol=0, atol=1 / 255, msg=str(kw))


class Recorder(Constant):
    """A constant "network" that notes every timestep it is called at."""

    def __init__(self, value):
        super().__init__(value)
        self.ts = []

    def forward(self, x, t):
        self.ts.append(int(t[0]))
        return super().forward(x, t)


def test_guide_min_t_guides_only_the_noisier_steps():
    """A guidance interval (Kynkäänniemi et al. 2024): the guide is called at exactly the sampler's steps with
    t >= guide_min_t; 0 is full guidance, and a bound above every step is the net alone."""
    cfg = tiny_cfg(timesteps=100, pred="v", image_size=4)
    ts = ddpm.ddim_timesteps(100, 10)[::-1]  # the 10 steps, noisiest first
    kw = dict(sampler="dpm++2m", steps=10, guidance=2.0)
    full = ddpm.sample(Constant(0.3), cfg, 2, seed=1, guide=Recorder(-0.5), **kw)
    guide = Recorder(-0.5)
    half = ddpm.sample(Constant(0.3), cfg, 2, seed=1, guide=guide, guide_min_t=50, **kw)
    assert guide.ts == [t for t in ts if t >= 50] and 0 < len(guide.ts) < len(ts)
    assert torch.equal(ddpm.sample(Constant(0.3), cfg, 2, seed=1, guide=Recorder(-0.5), guide_min_t=0, **kw), full)
    assert torch.equal(ddpm.sample(Constant(0.3), cfg, 2, seed=1, guide=Recorder(-0.5), guide_min_t=ts[0] + 1, **kw),
                       ddpm.sample(Constant(0.3), cfg, 2, seed=1, sampler="dpm++2m", steps=10))
    assert not torch.equal(half, full)


def test_check_guide_names_what_differs():
    cfg = tiny_cfg()
    ddpm.check_guide(cfg, {**cfg, "width": 0.5, "epochs": 3})  # capacity and training may differ
    with pytest.raises(ddpm.data.GanjiError, match="image_size 64 vs 32, pred eps vs v"):
        ddpm.check_guide({**cfg, "pred": "v"}, {**cfg, "image_size": 64, "pred": "eps"})


def test_interpolate_shape_and_ends():
    cfg = tiny_cfg(timesteps=50)
    net = randomized_net(cfg)
    x = ddpm.interpolate(net, cfg, rows=2, frames=4, seed=3, steps=5)
    assert x.shape == (8, 1, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert (x[0] - x[3]).abs().max() > 1e-3 and (x[0] - x[4]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# U-Net

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64])
def test_unet_keeps_shapes(channels, size):
    net = ddpm.UNet(channels, width=0.125, attn=True)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_unet_odd_size_and_parameter_counts():
    with torch.no_grad():
        assert ddpm.UNet(1, 0.125)(torch.randn(1, 1, 28, 28), torch.tensor([5])).shape == (1, 1, 28, 28)
    count = lambda **kw: sum(p.numel() for p in ddpm.UNet(**kw).parameters())
    assert 22e6 < count(width=1.0) < 23e6 and 23.5e6 < count(width=1.0, attn=True) < 24.5e6


def test_attention_is_per_image():
    """Changing the other images of a batch changes nothing for image 0, in the layer and in the whole U-Net."""
    torch.manual_seed(0)
    att = ddpm.Attention(64)
    torch.nn.init.normal_(att.proj.weight, std=0.1)
    a, b, c = torch.randn(3, 1, 64, 16, 16)
    with torch.no_grad():
        ref = att(a)
        torch.testing.assert_close(att(torch.cat([a, b]))[:1], ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(att(torch.cat([a, c, b]))[:1], ref, rtol=0, atol=1e-5)
        assert (att(torch.cat([b]))[:1] - ref).abs().max() > 1e-2
        net = randomized_net(tiny_cfg(attn=True))
        x = torch.randn(3, 1, 32, 32)
        t = torch.tensor([10, 500, 900])
        torch.testing.assert_close(net(x, t)[:1], net(x[:1], t[:1]), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Training, checkpoints and the run contract

def test_lr_schedule_is_warmup_then_cosine():
    assert ddpm.lr_at(0, 1000, 1.0, 100) == pytest.approx(0.01)
    assert ddpm.lr_at(99, 1000, 1.0, 100) == pytest.approx(1.0)
    assert ddpm.lr_at(100 + 450, 1000, 1.0, 100) == pytest.approx(0.5)
    assert ddpm.lr_at(999, 1000, 1.0, 100) < 1e-4
    assert ddpm.lr_at(0, 64, 1.0, 500) == pytest.approx(1 / 6)  # warm-up capped at a tenth of a short run


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_trainer_step_learns_and_checkpoint_round_trip(tmp_path, pred):
    cfg = tiny_cfg(pred=pred, timesteps=100, total_steps=30, image_size=16)
    torch.manual_seed(0)
    tr = ddpm.Trainer(cfg, "cpu")
    x = (torch.rand(8, 1, 16, 16) > 0.7).float() * 2 - 1
    losses = [tr.step(x)["loss"] for _ in range(30)]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-5:]) < sum(losses[:5])
    path = str(tmp_path / "ckpt.pt")
    ddpm.save_checkpoint(path, tr, 1, 0, 1.0)
    net, cfg2 = ddpm.load(path)
    assert cfg2 == cfg and not net.training
    for p, q in zip(net.parameters(), tr.ema.parameters()):  # the sampling net carries the EMA weights
        assert torch.equal(p, q)
    torch.testing.assert_close(ddpm.sample(net, cfg2, 4, seed=1, steps=5),
                               ddpm.sample(tr.sample_net, cfg, 4, seed=1, steps=5), rtol=0, atol=0)
