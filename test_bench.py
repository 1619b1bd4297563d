"""bench.py: its functions and its CLI on tiny configs (speed is measured by bench.py, never asserted here)."""
import json

import torch

import data
from conftest import run_cli


def test_bench_smoke_on_tiny_configs(data_dir):
    import bench
    cpu = torch.device("cpu")
    peak = bench.bench_peak(cpu, 64, 1)
    assert peak["fp32"] > 0 and peak["bf16"] > 0
    images = data.load_dataset("kanji", image_size=32, limit=256, data_dir=data_dir, progress=False).images
    speed = bench.bench_data(cpu, images, 1, batch_size=64)
    assert speed["data.py batches/s"] > 0 and speed["DataLoader+transforms batches/s"] > 0
    for kind in data.KINDS:
        row = bench.train_row(kind, 0.125, "fp32", True, False, 4, data_dir, cpu, 1)
        assert row["s_per_step"] > 0 and row["gflop_per_img"] > 0 and row["params_M"] > 0
    rows = bench.sample_rows("ddpm", 0.125, cpu, 1, [("ddim", 2)], data_dir)
    assert rows[0]["steps"] == 2 and rows[0]["s_per_4x4_grid"] > 0
    assert "| vae |" in bench.table([{"model": "vae", "x": 1.0}], ["model", "x"])


def test_bench_cli_writes_table_and_json(data_dir, tmp_path):
    out = tmp_path / "bench"
    r = run_cli("bench.py", "--quick", "--models", "vae", "--widths", "0.125", "--batch-size", "4", "--repeats", "1",
                "--data-dir", data_dir, "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.load(open(out / "bench.json"))
    assert {"fp32 matmul", "fp32 conv3x3", "bf16 matmul", "bf16 conv3x3"} <= set(result["peak"])
    precisions = [(row["precision"], row["channels_last"]) for row in result["train"]]
    assert precisions[:2] == [("fp32", True), ("bf16", True)]
    assert precisions[2] in {("auto: fp32", True), ("auto: bf16", True)}  # what a fresh run here settles on
    assert all(row["s_per_step"] > 0 and 0 < row["share_of_peak"] for row in result["train"])
    assert result["sample"][0]["model"] == "vae" and result["sample"][0]["s_per_4x4_grid"] > 0
    assert [(row["processes"], row["batch"]) for row in result["ddp"]] == [(1, 4), (2, 4)]  # torchrun, gloo
    assert all(row["img_per_s"] > 0 and "error" not in row for row in result["ddp"])
    table = (out / "bench.md").read_text()
    assert "| vae | 0.125 | bf16 |" in table
    assert table == r.stdout[r.stdout.index("GANji bench:"):].rsplit("wrote", 1)[0]
    assert "| vae | 0.125 | fp32 | 2 | 1 | 4 |" in table  # 2 processes of 1 thread (OMP_NUM_THREADS=1 here)
    assert [(row["file"], row["precision"]) for row in result["shipped"]] == [("vae_kanji.pt", "fp32")]


def test_bench_grids_times_each_shipped_file_as_sample_py_draws_it(tmp_path):
    out = tmp_path / "grids"
    r = run_cli("bench.py", "--grids", "--models", "gan,vae", "--repeats", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.load(open(out / "bench.json"))
    assert [row["file"] for row in result["shipped"]] == ["gan_kanji.pt", "vae_kanji.pt"]
    assert all(row["s_per_4x4_grid"] > 0 and row["default"] == "yes" for row in result["shipped"])
    assert "train" not in result and "| vae_kanji.pt | gmm prior | fp32 | yes |" in (out / "bench.md").read_text()
