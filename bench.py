"""Measure how fast GANji trains and samples on this machine, against the machine's own matmul and conv peak.

    python bench.py --quick          # under a minute on a 2-core CPU: small configs, fewer repeats
    python bench.py                  # the full table of docs/bench.md (about 20 minutes on a 2-core CPU)
    python bench.py --device cuda --out bench_gpu
    python bench.py --grids          # only the seconds per 4x4 grid of each shipped file, as sample.py draws it

Every figure is the median of several timed repeats after warm-up. Each model and width trains in fp32, in bf16
and in what --precision auto settles on in a fresh run here (timed afresh). Each training configuration runs
in its own child process, so its peak memory (RSS on CPU, allocator peak on CUDA) is its own. On a CPU it also
times one training step on 1 and on 2 processes under torchrun (gloo), each count its own torchrun job.
Writes OUT/bench.md (the table) and OUT/bench.json (every number).
"""
import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import data

SMALL_WIDTH = 0.25  # the CPU configuration the README recommends


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_peak(device, n, repeats):
    """GFLOP/s in fp32 and bf16 of an n x n matmul (2 n^3 flops) and of a large 3x3 convolution.

    The models are judged against the higher of the two: on CPUs the fp32 matmul goes to MKL, which on
    AMD runs far below what oneDNN's fp32 convolutions reach, so the matmul alone would flatter fp32."""
    out = {}
    x = torch.randn(32, 256, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    conv_flops = 2 * x.numel() * w[0].numel()  # the output has x's shape; each value is a 256x3x3 dot product
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        out[f"{name} matmul"] = 2 * n ** 3 / median_time(lambda: a @ b, device, repeats) / 1e9
        xd, wd = x.to(dtype), w.to(dtype)
        out[f"{name} conv3x3"] = conv_flops / median_time(lambda: F.conv2d(xd, wd, padding=1), device, repeats) / 1e9
        out[name] = max(out[f"{name} matmul"], out[f"{name} conv3x3"])
    return out


def bench_data(device, images, repeats, batch_size=64):
    """Batches/s of one epoch: data.Batches (uint8 on the device) vs DataLoader + per-item transforms."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class PilImages(Dataset):  # what a typical tutorial does: PIL images, ToTensor + Normalize per item
        def __init__(self, x):
            self.images = [Image.fromarray(a[0].numpy()) for a in x]
            self.tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.tf(self.images[i])

    def epoch(batches):
        for x in batches:
            x = x.to(device, non_blocking=True)
        sync(device)

    ours = data.Batches(images, batch_size, device, "11")
    theirs = DataLoader(PilImages(images), batch_size=batch_size, shuffle=True, num_workers=0)
    n = len(ours)
    return {"images": len(images), "batch_size": batch_size,
            "data.py batches/s": n / median_time(lambda: epoch(ours.epoch(0)), device, repeats),
            "DataLoader+transforms batches/s": n / median_time(lambda: epoch(theirs), device, repeats)}


def count_flops(fn):
    """FLOPs of fn() by torch's own formulas (torch.utils.flop_counter.flop_registry: matmuls, convolutions,
    attention, forward and backward). FlopCounterMode itself cannot be used: its module tracker fails inside
    autograd.grad with respect to a leaf tensor, which is what the GAN's gradient penalty takes."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **(kwargs or {}), out_val=out)
            return out

    with Count():
        fn()
    return Count.total


def train_row(kind, width, precision, channels_last, compile, batch, data_dir, device, repeats):
    """One training configuration, timed on a real kanji batch (run in a child process)."""
    mod = importlib.import_module(kind)
    argv = ["--width", str(width), "--precision", precision, "--batch-size", str(batch),
            "--image-size", "64", "--channels", "1", "--device", device.type]
    argv += ["--compile"] * compile + ["--channels-last" if channels_last else "--no-channels-last"]
    argv += ["--data-dir", data_dir]
    cfg = mod.config_from_args(mod.get_parser().parse_args(argv))
    images = data.load_dataset("kanji", limit=batch, data_dir=data_dir, progress=False).images
    if precision == "auto":  # what a fresh run would settle on here, timed afresh rather than read from a cache
        with tempfile.TemporaryDirectory() as cache:
            os.environ["XDG_CACHE_HOME"] = cache
            cfg["precision"] = data.resolve_precision(cfg, device, images, mod.NORM, mod.Trainer)
    torch.manual_seed(0)
    trainer = mod.Trainer(cfg, device)
    x = data.normalize(images, mod.NORM).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    trainer.step(x)  # warm-up (and compilation) outside the flop count
    flops = count_flops(lambda: trainer.step(x))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_time(lambda: trainer.step(x), device, repeats, warmup=1)
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    built = mod.build(cfg)  # the trained networks (gan: G and D), not the EMA copy
    nets = built if isinstance(built, tuple) else (built,)
    precision = f"auto: {cfg['precision']}" if precision == "auto" else precision
    return {"model": kind, "width": width, "precision": precision, "channels_last": channels_last,
            "compile": compile, "batch": batch, "params_M": sum(p.numel() for m in nets for p in m.parameters()) / 1e6,
            "s_per_step": seconds, "img_per_s": batch / seconds, "gflop_per_img": flops / batch / 1e9,
            "gflops": flops / seconds / 1e9, "peak_mem_MB": mem / 2 ** 20}


def ddp_rows(kind, width, batch, data_dir, repeats, processes=(1, 2)):
    """images/s of one fp32 training step of the global batch on 1, 2, ... CPU processes: torchrun --standalone,
    gloo; each process computes its share of the batch and DDP averages the gradients. torchrun gives each of N > 1
    processes one thread (OMP_NUM_THREADS=1, unless it is set), one process uses every core: the same cores either
    way. Each count is its own torchrun job running this file with --ddp-row."""
    spec = json.dumps(dict(kind=kind, width=width, batch=batch, data_dir=data_dir))
    rows = []
    for n in processes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.abspath(__file__), "--ddp-row", spec, "--device", "cpu", "--batch-size", str(batch),
               "--repeats", str(repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        row = {"model": kind, "width": width, "precision": "fp32", "processes": n, "batch": batch}
        if out.returncode != 0:  # torchrun's own report ends stderr: the first error line is the worker's
            row["error"] = next((line for line in out.stderr.splitlines() if "error" in line.lower()), "failed")[:200]
        else:
            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(row)
    return rows


def ddp_row(args, kind, width, batch, data_dir):
    """One rank of a ddp_rows job: its share of a real kanji batch, the median step time (printed by rank 0)."""
    rank, world, device = data.distributed(args)
    mod = importlib.import_module(kind)
    cfg = mod.config_from_args(mod.get_parser().parse_args(
        ["--width", str(width), "--precision", "fp32", "--batch-size", str(batch), "--image-size", "64",
         "--channels", "1", "--device", "cpu", "--data-dir", data_dir]))
    torch.manual_seed(0)
    trainer = mod.Trainer(cfg, device)
    images = data.load_dataset("kanji", limit=batch, data_dir=data_dir, progress=False).images
    x = next(data.Batches(images, batch, device, mod.NORM, channels_last=cfg["channels_last"], rank=rank,
                          world=world).epoch(0))
    seconds = median_time(lambda: trainer.step(x), device, args.repeats, warmup=1)
    if rank == 0:
        print(json.dumps({"threads": torch.get_num_threads(), "s_per_step": seconds, "img_per_s": batch / seconds}))


def sample_rows(kind, width, device, repeats, ddpm_samplers, data_dir):
    """Seconds for a 4x4 grid from an untrained network of the reference shape (speed does not depend
    on the weights). DDPM: each sampler in ddpm_samplers as (name, steps)."""
    mod = importlib.import_module(kind)
    cfg = mod.config_from_args(mod.get_parser().parse_args(
        ["--width", str(width), "--image-size", "64", "--channels", "1", "--device", device.type,
         "--data-dir", data_dir]))
    net = mod.Trainer(cfg, device).sample_net.eval()
    runs = ddpm_samplers if kind == "ddpm" else [("sample", None)]
    rows = []
    for name, steps in runs:
        # an untrained VAE has no fitted mixture: its N(0, I) draw stands in (the decoder is what takes the time)
        kw = {"sampler": name, "steps": steps} if kind == "ddpm" else {"prior": "normal"} if kind == "vae" else {}
        reps = 1 if steps and steps >= 500 else repeats  # one ancestral-1000 grid takes minutes on a CPU
        t = median_time(lambda: mod.sample(net, cfg, 16, seed=0, device=device, **kw), device, reps, warmup=0)
        rows.append({"model": kind, "width": width, "sampler": name if kind == "ddpm" else "-",
                     "steps": steps or 1, "s_per_4x4_grid": t})
    return rows


def shipped_rows(models, device, repeats):
    """Seconds for a 4x4 grid of each shipped file in pretrained/, with the sampler and guide its record recommends,
    as `python sample.py` draws it (median of repeats after a warm-up grid). The DDPM is timed in fp32 and, where
    data.sampling_precision picks it, in bf16 (bench swaps that function to time both)."""
    import sample
    rows = []
    for kind in models:
        path = os.path.join(sample.PRETRAINED, f"{kind}_kanji.pt")
        mod, net, cfg = sample.load_any(kind, path, device)
        flags = argparse.Namespace(ckpt=path, guide=None, guidance=None, guide_min_t=None, sampler=None, steps=None,
                                   eta=0.0, prior=None)
        opts, how, _ = sample.sampling(flags, mod, cfg, device)
        default = data.sampling_precision(device)
        for precision in sorted({"fp32", default}, key=lambda p: p != default) if kind == "ddpm" else ["fp32"]:
            original, data.sampling_precision = data.sampling_precision, lambda d, p=precision: p
            try:
                t = median_time(lambda: sample.generate(mod, net, cfg, 16, 4, 0, device, **opts), device, repeats)
            finally:
                data.sampling_precision = original
            rows.append({"file": os.path.basename(path), "sampling": how or "-", "precision": precision,
                         "default": "yes" if kind != "ddpm" or precision == default else "no",
                         "s_per_4x4_grid": t})
    return rows


def cpu_name():
    """The CPU's model name ("AMD EPYC", ...) where the OS tells it, else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def child(args, spec):
    """Run one training row in a fresh process; returns its dict (or the error)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--row", json.dumps(spec), "--device", args.device,
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {**spec, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_parser():
    p = argparse.ArgumentParser(description="Benchmark GANji's models and data loading on this machine.")
    p.add_argument("--quick", action="store_true", help="small configs and fewer repeats (a few minutes on CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default: 3, --quick 2)")
    p.add_argument("--models", default="vae,gan,ddpm", help="comma-separated subset (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (default: %(default)s)")
    p.add_argument("--widths", default=None,
                   help=f"comma-separated --width values (default: 1.0,{SMALL_WIDTH}; --quick: {SMALL_WIDTH})")
    p.add_argument("--data-dir", default="data", help="kanji render cache (default: %(default)s)")
    p.add_argument("--out", default="bench", help="folder for bench.md and bench.json (default: %(default)s)")
    p.add_argument("--processes", default="1,2",
                   help="on a CPU, also time one training step (first model, first width) on each of these numbers "
                        "of processes under torchrun, gloo; empty = skip (default: %(default)s)")
    p.add_argument("--grids", action="store_true",
                   help="only time a 4x4 grid of each shipped file at its recommended sampler (about a minute)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one training row, as JSON
    p.add_argument("--ddp-row", default=None, help=argparse.SUPPRESS)  # internal: one rank of a torchrun row
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.ddp_row:
        args.repeats = args.repeats or 3
        return ddp_row(args, **json.loads(args.ddp_row))
    device = data.pick_device(args.device)
    args.device = device.type
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.row:
        spec = json.loads(args.row)
        print(json.dumps(train_row(**spec, device=device, repeats=args.repeats)))
        return
    models = [m for m in args.models.split(",") if m]
    if not set(models) <= set(data.KINDS):
        raise data.GanjiError(f"--models takes a subset of {','.join(data.KINDS)}")
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name()
    result = {"machine": machine, "device": device.type, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    print(f"GANji bench on {machine} ({device.type}), torch {torch.__version__}", flush=True)
    head = f"GANji bench: {machine} ({device.type}), torch {torch.__version__}, {result['date']}"
    result["shipped"] = shipped_rows(models, device, args.repeats + 2)
    shipped = ["Shipped files: seconds per 4x4 grid at the sampler each file's record recommends", "",
               table(result["shipped"], ["file", "sampling", "precision", "default", "s_per_4x4_grid"]), ""]
    print(json.dumps(result["shipped"]), flush=True)
    if args.grids:
        return write(args, result, [head + " (grids)", "", *shipped])

    result["peak"] = bench_peak(device, 1024 if args.quick else 2048, args.repeats + 2)
    print("peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in result["peak"].items()), flush=True)
    kanji = data.load_dataset("kanji", data_dir=args.data_dir, progress=False).images
    result["data"] = bench_data(device, kanji[:2048] if args.quick else kanji, args.repeats)
    print(json.dumps(result["data"]), flush=True)

    widths = ([float(w) for w in args.widths.split(",")] if args.widths
              else [SMALL_WIDTH] if args.quick else [1.0, SMALL_WIDTH])
    layout = {k: importlib.import_module(k).get_parser().get_default("channels_last") for k in models}
    spec = dict(batch=args.batch_size, data_dir=args.data_dir)
    specs = [dict(kind=k, width=w, precision=pr, channels_last=layout[k], compile=False, **spec)
             for k in models for w in widths for pr in ("fp32", "bf16", "auto")]  # each script's default layout
    if not args.quick:  # the other layout, and compile, in bf16 at both widths
        specs += [dict(kind=k, width=w, precision="bf16", channels_last=cl, compile=co, **spec)
                  for k in models for w in widths for cl, co in ((not layout[k], False), (layout[k], True))]
    result["train"] = []
    for spec in specs:
        row = child(args, spec)
        if "gflops" in row:
            row["share_of_peak"] = row["gflops"] / result["peak"][row["precision"].split()[-1]]
        result["train"].append(row)
        print(json.dumps(row), flush=True)

    processes = [int(n) for n in args.processes.split(",") if n]
    result["ddp"] = ddp_rows(models[0], widths[0], args.batch_size, args.data_dir, args.repeats, processes) \
        if device.type == "cpu" and processes else []
    print(json.dumps(result["ddp"]), flush=True)

    samplers = [("ancestral", 1000), ("ddim", 50), ("ddim", 20), ("ddim", 10),
                ("dpm++2m", 20), ("dpm++2m", 15), ("dpm++2m", 10), ("dpm++2m", 8)]
    result["sample"] = []
    for k in models:
        result["sample"] += sample_rows(k, widths[0], device, args.repeats,
                                        samplers[1:] if args.quick else samplers, args.data_dir)
    print(json.dumps(result["sample"]), flush=True)

    ddp = ["torchrun on the CPU (gloo): one training step of the global batch on N processes", "",
           table(result["ddp"], ["model", "width", "precision", "processes", "threads", "batch", "s_per_step",
                                 "img_per_s", "error"]), ""] if result["ddp"] else []
    md = [head + (" (quick)" if args.quick else ""), "", *shipped,
          "Peak GFLOP/s (share_of_peak is against the higher of matmul and conv3x3): "
          + ", ".join(f"{k} {v:.0f}" for k, v in result["peak"].items() if " " in k), "",
          table([result["data"]], list(result["data"])), "",
          table(result["train"], ["model", "width", "precision", "channels_last", "compile", "batch", "params_M",
                                  "s_per_step", "img_per_s", "gflop_per_img", "gflops", "share_of_peak",
                                  "peak_mem_MB", "error"]), "", *ddp,
          table(result["sample"], ["model", "width", "sampler", "steps", "s_per_4x4_grid"])]
    write(args, result, md)


def write(args, result, md):
    """OUT/bench.md (the tables, also printed) and OUT/bench.json (every number)."""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(md))
    print(f"wrote {args.out}/bench.md and {args.out}/bench.json")


if __name__ == "__main__":
    data.cli(main)
