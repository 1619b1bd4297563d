"""Tests of evaluate.py: the metrics' math, the near-copy check, determinism, inputs, CLI, the weights file."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torchvision.utils import save_image

import data
import evaluate
from conftest import HERE, run_cli, tiny_args


@pytest.fixture(scope="module")
def glyphs(data_dir):
    """1,200 random Serif kanji at 64 px as [0, 1] floats, ink bright (code point order follows the
    radicals, so the first and the next 600 would be two different distributions)."""
    x = data.load_dataset("kanji", data_dir=data_dir, progress=False).images
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1200]].float() / 255


@pytest.fixture(scope="module")
def net():
    return evaluate.load_features()[0]


@pytest.fixture(scope="module")
def ref(glyphs, net):
    return evaluate.reference(glyphs[:600], "first 600", net)


# ------------------------------------------------------------------------------------- weights file

def test_import_does_no_work(tmp_path):
    code = f"import sys; sys.path.insert(0, {HERE!r}); import evaluate; print('PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    assert os.listdir(tmp_path) == []


def test_committed_weights_load_safely():
    assert os.path.getsize(evaluate.WEIGHTS) < 5e6
    d = torch.load(evaluate.WEIGHTS, weights_only=True)  # data only, never code
    assert d["version"] == evaluate.FEATURES_VERSION and d["input_size"] == 32 and d["dim"] == 256
    assert not any(k.startswith("head") for k in d["state_dict"])  # the trunk only
    assert d["accuracy"]["serif_top1"] > 0.9 and d["accuracy"]["serif_n"] > 12000
    net, _ = evaluate.load_features()
    x = torch.rand(3, 1, 64, 64)
    f = evaluate.features(net, x)
    assert f.shape == (3, 256) and f.dtype == torch.float32
    assert torch.equal(f, evaluate.features(net, x))
    small = x[:, :, ::2, ::2]  # any size is resized inside the network
    assert torch.allclose(evaluate.features(net, small), evaluate.features(net, evaluate.prepare(small, 32)))


def test_bad_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "f.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(data.GanjiError, match="not a readable"):
        evaluate.load_features(str(bad))
    with pytest.raises(data.GanjiError, match="train-features"):
        evaluate.load_features(str(tmp_path / "missing.pt"))


def test_features_tell_kanji_apart_across_fonts(data_dir, net):
    """The embedding of a Sans render is nearer its own Serif kanji than most other Serif kanji."""
    import pylopdf_fonts_jp
    serif = data.load_dataset("kanji", data_dir=data_dir, limit=300, progress=False)
    sans = data.load_dataset("kanji", data_dir=data_dir, font=str(pylopdf_fonts_jp.sans_path()), limit=300,
                             progress=False)
    common = sorted(set(serif.labels.tolist()) & set(sans.labels.tolist()))
    a = evaluate.features(net, serif.images[[serif.labels.tolist().index(c) for c in common]])
    b = evaluate.features(net, sans.images[[sans.labels.tolist().index(c) for c in common]])
    nearest = torch.cdist(b, a).argmin(1)
    assert (nearest == torch.arange(len(common))).float().mean() > 0.8


# -------------------------------------------------------------------------------------------- math

def test_sqrtm_trace_against_independent_formulas():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.double))
    a, b = torch.rand(6, generator=g, dtype=torch.double) + 0.1, torch.rand(6, generator=g, dtype=torch.double) + 0.1
    A, B = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T  # commuting: (AB)^1/2 = Q diag(sqrt(ab)) Q^T
    assert evaluate.sqrtm_trace(A, B) == pytest.approx((a * b).sqrt().sum().item(), rel=1e-9)
    m, n = torch.randn(6, 9, generator=g, dtype=torch.double), torch.randn(6, 9, generator=g, dtype=torch.double)
    A, B = m @ m.T, n @ n.T  # not commuting: AB has real positive eigenvalues, the trace sums their roots
    expected = torch.linalg.eigvals(A @ B).real.clamp_min(0).sqrt().sum().item()
    assert evaluate.sqrtm_trace(A, B) == pytest.approx(expected, rel=1e-6)


def test_fid_of_gaussians_matches_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]).double(), torch.tensor([1.0, 1.0, 0.0]).double()
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]).double(), torch.tensor([4.0, 1.0, 0.25]).double()
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2 = 5 + 1 + 1 + 0
    assert evaluate.fid(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(7.0, rel=1e-9)


def test_kid_matches_hand_computed_mmd():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g) + 0.5
    k = lambda a, b: (a.double() @ b.double() / 4 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / 42
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(7)) / 49
    mean, std = evaluate.kid(x, y, subsets=1, subset_size=7)
    assert mean == pytest.approx((xx + yy - 2 * xy).item(), rel=1e-6) and std == 0.0


def test_precision_recall_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    assert evaluate.precision_recall(real, real.clone(), k=1) == (1.0, 1.0)
    assert evaluate.precision_recall(real, real + 100, k=1) == (0.0, 0.0)
    # fakes squeezed near 0: 1-NN radii of reals are 1, so all fakes are inside (precision 1); fake radii
    # are 0.1, so only the real point 0 is covered (recall 1/5)
    fake = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4]])
    assert evaluate.precision_recall(real, fake, k=1) == (1.0, pytest.approx(0.2))


# ------------------------------------------------------------------------------- FID / KID on glyphs

def test_a_set_against_itself_scores_zero(glyphs, ref):
    m = evaluate.measure(glyphs[:600], ref)
    assert abs(m["fid"]) < 1e-6 and abs(m["kid"]) < 2e-3
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["near_copy_rate"] == 1.0 and m["closest_iou"]["min"] == 1.0
    assert m["n"] == 600 and m["reference_n"] == 600 and m["reference"] == "first 600"
    assert m["gray_share"] == m["reference_gray_share"] > 0


def test_gray_share_counts_pixels_between_paper_and_ink(glyphs):
    x = torch.tensor([0.0, 0.1, 0.1001, 0.5, 0.8999, 0.9, 1.0, 0.05]).view(1, 1, 2, 4)
    assert evaluate.gray_share(x) == 3 / 8  # strictly between 0.1 and 0.9
    crisp = glyphs[:200]
    assert evaluate.gray_share(evaluate.blur(crisp, 2.0)) > 2 * evaluate.gray_share(crisp)


def test_noise_is_far_worse_than_another_half_of_real(glyphs, ref):
    real = evaluate.fid_kid(glyphs[600:], ref)
    noise = evaluate.fid_kid(torch.rand(600, 1, 64, 64, generator=torch.Generator().manual_seed(0)), ref)
    # 600 vs 600 points in 256-d: FID's small-sample bias is large (~40), KID has none
    assert noise["fid"] > 10 * real["fid"] and noise["kid"] > 100 * abs(real["kid"]) + 1
    assert set(real) == {"fid", "kid", "kid_std"}


def test_results_are_deterministic_for_a_seed(glyphs, ref):
    x = evaluate.chimeras(glyphs[600:900], torch.Generator().manual_seed(0))
    a, b = evaluate.measure(x, ref, seed=3), evaluate.measure(x, ref, seed=3)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    c = evaluate.measure(x, ref, seed=4)
    assert c["fid"] == a["fid"] and c["kid"] != a["kid"]  # the seed only picks KID and PR subsets


# ---------------------------------------------------------------------------------------- near copies

def brute_force_iou(x01, bits, size, shift):
    """Exhaustive best IoU over every reference glyph and every shift, the slow obvious way."""
    best = torch.zeros(len(x01))
    b = bits.float()
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            q = (torch.roll(x01, (dy, dx), (2, 3)) > 0.5).flatten(1).float()
            inter = q @ b.T
            iou = inter / (q.sum(1, keepdim=True) + b.sum(1) - inter).clamp_min(1)
            best = torch.maximum(best, iou.max(1).values)
    return best


def test_closest_iou_is_exact_where_it_matters(glyphs, ref):
    x = torch.cat([glyphs[600:640], evaluate.chimeras(glyphs[:40], torch.Generator().manual_seed(1)),
                   torch.roll(glyphs[:20], (1, -2), (2, 3))])
    truth = brute_force_iou(x, ref.bits, 64, evaluate.COPY_SHIFT)
    exhaustive, _ = evaluate.closest_iou(x, ref, candidates=len(ref))
    assert torch.allclose(exhaustive, truth)
    fast, _ = evaluate.closest_iou(x, ref)
    high = truth > 0.7  # near copies and look-alikes: the candidate search never misses them
    assert high.sum() >= 20 and torch.equal(fast[high], truth[high])
    assert (fast <= truth + 1e-6).all() and (truth - fast).max() < 0.15


def test_planted_copies_are_found_and_scored_as_documented(glyphs, ref):
    """README: exact copies and copies shifted by up to COPY_SHIFT px score 1; a blur of sigma 1 px keeps
    them above COPY_IOU; shifted by 4 px or blurred with sigma 2 px they score like distinct kanji."""
    idx = torch.arange(0, 600, 30)  # 20 training glyphs
    x = glyphs[idx]
    cases = {"exact": (x, 1.0), "shift 2,-1": (torch.roll(x, (2, -1), (2, 3)), 1.0),
             "blur 1": (evaluate.blur(x, 1.0), 1.0), "shift 4": (torch.roll(x, (0, 4), (2, 3)), 0.0),
             "blur 2": (evaluate.blur(x, 2.0), 0.0)}
    for name, (copies, rate) in cases.items():
        planted = torch.cat([copies, torch.rand(10, 1, 64, 64)])  # among noise
        iou, j = evaluate.closest_iou(planted, ref)
        found = iou[:20] > evaluate.COPY_IOU
        assert found.float().mean().item() == pytest.approx(rate, abs=0.1), name
        assert (iou[20:] < 0.5).all()
        if rate == 1.0:
            assert torch.equal(j[:20], idx), name
        if name.startswith(("exact", "shift 2")):
            assert (iou[:20] == 1).all(), name
    m = evaluate.measure(torch.cat([x[:5], glyphs[600:615]]), ref)  # 5 copies among 15 new kanji
    assert m["near_copy_rate"] == pytest.approx(0.25, abs=0.05)


# ------------------------------------------------------------------------------------ inputs and CLI

def test_grid_png_and_folder_round_trip(glyphs, tmp_path):
    x = glyphs[:12]
    data.save_grid(x, tmp_path / "grid.png", display_invert=True, nrow=5)  # 3 rows, last one 2/5 full
    back = evaluate.load_images(str(tmp_path / "grid.png"), 64)
    assert back.dtype == torch.uint8 and torch.equal(back, (x * 255).round().to(torch.uint8))
    os.makedirs(tmp_path / "each")
    for i, img in enumerate(x[:4]):
        save_image(img, tmp_path / "each" / f"{i}.png")  # ink bright this time: no inversion
    assert torch.equal(evaluate.load_images(str(tmp_path / "each"), 64), (x[:4] * 255).round().to(torch.uint8))
    with pytest.raises(data.GanjiError, match="not a grid"):
        evaluate.load_images(str(tmp_path / "grid.png"), 32)


def test_cli_images_writes_json(data_dir, tmp_path):
    glyphs = data.load_dataset("kanji", data_dir=data_dir, progress=False).images.float() / 255
    os.makedirs(tmp_path / "pngs")
    for i in range(8):  # four of the 300 reference kanji, four far outside them; black on white like sample.py
        img = glyphs[i * 50] if i < 4 else glyphs[-i]
        save_image(data.to_picture(img, True), tmp_path / "pngs" / f"{i:04d}.png")
    out = run_cli("evaluate.py", "--images", str(tmp_path / "pngs"), "--limit", "300", "--data-dir", data_dir,
                  "--json", str(tmp_path / "r.json"), "--pairs", str(tmp_path / "pairs.png"))
    assert out.returncode == 0, out.stderr
    from PIL import Image
    assert Image.open(tmp_path / "pairs.png").size == (16 * 66 + 2, 66 + 2)  # 8 samples and their glyphs: one row
    r = json.load(open(tmp_path / "r.json"))["results"]
    assert r["n"] == 8 and r["reference_n"] == 300 and r["closest_iou"]["max"] == 1.0
    assert r["near_copy_rate"] == 0.5  # the four copies are caught (so the polarity was detected)
    assert {"fid", "kid", "kid_std", "precision", "recall", "near_copy_rate"} <= set(r)
    assert "FID" in out.stdout


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    for args in ([], ["--images", str(tmp_path / "missing")], ["vae"], ["--calibrate", "--n", "1"]):
        out = run_cli("evaluate.py", *args, "--limit", "10")
        assert out.returncode == 2, args
        assert out.stderr.startswith("error:") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = run_cli("evaluate.py", "-h")
    assert out.returncode == 0 and "--train-features" in out.stdout and "2000)" in out.stdout


def test_train_features_tiny(data_dir, tmp_path):
    path = tmp_path / "f.pt"
    out = run_cli("evaluate.py", "--train-features", "--limit", "64", "--epochs", "2", "--batch-size", "32",
                  "--data-dir", data_dir, "--features", str(path), "--precision", "fp32")
    assert out.returncode == 0, out.stderr
    net, d = evaluate.load_features(str(path))
    assert set(d["accuracy"]) >= {"sans_top1", "serif_top1", "serif_top5"} and d["accuracy"]["serif_n"] == 64
    assert "Serif" in out.stdout and evaluate.features(net, torch.rand(2, 1, 64, 64)).shape == (2, 256)


@pytest.mark.skipif(not os.path.exists(os.path.join(HERE, "vae.py")), reason="needs vae.py")
def test_cli_checkpoint(data_dir, tmp_path):
    """Samples of a (barely trained) 32 px VAE, measured against the 32 px kanji of its config."""
    run = tmp_path / "vae"
    out = run_cli("vae.py", *tiny_args(data_dir, run, "--dry-run"))
    assert out.returncode == 0, out.stderr
    out = run_cli("evaluate.py", "vae", str(run / "ckpt.pt"), "--n", "20", "--batch-size", "8", "--limit", "200",
                  "--data-dir", data_dir, "--json", str(tmp_path / "r.json"), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    r = json.load(open(tmp_path / "r.json"))["results"]
    assert r["n"] == 20 and r["reference"].endswith("32px first 200") and r["source"].startswith("vae ")


@pytest.mark.skipif(not os.path.exists(os.path.join(HERE, "ddpm.py")), reason="needs ddpm.py")
def test_cli_record_with_a_guide(data_dir, tmp_path):
    """--record writes the figures, the sampler and the guide (relative to the slim file) into its record."""
    import sample
    run = tmp_path / "ddpm"
    out = run_cli("ddpm.py", *tiny_args(data_dir, run, "--dry-run"))
    assert out.returncode == 0, out.stderr
    slim, guide = tmp_path / "pre" / "slim.pt", tmp_path / "pre" / "guide.pt"
    slim.parent.mkdir()
    for path in (slim, guide):
        sample.export(str(run / "ckpt.pt"), str(path))
    out = run_cli("evaluate.py", "ddpm", str(slim), "--n", "20", "--batch-size", "10", "--limit", "200", "--steps", "3",
                  "--guide", str(guide), "--guidance", "1.5", "--guide-min-t", "400", "--record",
                  "--data-dir", data_dir, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    r = data.load_checkpoint(str(slim))["record"]
    assert r["guide"] == {"file": "guide.pt", "guidance": 1.5, "min_t": 400} and r["evaluate"]["n"] == 20
    assert r["evaluate"]["sampler"] == "dpm++2m 3 steps, guided by guide.pt (guidance 1.5, t >= 400)"
    assert r["sampling"] == {"sampler": "dpm++2m", "steps": 3}  # what sample.py and the window now use for it
    assert sample.recorded_guide(str(slim)) == (str(guide), 1.5, 400)
    assert "guide: guide.pt (guidance 1.5, t >= 400), beside this file" in sample.describe(str(slim))
