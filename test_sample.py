"""sample.py, slim files (pretrained/) and the window, on tiny checkpoints the training scripts write."""
import importlib
import os
import subprocess

import pytest
import torch

import data
import sample
from conftest import run_cli, tiny_args

PRETRAINED = {kind: os.path.join(sample.PRETRAINED, f"{kind}_kanji.pt") for kind in data.KINDS}
GUIDE = os.path.join(sample.PRETRAINED, "ddpm_kanji_guide.pt")  # the pretrained DDPM's autoguidance partner


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, data_dir):
    """A tiny dry-run checkpoint of each kind, written by the training scripts themselves."""
    runs = tmp_path_factory.mktemp("runs")
    paths = {}
    for kind in data.KINDS:
        out = runs / f"{kind}_tiny"
        importlib.import_module(kind).main(tiny_args(data_dir, out, "--dry-run"))
        paths[kind] = str(out / "ckpt.pt")
    return paths


def test_sample_cli_vae_prior_flag(ckpts, tmp_path):
    """The tiny VAE (--prior gmm, the default) draws from its mixture, or from N(0, I) with --prior normal."""
    import vae
    net, cfg = vae.load(ckpts["vae"])
    for prior in ("gmm", "normal"):
        res = run_cli("sample.py", "vae", ckpts["vae"], "--prior", prior, "--out", str(tmp_path / f"{prior}.png"))
        assert res.returncode == 0, res.stderr
        data.save_grid(vae.sample(net, cfg, 16, seed=0, prior=prior), str(tmp_path / "direct.png"),
                       cfg["display_invert"], nrow=4)
        assert (tmp_path / f"{prior}.png").read_bytes() == (tmp_path / "direct.png").read_bytes()
    assert (tmp_path / "gmm.png").read_bytes() != (tmp_path / "normal.png").read_bytes()


@pytest.mark.parametrize("kind", data.KINDS)
def test_sample_cli_each_kind_is_reproducible(ckpts, kind, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        res = run_cli("sample.py", kind, ckpts[kind], "--seed", "7", "--steps", "5", "--out", str(out),
                      "--each", str(tmp_path / "each"))
        assert res.returncode == 0, res.stderr
    assert a.read_bytes() == b.read_bytes()
    assert len(os.listdir(tmp_path / "each")) == 16
    res = run_cli("sample.py", "auto", ckpts[kind], "--seed", "8", "--steps", "5", "--out", str(b))
    assert res.returncode == 0 and a.read_bytes() != b.read_bytes()
    res = run_cli("sample.py", kind, ckpts[kind], "--interpolate", "--n", "8", "--nrow", "4", "--steps", "3",
                  "--out", str(tmp_path / "m.png"))
    assert res.returncode == 0, res.stderr
    from PIL import Image
    assert Image.open(tmp_path / "m.png").size == (4 * 34 + 2, 2 * 34 + 2)  # 2 rows of 4, 32 px + padding
    if kind == "ddpm":
        res = run_cli("sample.py", kind, ckpts[kind], "--sampler", "dpm++2m", "--steps", "3", "--out", str(b))
        assert res.returncode == 0, res.stderr


def test_sample_py_ddpm_equals_direct_call(ckpts, tmp_path):
    import ddpm
    out = tmp_path / "via_cli.png"
    sample.main(["ddpm", ckpts["ddpm"], "--seed", "3", "--sampler", "ddim", "--steps", "4", "--eta", "0.5",
                 "--out", str(out)])
    net, cfg = ddpm.load(ckpts["ddpm"])
    direct = ddpm.sample(net, cfg, 16, seed=3, device="cpu", sampler="ddim", steps=4, eta=0.5)
    data.save_grid(direct, tmp_path / "direct.png", cfg["display_invert"], nrow=4)
    assert out.read_bytes() == (tmp_path / "direct.png").read_bytes()


def test_sample_py_guide_equals_direct_call(ckpts, tmp_path):
    """--guide CKPT --guidance W draws what ddpm.sample draws with that guide network; another guide, other images."""
    import ddpm
    ck = torch.load(ckpts["ddpm"], weights_only=True)
    ck["ema"] = {k: v * 0.9 if v.is_floating_point() else v for k, v in ck["ema"].items()}
    guide_path = str(tmp_path / "guide.pt")
    torch.save(ck, guide_path)
    out = tmp_path / "via_cli.png"
    sample.main(["ddpm", ckpts["ddpm"], "--seed", "3", "--sampler", "dpm++2m", "--steps", "4", "--guide", guide_path,
                 "--guidance", "3", "--out", str(out)])
    sample.main(["ddpm", ckpts["ddpm"], "--seed", "3", "--sampler", "dpm++2m", "--steps", "4", "--guide", guide_path,
                 "--guidance", "3", "--guide-min-t", "500", "--out", str(tmp_path / "interval_cli.png")])
    (net, cfg), (guide, _) = ddpm.load(ckpts["ddpm"]), ddpm.load(guide_path)
    for name, kw in (("direct", {"guide": guide, "guidance": 3.0}), ("unguided", {}),
                     ("interval", {"guide": guide, "guidance": 3.0, "guide_min_t": 500})):
        x = ddpm.sample(net, cfg, 16, seed=3, sampler="dpm++2m", steps=4, **kw)
        data.save_grid(x, tmp_path / f"{name}.png", cfg["display_invert"], nrow=4)
    assert out.read_bytes() == (tmp_path / "direct.png").read_bytes()
    assert out.read_bytes() != (tmp_path / "unguided.png").read_bytes()
    assert (tmp_path / "interval_cli.png").read_bytes() == (tmp_path / "interval.png").read_bytes()
    assert (tmp_path / "interval.png").read_bytes() not in (out.read_bytes(), (tmp_path / "unguided.png").read_bytes())


def test_bad_guide_flags_one_line_exit_2(ckpts, tmp_path):
    for args, message in (
            (("ddpm", ckpts["ddpm"], "--guidance", "2"), "--guidance needs --guide"),
            (("ddpm", ckpts["ddpm"], "--guide-min-t", "500"), "--guide-min-t needs --guide"),
            (("ddpm", ckpts["ddpm"], "--guide", ckpts["ddpm"], "--guide-min-t", "1000"), "must be in 0..999, got 1000"),
            (("gan", ckpts["gan"], "--guide", ckpts["ddpm"]), "guides DDPM checkpoints only, not a gan"),
            (("ddpm", ckpts["ddpm"], "--guide", ckpts["ddpm"], "--guidance", "0.5"), "must be at least 1"),
            (("ddpm", ckpts["ddpm"], "--guide", PRETRAINED["ddpm"]), "does not fit this model (image_size 64 vs 32"),
            (("ddpm", ckpts["ddpm"], "--guide", ckpts["vae"]), "is a vae checkpoint, not ddpm")):
        res = run_cli("sample.py", *args, "--steps", "2", "--out", str(tmp_path / "x.png"))
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "x.png").exists()


def _bad_inputs(ckpts, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    raw = open(ckpts["vae"], "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    future = tmp_path / "future.pt"
    ck = torch.load(ckpts["vae"], weights_only=True)
    ck["version"] = data.FORMAT_VERSION + 1
    torch.save(ck, future)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    return {"missing": ("vae", str(tmp_path / "nope.pt"), "not found"),
            "text": ("auto", str(text), "not a readable checkpoint"),
            "truncated": ("vae", str(truncated), "not a readable checkpoint"),
            "foreign": ("auto", str(foreign), "not a GANji checkpoint"),
            "other kind": ("gan", ckpts["vae"], "is a vae checkpoint, not gan"),
            "version": ("vae", str(future), "format version")}


def test_sample_bad_inputs_one_line_exit_2(ckpts, tmp_path):
    for name, (kind, path, message) in _bad_inputs(ckpts, tmp_path).items():
        res = run_cli("sample.py", kind, path, "--out", str(tmp_path / "x.png"))
        assert res.returncode == 2, name
        assert message in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, name
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def xvfb():
    import shutil
    if not shutil.which("Xvfb"):
        pytest.skip("Xvfb is not installed (.ci/run installs the Debian package xvfb)")
    display = f":{os.getpid() % 500 + 100}"
    proc = subprocess.Popen(["Xvfb", display, "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time
    time.sleep(1.0)
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = display
    yield display
    proc.terminate()
    if old is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = old


def _wait(root, app, timeout=120):
    import time
    t = time.time()
    while app.busy and time.time() - t < timeout:
        root.update()
        time.sleep(0.02)
    for _ in range(10):
        root.update()


def test_gui_generates_in_a_real_window(ckpts, xvfb, tmp_path, data_dir):
    import tkinter as tk
    from PIL import Image, ImageGrab
    import io
    import tkinter_gui

    runs = os.path.dirname(os.path.dirname(ckpts["vae"]))
    root = tk.Tk()
    try:
        app = tkinter_gui.App(root, runs, data_dir=data_dir)
        # the pretrained models first (the DDPM's guide is its part, not a model), the DDPM selected, then the runs
        assert app.paths[:3] == sorted(PRETRAINED.values()) and len(app.paths) == 6 and GUIDE not in app.paths
        assert app.paths[app.listbox.curselection()[0]] == PRETRAINED["ddpm"]
        info = app.record.get()
        assert "FID" in info and "trained:" in info and "guide:" in info and info.count("command:") == 1
        how = sample.recommended(PRETRAINED["ddpm"])
        assert (app.sampler.get(), app.steps.get()) == (how["sampler"], how["steps"])
        for kind in ("gan", "vae", "ddpm"):  # each pretrained model, with the window's default settings
            app.select(PRETRAINED[kind])
            app.generate_button.invoke()
            assert app.busy
            _wait(root, app)
            assert app.status.get().startswith(f"Showing {kind}"), app.status.get()
            assert ("guided by ddpm_kanji_guide.pt" in app.status.get()) == (kind == "ddpm")  # as its record says
            shown = Image.open(io.BytesIO(app.png)).convert("L")
            assert shown.width >= 256
            hist = shown.histogram()
            assert sum(hist[:128]) > 0.01 * shown.width * shown.height  # dark ink on a mostly white page
            assert sum(hist[128:]) > 0.3 * shown.width * shown.height
        root.update()
        x, y = root.winfo_rootx(), root.winfo_rooty()
        shot = ImageGrab.grab(bbox=(x, y, x + root.winfo_width(), y + root.winfo_height()), xdisplay=xvfb)
        shot.save(tmp_path / "gui.png")
        assert shot.convert("L").getextrema()[0] < 64  # the window shows dark ink somewhere

        # steering the tiny DDPM from a typed kanji: each mode draws 16 glyphs and shows the typed one(s) beside
        app.select(ckpts["ddpm"])
        app.steps.set(3)
        for mode, sources in (("variations", 1), ("complete left", 1), ("complete outside", 1), ("morph to", 2)):
            app.mode.set(mode)
            app.generate_button.invoke()
            _wait(root, app)
            assert app.status.get().startswith("Showing ddpm"), (mode, app.status.get())
            assert app.images.shape[0] == 16 and app.source_photo.height() > sources * 60, mode
        app.mode.set("variations")
        app.select(ckpts["gan"])
        app.generate_button.invoke()
        _wait(root, app)
        assert app.status.get().startswith("Error:") and "the GAN cannot start from a given glyph" in app.status.get()
        app.mode.set("new")
        app.select(ckpts["ddpm"])
        app.generate_button.invoke()
        _wait(root, app)
        assert app.status.get().startswith("Showing ddpm") and "training checkpoint" in app.record.get()
        assert "guided" not in app.status.get()  # a training checkpoint names no guide
        app.save_font(str(tmp_path / "grid.otf"))  # "Save as font...": the grid shown
        _wait(root, app)
        assert app.status.get().startswith("Saved") and (tmp_path / "grid.otf").stat().st_size > 0, app.status.get()
        app.select(ckpts["vae"])
        app.morph_button.invoke()
        _wait(root, app)
        assert app.status.get().startswith("Showing vae"), app.status.get()

        bad = tmp_path / "bad.pt"
        bad.write_text("nope")
        app.select(str(bad))
        app.generate_button.invoke()
        _wait(root, app)
        assert app.status.get().startswith("Error:") and "not a readable checkpoint" in app.status.get()
    finally:
        root.destroy()


# ------------------------------------------------------------------------------------------ slim files

@pytest.mark.parametrize("kind", data.KINDS)
def test_export_round_trip_samples_like_the_full_checkpoint(ckpts, kind, tmp_path):
    slim = str(tmp_path / "slim.pt")
    record = sample.export(ckpts[kind], slim)
    full = data.load_checkpoint(ckpts[kind])
    assert (record["epochs"], record["steps"], record["machine"]) == (full["epoch"], full["step"], full["machine"])
    ck = data.load_checkpoint(slim)
    assert ck["slim"] and ck["config"] == full["config"]
    assert not {"optimizer", "optimizer_g", "optimizer_d", "rng", "D", "net", "G", "ema"} & ck.keys()
    assert all(v.dtype == torch.bfloat16 for v in ck["sample_net"].values() if v.is_floating_point())
    mod = importlib.import_module(kind)
    (net_a, cfg), (net_b, _) = mod.load(ckpts[kind]), mod.load(slim)
    kw = {"steps": 5} if kind == "ddpm" else {}
    a, b = (mod.sample(net, cfg, 16, seed=1, **kw) for net in (net_a, net_b))
    # bf16 keeps 8 bits of mantissa: the pictures agree to a few grey levels on average
    err = (a - b).abs()
    assert err.mean() < 0.02 and err.max() < 0.5, (err.mean(), err.max())
    with pytest.raises(data.GanjiError, match="already a slim file"):
        sample.export(slim, str(tmp_path / "again.pt"))
    res = run_cli("sample.py", "info", slim)
    assert res.returncode == 0 and "evaluate.py: not measured yet" in res.stdout and "command: python" in res.stdout


@pytest.mark.parametrize("kind", data.KINDS)
def test_pretrained_files_load_sample_and_carry_their_record(kind, tmp_path):
    path = PRETRAINED[kind]
    assert os.path.getsize(path) <= 5_000_000
    ck = data.load_checkpoint(path, kind)
    assert ck["slim"] and ck["config"]["dataset"] == "kanji"
    r = ck["record"]
    assert r["commands"] and all(c.startswith(f"python {kind}.py") for c in r["commands"])
    assert r["epochs"] > 0 and r["steps"] > 0 and r["train_minutes"] > 0 and r["machine"] and r["date"]
    e = r["evaluate"]
    assert e["n"] == 2000 and {"fid", "kid", "precision", "recall", "near_copy_rate", "sampler", "date"} <= e.keys()
    mod = importlib.import_module(kind)
    net, cfg = mod.load(path)
    x = mod.sample(net, cfg, 4, seed=0, **({"sampler": "dpm++2m", "steps": 5} if kind == "ddpm" else {}))
    assert x.shape == (4, 1, 64, 64) and 0 <= x.min() and x.max() <= 1 and x.std() > 0.05
    grid = str(tmp_path / "g.png")
    res = run_cli("sample.py", "auto", path, "--n", "64", "--nrow", "8", "--steps", "4", "--out", grid)
    assert res.returncode == 0, res.stderr
    from PIL import Image
    assert Image.open(grid).size == (8 * 66 + 2,) * 2  # 8x8 grid of 64 px, 2 px padding


def test_the_pretrained_ddpm_names_its_guide_and_the_guide_fits():
    import ddpm
    path, guidance, min_t = sample.recorded_guide(PRETRAINED["ddpm"])
    assert path == GUIDE and guidance >= 1 and 0 <= min_t < 1000 and os.path.getsize(GUIDE) <= 5_000_000
    assert "guided by" in data.load_checkpoint(PRETRAINED["ddpm"])["record"]["evaluate"]["sampler"]
    (_, cfg), (guide, guide_cfg) = ddpm.load(PRETRAINED["ddpm"]), ddpm.load(GUIDE)
    ddpm.check_guide(cfg, guide_cfg)
    epochs = lambda p: data.load_checkpoint(p)["record"]["epochs"]
    assert epochs(GUIDE) < epochs(PRETRAINED["ddpm"])  # a weaker model: trained for less


def test_sample_py_with_no_arguments_draws_from_the_pretrained_ddpm(tmp_path):
    res = run_cli(os.path.join(os.path.dirname(os.path.abspath(sample.__file__)), "sample.py"), "--steps", "4",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "sample_seed0.png").is_file()
