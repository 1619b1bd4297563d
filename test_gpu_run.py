"""scripts/gpu_run.sh --dry-run: the GPU machine's one command, run on a CPU with tiny configs: the checks, the
training continued with --init-from, stopped by Ctrl-C, fitted and --resumed, the export, the log and its summary."""
import os
import re
import shutil
import subprocess
import tarfile

import pytest
import torch

import data
import sample
from conftest import HERE


def summary(log):
    """The summary's lines of a gpu_run.log -> [(status, what)], e.g. ("PASS", "check vae-step")."""
    lines = log[log.index("== summary"):].splitlines()[1:]
    return [(line[:4], re.split(r"[:(]", line[6:])[0].strip()) for line in lines]


def test_dry_run_checks_trains_and_exports(data_dir, tmp_path):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("scripts/gpu_run.sh needs bash and timeout (GNU coreutils)")
    if not torch.distributed.is_available():
        pytest.skip("this PyTorch has no torch.distributed: no torchrun")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORK": str(tmp_path / "work"), "DATA_DIR": data_dir}
    r = subprocess.run(["bash", "scripts/gpu_run.sh", "--dry-run", "--out", str(out)], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

    log = (out / "gpu_run.log").read_text()
    assert log == r.stdout  # the whole run's output, tee'd
    status = summary(log)
    assert not [s for s in status if s[0] == "FAIL"], status
    passed = {what for s, what in status if s == "PASS"}
    assert {"check vae-step", "check gan-step", "check ddpm-step", "check torchrun-gan", "train ddpm", "train gan",
            "export ddpm", "export gan", "grid ddpm", "grid gan"} <= passed
    skipped = {what for s, what in status if s == "SKIP"}
    assert skipped == {"check vae-compile", "check gan-compile", "check ddpm-compile", "bench.py"}  # cuda only
    assert log.count("interrupted: saved") >= 2  # each model's first stage ended by its Ctrl-C, with a save

    for kind in ("ddpm", "gan"):
        mod, net, cfg = sample.load_any("auto", str(out / f"{kind}_kanji.pt"))
        assert mod.KIND == kind and (cfg["width"], cfg["image_size"]) == (0.125, 32)
        record = data.load_checkpoint(str(out / f"{kind}_kanji.pt"))["record"]
        assert "--init-from" in record["commands"][-2] and "--resume" in record["commands"][-1]
        assert data.machine(torch.device("cpu")) in record["machine"]
        assert (out / f"{kind}_kanji.png").stat().st_size > 0
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert {"ddpm/metrics.jsonl", "gan/metrics.jsonl", "gan_dwarm/config.json"} <= set(names)
    assert not [n for n in names if n.endswith(".pt")]

    # what a device call brings back: at most 8 files, named in letters, digits, '.', '_' and '-'
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8 and all(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", f, re.ASCII) for f in files), files
