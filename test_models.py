"""The run contract the three training scripts keep alike (checkpoints, resume, Ctrl-C, failures, the CLI),
one test per promise, each run for vae.py, gan.py and ddpm.py on the tiny config of conftest.py."""
import importlib
import json
import os
import shlex
import time

import pytest
import torch

import data
import sample
from conftest import ctrl_c_inside, fake_dataset, run_cli, states_equal, tiny_args, write_mnist

KINDS = data.KINDS
# the class whose forward pass runs once in every training step (and, with --sample-every 5, nowhere else)
STEP_NET = {"vae": "VAE", "gan": "Generator", "ddpm": "UNet"}


def saved(path):
    return data.load_checkpoint(str(path))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The reference: each model's 2-epoch tiny run in one go (8 steps), keeping the checkpoint of each epoch."""
    runs = {}
    for kind in KINDS:
        out = tmp_path_factory.mktemp(f"{kind}_full")
        importlib.import_module(kind).main(tiny_args(data_dir, out, "--epochs", "2", "--sample-every", "5",
                                                     "--keep-every", "1"))
        runs[kind] = out
    return runs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("at_step", [3, 6])
def test_ctrl_c_inside_a_step_then_resume_is_exact(kind, at_step, data_dir, uninterrupted, tmp_path, monkeypatch):
    mod = importlib.import_module(kind)
    argv = tiny_args(data_dir, tmp_path, "--epochs", "2", "--sample-every", "5")
    with monkeypatch.context() as m:
        ctrl_c_inside(m, getattr(mod, STEP_NET[kind]), at_step)
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
    assert e.value.code == 130
    mid = saved(tmp_path / "ckpt.pt")
    assert (mid["step"], mid["epoch"], mid["batch"]) == (at_step, (at_step - 1) // 4, (at_step - 1) % 4 + 1)
    mod.main(["--out", str(tmp_path), "--resume", "--data-dir", data_dir])  # a bare --resume: the run's settings
    a, b = saved(uninterrupted[kind] / "ckpt.pt"), saved(tmp_path / "ckpt.pt")
    assert (b["epoch"], b["step"], b["batch"]) == (a["epoch"], a["step"], a["batch"]) == (2, 8, 0)
    for key in a:
        if key not in ("config", "train_seconds"):
            assert states_equal(a[key], b[key]), key
    grid = "samples_epoch002.png"
    assert (uninterrupted[kind] / grid).read_bytes() == (tmp_path / grid).read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_keep_every_copies_the_checkpoint_at_each_nth_epoch_end(kind, uninterrupted):
    run = uninterrupted[kind]
    assert sorted(p.name for p in run.glob("ckpt*")) == ["ckpt.pt", "ckpt_epoch001.pt", "ckpt_epoch002.pt"]
    first = saved(run / "ckpt_epoch001.pt")
    assert (first["epoch"], first["step"], first["batch"]) == (1, 4, 0)
    assert (run / "ckpt_epoch002.pt").read_bytes() == (run / "ckpt.pt").read_bytes()  # the last epoch's is the file


@pytest.mark.parametrize("kind", KINDS)
def test_bare_resume_keeps_every_setting_and_given_run_settings_win(kind, data_dir, tmp_path, capsys):
    mod = importlib.import_module(kind)
    flags = ["--epochs", "1", "--seed", "3", "--lr", "0.002", "--sample-every", "3", "--log-every", "2",
             "--channels-last" if not mod.get_parser().get_default("channels_last") else "--no-channels-last"]
    mod.main(tiny_args(data_dir, tmp_path, *flags))
    first = saved(tmp_path / "ckpt.pt")["config"]
    mod.main(["--out", str(tmp_path), "--resume", "--data-dir", data_dir])  # nothing to do: 1 of 1 epochs
    mod.main(["--out", str(tmp_path), "--resume", "--data-dir", data_dir, "--epochs", "2", "--log-every", "3"])
    second = saved(tmp_path / "ckpt.pt")["config"]
    # given now, or following from them (machine_before: the machine the run resumed from)
    VARY = ("epochs", "log_every", "commands", "total_steps", "resume", "machine_before")
    assert {k: v for k, v in second.items() if k not in VARY} == \
        {k: v for k, v in first.items() if k not in VARY}
    assert (second["epochs"], second["log_every"]) == (2, 3)
    assert len(second["commands"]) == 2 and second["commands"][-1].endswith("--epochs 2 --log-every 3")
    with pytest.raises(data.GanjiError, match=r"--width 0.5 \(the run's: 0.125\)"):
        mod.main(["--out", str(tmp_path), "--resume", "--data-dir", data_dir, "--width", "0.5"])
    mod.main(["--out", str(tmp_path), "--resume", "--data-dir", data_dir, "--width", "0.125"])  # same value: fine


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_run_never_overwrites_and_resume_needs_a_full_checkpoint(kind, data_dir, tmp_path):
    mod = importlib.import_module(kind)
    with pytest.raises(data.GanjiError, match="no ckpt.pt"):
        mod.main(tiny_args(data_dir, tmp_path / "none", "--resume"))
    mod.main(tiny_args(data_dir, tmp_path / "run", "--dry-run"))
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with pytest.raises(data.GanjiError, match="pass --resume"):
        mod.main(tiny_args(data_dir, tmp_path / "run", "--dry-run"))
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    (tmp_path / "slim").mkdir()
    sample.export(str(tmp_path / "run" / "ckpt.pt"), str(tmp_path / "slim" / "ckpt.pt"))
    res = run_cli(f"{kind}.py", "--out", str(tmp_path / "slim"), "--resume", "--data-dir", data_dir)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "slim" in res.stderr, res.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_init_from_starts_a_new_run_from_the_sampling_weights(kind, data_dir, tmp_path):
    """A fresh run from a slim file: its weights, its settings where none are given, fresh counters and optimizer;
    the record adds up both runs and names both machines. With --lr 0 the weights come through untouched."""
    mod = importlib.import_module(kind)
    mod.main(tiny_args(data_dir, tmp_path / "src", "--epochs", "1", "--seed", "3"))
    sample.export(str(tmp_path / "src" / "ckpt.pt"), str(tmp_path / "src.pt"))
    slim = saved(tmp_path / "src.pt")
    slim["record"]["machine"] = "Other CPU, 8 CPU cores"  # as if the source had trained elsewhere
    data.atomic_save(slim, str(tmp_path / "src.pt"))
    both = f"Other CPU, 8 CPU cores; {data.machine(torch.device('cpu'))}"
    mod.main(tiny_args(data_dir, tmp_path / "new", "--init-from", str(tmp_path / "src.pt"), "--lr", "0",
                       "--epochs", "1"))
    new = saved(tmp_path / "new" / "ckpt.pt")
    cfg = new["config"]
    assert (new["step"], new["epoch"], cfg["seed"], cfg["init_from"]) == (4, 1, 3, str(tmp_path / "src.pt"))
    assert cfg["commands"][:-1] == slim["record"]["commands"] and "--init-from" in cfg["commands"][-1]
    built = mod.build(cfg)
    params = [n for n, _ in (built[0] if kind == "gan" else built).named_parameters()]  # buffers may move (BN, GMM)
    net = new["G" if kind == "gan" else "net"]
    assert all(torch.equal(net[k], slim["sample_net"][k].float()) for k in params)
    record = sample.export(str(tmp_path / "new" / "ckpt.pt"), str(tmp_path / "new.pt"))
    assert (record["epochs"], record["steps"], record["machine"]) == (2, 8, both)
    mod.main(["--out", str(tmp_path / "new"), "--resume", "--epochs", "2", "--data-dir", data_dir])
    record = sample.export(str(tmp_path / "new" / "ckpt.pt"), str(tmp_path / "new.pt"))
    assert (record["epochs"], record["steps"], record["machine"]) == (3, 12, both)  # a resume keeps what came before
    with pytest.raises(data.GanjiError, match="only one of them"):
        mod.main(["--out", str(tmp_path / "new"), "--resume", "--init-from", str(tmp_path / "src.pt")])
    res = run_cli(f"{kind}.py", *tiny_args(data_dir, tmp_path / "wide", "--init-from", str(tmp_path / "src.pt"),
                                          "--width", "0.25", "--dry-run"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "do not fit" in res.stderr, res.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(kind, data_dir, tmp_path, monkeypatch, capsys):
    mod = importlib.import_module(kind)
    mod.main(tiny_args(data_dir, tmp_path, "--epochs", "1"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(data, "normalize", lambda x, norm: torch.full(x.shape, float("nan")))  # poisoned data
    with pytest.raises(SystemExit) as e:
        mod.main(["--out", str(tmp_path), "--resume", "--data-dir", data_dir, "--epochs", "2"])
    assert "non-finite loss" in str(e.value.code) and "epoch 2 step 5" in str(e.value.code)  # exit status 1
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("kind", KINDS)
def test_cli_dry_run_writes_the_run_folder(kind, data_dir, tmp_path):
    res = run_cli(f"{kind}.py", *tiny_args(data_dir, tmp_path / "run", "--dry-run"))
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    assert {"ckpt.pt", "config.json", "metrics.jsonl", "samples_epoch001.png"} <= set(os.listdir(run))
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["kind"], cfg["image_size"], cfg["channels"], cfg["display_invert"]) == (kind, 32, 1, True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["step", "step", "epoch"]
    assert all(r["img_per_s"] > 0 and "lr" in r for r in rows)
    ckpt = saved(run / "ckpt.pt")
    assert ckpt["kind"] == kind and ckpt["version"] == data.FORMAT_VERSION
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch"]) == (1, 2, 0) and ckpt["train_seconds"] > 0
    assert {"config", "ema", "optimizer" if kind != "gan" else "optimizer_d", "rng", "machine"} <= ckpt.keys()
    mod = importlib.import_module(kind)
    net, cfg = mod.load(str(run / "ckpt.pt"))
    assert not net.training and mod.sample(net, cfg, 2).shape == (2, 1, 32, 32)
    res = run_cli(f"{kind}.py", *tiny_args(data_dir, tmp_path / "run", "--dry-run"))  # the folder is taken
    assert res.returncode == 2 and res.stderr.startswith("error:") and res.stderr.count("\n") == 1


@pytest.mark.parametrize("kind,default", [("vae", True), ("gan", True), ("ddpm", True)])
def test_channels_last_flag_sets_the_layout(kind, default, data_dir):
    """Every script honours --channels-last / --no-channels-last; the default is the faster layout on a CPU."""
    mod = importlib.import_module(kind)
    assert mod.get_parser().get_default("channels_last") is default
    for flag, layout in (("--channels-last", torch.channels_last), ("--no-channels-last", torch.contiguous_format)):
        args = mod.get_parser().parse_args(tiny_args(data_dir, "unused", flag))
        trainer = mod.Trainer(mod.config_from_args(args), torch.device("cpu"))
        convs = [m.weight for m in trainer.sample_net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=layout) for w in convs)


def test_precision_auto_left_unsettled_is_fp32_on_a_cpu():
    cpu = torch.device("cpu")
    assert not data.use_bf16(cpu, "auto")  # a run recorded before auto was settled at its start
    assert data.use_bf16(cpu, "bf16") and not data.use_bf16(cpu, "fp32")
    assert not data.use_bf16(torch.device("mps"), "bf16")


def sleeper(seconds, made):
    """A Trainer class whose step sleeps seconds[its precision]; each precision it is built in goes to made."""
    class Sleeper:
        def __init__(self, cfg, device):
            self.precision = cfg["precision"]
            made.append(self.precision)

        def step(self, x):
            time.sleep(seconds[self.precision])
    return Sleeper


AUTO_CFG = {"precision": "auto", "kind": "gan", "width": 0.25, "batch_size": 2, "channels": 1, "image_size": 8,
            "channels_last": False}


def resolve(Trainer, **cfg):
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    return data.resolve_precision({**AUTO_CFG, **cfg}, torch.device("cpu"), images, "11", Trainer)


def test_auto_times_each_precision_once_per_configuration_and_keeps_the_faster(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "native_bf16", lambda: True)
    made = []
    fast_bf16 = sleeper({"fp32": 0.1, "bf16": 0.02}, made)
    assert resolve(fast_bf16) == "bf16" and made == ["fp32", "bf16"]
    assert resolve(fast_bf16) == "bf16" and made == ["fp32", "bf16"]  # kept: nothing timed again
    assert "--precision auto: bf16" in capsys.readouterr().out
    slow_bf16 = sleeper({"fp32": 0.06, "bf16": 0.2}, made)
    assert resolve(slow_bf16, width=1.0) == "fp32" and made[2:] == ["fp32", "bf16"]  # another width, timed anew
    assert len(json.load(open(tmp_path / "ganji" / "precision.json"))) == 2


def test_auto_is_fp32_without_native_bf16_and_for_steps_too_short_to_time(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "native_bf16", lambda: False)  # an AVX2 CPU, where bf16 is emulated
    made = []
    instant = sleeper({"fp32": 0, "bf16": 0}, made)
    assert resolve(instant) == "fp32" and made == []  # nothing timed
    assert resolve(instant, precision="bf16") == "bf16" and made == []  # asked for: kept
    monkeypatch.setattr(data, "native_bf16", lambda: True)
    assert resolve(instant) == "fp32" and made == ["fp32"]


def test_auto_still_chooses_where_its_cache_cannot_be_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where the cache folder would be
    monkeypatch.setattr(data, "native_bf16", lambda: True)
    assert resolve(sleeper({"fp32": 0.1, "bf16": 0.02}, [])) == "bf16"
    assert "cannot be written" in capsys.readouterr().out


def test_timing_a_step_leaves_the_random_state_as_it_was():
    class Draws:
        def step(self, x):
            torch.rand(3)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    data.step_seconds(lambda: Draws(), torch.zeros(1))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_run_records_what_auto_chose_and_a_resume_keeps_it(kind, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "native_bf16", lambda: True)
    monkeypatch.setattr(data, "step_seconds", lambda make, x: {"fp32": 1.0, "bf16": 0.5}[make().cfg["precision"]])
    mod = importlib.import_module(kind)
    mod.main(tiny_args(data_dir, tmp_path / "run", "--epochs", "1", "--sample-every", "5", "--precision", "auto"))
    assert saved(tmp_path / "run" / "ckpt.pt")["config"]["precision"] == "bf16"
    monkeypatch.setattr(data, "step_seconds", lambda make, x: pytest.fail("a resumed run times nothing"))
    mod.main(["--out", str(tmp_path / "run"), "--resume", "--data-dir", data_dir, "--epochs", "2"])
    assert saved(tmp_path / "run" / "ckpt.pt")["config"]["precision"] == "bf16"


@pytest.mark.parametrize("kind", KINDS)
def test_eval_every_writes_fid_rows_and_draws_curves(kind, data_dir, tmp_path):
    from PIL import Image
    mod = importlib.import_module(kind)
    fast = ["--sample-steps", "3"] if kind == "ddpm" else []
    mod.main(tiny_args(data_dir, tmp_path, "--epochs", "2", "--eval-every", "1", "--sample-every", "5", *fast))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["row"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evals] == [(1, 4), (2, 8)]
    assert all(r["fid"] > 0 and r["kid_std"] >= 0 and "kid" in r for r in evals)
    with Image.open(tmp_path / "curves.png") as im:  # a real picture: three panels of lines on white
        assert im.format == "PNG" and im.width > 2 * im.height
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20


@pytest.mark.parametrize("kind,short,spelled_out", [
    ("gan", "--epochs 19 --out runs/gan_30min",
     "--width 0.25 --batch-size 16 --lr 1e-3 --epochs 19 --lr-decay-epochs 5 --out runs/gan_30min"),
    ("ddpm", "--epochs 9 --keep-every 3 --out runs/ddpm_30min",
     "--width 0.25 --batch-size 32 --lr 1e-3 --epochs 9 --sample-every 3 --keep-every 3 --out runs/ddpm_30min"),
])
def test_the_30_minute_commands_are_the_defaults(kind, short, spelled_out):
    """The README's short 30-minute commands train exactly what their spelled-out forms train: the same config but
    for the run settings (data.RUN_KEYS, which --resume may change)."""
    mod = importlib.import_module(kind)
    ds = fake_dataset(n=12744, size=64)
    configs = [mod.config_from_args(mod.get_parser().parse_args(shlex.split(cmd)), ds) for cmd in (short, spelled_out)]
    same = [{k: v for k, v in c.items() if k not in data.RUN_KEYS + ("commands",)} for c in configs]
    assert same[0] == same[1]


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_flag_value_stops_before_the_run_folder_exists(kind, tmp_path):
    """--eval-every on a dataset that is not glyphs: exit 2 with one line, and no run folder left behind."""
    write_mnist(tmp_path)
    res = run_cli(f"{kind}.py", *tiny_args(tmp_path, tmp_path / "run", "--dataset", "mnist", "--eval-every", "1"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--eval-every" in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()


def test_the_scripts_import_evaluate_only_when_eval_every_asks():
    res = run_cli("-c", "import sys, vae, gan, ddpm; print('evaluate' in sys.modules)")
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr
