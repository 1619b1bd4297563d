"""torchrun: two processes train what one process trains. For each script, one tiny run on 2 CPU processes (gloo,
`torchrun --standalone --nproc_per_node=2`, global batch 16 = 8 images per rank, one epoch of 4 steps) against the
same run in this process; a bad flag under torchrun; a Ctrl-C through torchrun.

This file is also the program torchrun starts in those runs (`python test_ddp.py JSON`, see `record`): it trains
through the script's own main() and writes, per rank, the trainer's state after every step and how often the rank
wrote each output of the run folder.

The GAN's G normalizes with BatchNorm, and on a CPU every rank normalizes its own share of the batch (SyncBatchNorm
runs on GPUs only; see the README's "Many GPUs"): its 2-rank step then differs from the 1-process step by design. So
the GAN runs that compare 2 ranks with 1 process build G without BatchNorm (torch.nn.BatchNorm2d -> Identity, in both
runs alike); the Ctrl-C test trains the real G.
"""
import copy
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import data
from conftest import HERE, states_equal, tiny_args

KINDS = data.KINDS
NETS = {"vae": ("net",), "gan": ("G", "D", "ema"), "ddpm": ("net", "ema")}  # the weights a step changes
TRAINED = {"vae": "net", "gan": "G", "ddpm": "net"}  # the network the EMA follows
# 2 ranks vs 1 process. The gradients of the first step are the same sums in another order: equal within GRAD_RTOL of
# each tensor's largest gradient (measured: at most 2.5e-5, in the GAN's D). After that step the weights are equal
# within ATOL (measured: at most 6e-7) wherever the gradient is above NOISE. Below it (a dead ReLU channel, a sum that
# cancels) the gradient is float32 rounding whose sign differs between the two orders, and Adam's first update,
# lr * g / (|g| + 1e-8), turns that into up to +-lr: there the weights may differ by up to 2 lr (measured: 1.02 lr).
GRAD_RTOL, ATOL, NOISE = 1e-4, 1e-5, 1e-6
LR = {"vae": "1e-3", "gan": "2e-4", "ddpm": "5e-4"}  # the learning rates these tolerances were measured at
# A gradient that is zero in exact arithmetic is rounding only, in both runs: D's last bias under the rpgan loss, which
# sees only differences of scores (measured: 5.6e-9). Gradients are compared to GRAD_RTOL of their largest plus this.
GRAD_FLOOR = 1e-7
# After 8 steps (4 on 2 ranks, then 4 in one process after --resume, against 8 in one process). On the 2-core AMD EPYC
# the VAE and the DDPM stayed within 1e-5 (measured); in the GAN, the D weights that took those opposite first steps
# change D's scores, and about 200 of its 240,000 weights drift apart by up to 4.5 lr (measured 9.1e-4, with lr 2e-4).
# On a 2-core Intel Xeon (AVX-512) the VAE drifted the same way: one of dec_in's 65,536 weights by 1.7e-3 (an Adam
# step on a near-zero gradient whose sign the rounding flipped), and the mixture prior that EM refits from the latents
# after the last step by up to 2.8e-4; the DDPM passes within 1e-4 there.
ATOL_RESUMED = {"vae": 2e-3, "gan": 2e-3, "ddpm": 1e-4}

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def record(kind, dump, argv, no_batchnorm=False, ctrl_c_at=0):
    """Train kind's main(argv) in this process (a plain one, or one rank of a torchrun job) and write
    dump/rank{RANK}.pt: the trainer's state_dict after every step, the gradients of the first step, how often this
    rank wrote a checkpoint, a metrics row, a grid and curves.png, and its exit status. ctrl_c_at: after that step,
    rank 0 sends SIGINT to its parent, torchrun, which hands it to every rank, as when a user presses Ctrl-C in
    torchrun's terminal."""
    mod = importlib.import_module(kind)
    rank = int(os.environ.get("RANK", 0))
    steps, grads, writes, status = [], {}, dict.fromkeys(("checkpoint", "metrics", "grid", "curves"), 0), 0

    class Recorded(mod.Trainer):
        def step(self, x):
            losses = super().step(x)
            steps.append(copy.deepcopy(self.state_dict()))
            if not grads:  # the first step's gradients, as the optimizers used them (DDP's or our average)
                grads.update({f"{net}.{k}": p.grad.clone() for net in NETS[kind] if net != "ema"
                              for k, p in getattr(self, net).named_parameters()})
            if self.step_count == ctrl_c_at and rank == 0:
                os.kill(os.getppid(), signal.SIGINT)
            return losses

    def counted(name, fn):
        def call(*args, **kwargs):
            writes[name] += 1
            return fn(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as m:
        m.setattr(mod, "Trainer", Recorded)
        m.setattr(mod, "save_checkpoint", counted("checkpoint", mod.save_checkpoint))
        m.setattr(data.MetricsLog, "write", counted("metrics", data.MetricsLog.write))
        m.setattr(data, "save_grid", counted("grid", data.save_grid))
        m.setattr(data, "plot_curves", counted("curves", data.plot_curves))
        if no_batchnorm:
            m.setattr(torch.nn, "BatchNorm2d", torch.nn.Identity)
        try:
            data.cli(lambda: mod.main(argv))
        except SystemExit as e:
            status = e.code
            raise
        finally:
            torch.save({"steps": steps, "grads": grads, "writes": writes, "status": status},
                       os.path.join(dump, f"rank{rank}.pt"))


def torchrun(*args, timeout=300):
    """`torchrun --standalone --nproc_per_node=2 ARGS` with this interpreter, one thread per process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def torchrun_record(dump, **spec):
    os.makedirs(dump, exist_ok=True)
    res = torchrun("test_ddp.py", json.dumps({"dump": str(dump), **spec}))
    ranks = [torch.load(os.path.join(dump, f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    return res, ranks


def weights(state, kind, params_only=False):
    """name -> tensor of the networks in a trainer state; params_only drops the buffers: BatchNorm's running
    statistics, and the VAE's mixture prior (fitted after an epoch's last step)."""
    buffers = ("running_mean", "running_var", "num_batches_tracked", "gmm_logw", "gmm_mean", "gmm_tril")
    return {f"{net}.{k}": v for net in NETS[kind] for k, v in state[net].items()
            if not (params_only and k.rsplit(".", 1)[-1] in buffers)}


def metric_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """runs(kind): the tiny run (global batch 16, log every step, 1 epoch of 4 steps) in one process and on 2 ranks;
    each kind is trained once for all the tests of this file."""
    done = {}

    def get(kind):
        if kind not in done:
            root = tmp_path_factory.mktemp(f"ddp_{kind}")
            fast = ["--sample-steps", "2"] if kind == "ddpm" else []  # the DDIM steps of the final grid
            argv = tiny_args(data_dir, root / "one", "--epochs", "1", "--sample-every", "5", "--lr", LR[kind], *fast)
            record(kind, str(root), argv, no_batchnorm=kind == "gan")  # first: it renders the kanji cache
            one = torch.load(root / "rank0.pt", weights_only=True)
            argv = tiny_args(data_dir, root / "two", "--epochs", "1", "--sample-every", "5", "--lr", LR[kind], *fast)
            res, two = torchrun_record(root / "dumps", kind=kind, argv=argv, no_batchnorm=kind == "gan")
            assert res.returncode == 0, res.stderr[-3000:]
            done[kind] = {"root": root, "one": one, "two": two, "stderr": res.stderr}
        return done[kind]
    return get


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_on_two_ranks_equals_a_step_in_one_process(kind, runs):
    r = runs(kind)
    g1, g2 = r["one"]["grads"], r["two"][0]["grads"]  # averaged by DDP (VAE, DDPM, G) or data.average_gradients (D)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=0, atol=GRAD_RTOL * g1[k].abs().max().item() + GRAD_FLOOR,
                                   msg=lambda m: f"{k}: {m}")
    one, two = weights(r["one"]["steps"][0], kind), weights(r["two"][0]["steps"][0], kind)
    assert one.keys() == two.keys()
    lr = float(LR[kind])  # the runs' rate, the largest in them
    for k in one:
        g = g1.get(k.replace("ema.", TRAINED[kind] + "."))  # after its first update the EMA is all but the net
        if g is None:  # a buffer no step trains (the VAE's mixture, fitted at epoch ends): the same on both
            assert torch.equal(two[k], one[k]), k
            continue
        bound = torch.where(g.abs() < NOISE, 2 * lr, ATOL)
        assert ((two[k] - one[k]).abs() <= bound).all(), (k, (two[k] - one[k]).abs().max().item())
    # the logged losses are the global batch's (all-reduced), step by step; within 0.1 % (measured: 1.2e-4 of the
    # GAN's losses, computed with the D weights the step has just updated)
    a = [row for row in metric_rows(r["root"] / "one") if row["row"] == "step"]
    b = [row for row in metric_rows(r["root"] / "two") if row["row"] == "step"]
    assert [row["step"] for row in a] == [row["step"] for row in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x.keys() - {"row", "img_per_s"}:
            assert y[k] == pytest.approx(x[k], rel=1e-3, abs=1e-5), (x["step"], k)


@pytest.mark.parametrize("kind", KINDS)
def test_both_ranks_hold_identical_state_after_every_step(kind, runs):
    r0, r1 = runs(kind)["two"]
    assert len(r0["steps"]) == len(r1["steps"]) == 4
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        assert states_equal(s0, s1)  # weights, EMA, optimizer moments, step count: bit for bit


@pytest.mark.parametrize("kind", KINDS)
def test_rank_0_alone_writes_the_one_checkpoint_and_it_resumes_in_one_process(kind, runs, data_dir, tmp_path):
    r = runs(kind)
    r0, r1 = r["two"]
    assert r1["writes"] == {"checkpoint": 0, "metrics": 0, "grid": 0, "curves": 0}
    assert r0["writes"]["checkpoint"] == 1 and r0["writes"]["metrics"] == 5 and r0["writes"]["curves"] == 1
    assert r0["writes"]["grid"] >= 1
    run = r["root"] / "two"
    assert sorted(f for f in os.listdir(run) if "ckpt" in f) == ["ckpt.pt"]
    saved = data.load_checkpoint(str(run / "ckpt.pt"))
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, 4, 0)
    assert states_equal(weights(saved, kind, params_only=True), weights(r0["steps"][-1], kind, params_only=True))
    assert saved["machine"].startswith("2 x ")
    # a second epoch in this process, from a copy of each run folder: the 2-rank run continues as the 1-process one
    mod = importlib.import_module(kind)
    for name in ("one", "two"):
        shutil.copytree(r["root"] / name, tmp_path / name)
        with pytest.MonkeyPatch.context() as m:
            if kind == "gan":
                m.setattr(torch.nn, "BatchNorm2d", torch.nn.Identity)
            mod.main(["--out", str(tmp_path / name), "--resume", "--epochs", "2", "--data-dir", data_dir])
    one, resumed = (data.load_checkpoint(str(tmp_path / name / "ckpt.pt")) for name in ("one", "two"))
    assert (resumed["epoch"], resumed["step"]) == (one["epoch"], one["step"]) == (2, 8)
    assert states_equal(resumed["rng"], one["rng"])  # the ranks drew exactly what one process draws
    a, b = weights(one, kind), weights(resumed, kind)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL_RESUMED[kind], msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("kind,flags,says", [
    ("vae", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("gan", ["--batch-size", "15"], "error: --batch-size 15 is the global batch: it must be a multiple of the 2"),
    ("ddpm", ["--width"], "argument --width: expected one argument"),
])
def test_a_bad_flag_under_torchrun_stops_every_rank_at_once(kind, flags, says, data_dir, tmp_path):
    res = torchrun(f"{kind}.py", *tiny_args(data_dir, tmp_path / "run", "--dry-run"), *flags, timeout=120)
    assert res.returncode != 0
    # each rank stops on it before joining the other; a rank that has not printed it yet when the first one exits
    # is ended by torchrun (SIGTERM), also non-zero: seen on a loaded CPU
    assert 1 <= res.stderr.count(says) <= 2, res.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_ctrl_c_under_torchrun_stops_every_rank_after_the_same_step(data_dir, tmp_path):
    """The real GAN (G with BatchNorm, per-rank statistics on a CPU): torchrun hands the Ctrl-C to both ranks, both
    finish the same step, rank 0 saves, all exit with 130, one message each; then --resume continues it."""
    argv = tiny_args(data_dir, tmp_path / "run", "--epochs", "3", "--sample-every", "5")
    res, (r0, r1) = torchrun_record(tmp_path / "dumps", kind="gan", argv=argv, ctrl_c_at=2)
    assert res.returncode != 0 and r0["status"] == r1["status"] == 130
    assert res.stderr.count("Ctrl-C: stopping after this step") == 1 and res.stderr.count("interrupted: saved") == 1
    stopped = len(r0["steps"])
    assert len(r1["steps"]) == stopped and 2 <= stopped < 12  # the same step on both ranks
    assert weights(r0["steps"][-1], "gan", params_only=True).keys() == \
        weights(r1["steps"][-1], "gan", params_only=True).keys()
    for k, v in weights(r0["steps"][-1], "gan", params_only=True).items():
        assert torch.equal(v, weights(r1["steps"][-1], "gan", params_only=True)[k]), k
    assert r1["writes"]["checkpoint"] == 0 and r0["writes"]["checkpoint"] >= 1
    saved = data.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert saved["step"] == stopped and states_equal(saved["G"], r0["steps"][-1]["G"])
    import gan
    gan.main(["--out", str(tmp_path / "run"), "--resume", "--data-dir", data_dir])
    assert data.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 12


if __name__ == "__main__":  # one rank of a torchrun job started by torchrun_record
    spec = json.loads(sys.argv[1])
    record(spec["kind"], spec["dump"], spec["argv"], spec.get("no_batchnorm", False), spec.get("ctrl_c_at", 0))
