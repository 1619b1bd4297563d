"""Helpers shared by the test files: the render cache, one thread, a cache folder of their own, running a CLI,
the in-step Ctrl-C, comparing checkpoints, and the tiny run every model test trains."""
import os
import pickle
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# width 0.125, 32x32, 64 kanji, batch 16: 4 steps an epoch, a second or two per epoch on a 2-core CPU
TINY = ["--width", "0.125", "--image-size", "32", "--limit", "64", "--batch-size", "16", "--device", "cpu",
        "--precision", "fp32"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One kanji render cache for the whole test session (each size renders once, ~3 s)."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine OpenMP threads that wait for
    each other make these tests 5-10x slower; the thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def own_cache(tmp_path_factory):
    """--precision auto keeps its timings under $XDG_CACHE_HOME: the tests and the scripts they run keep theirs in
    a folder of their own, never in the user's."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True, scope="session")
def fp32_sampling():
    """The DDPM samples in bf16 on CPUs with native bf16 (data.sampling_precision), which would make the tests
    that check the samplers' math exactly depend on the machine; in this process it samples in fp32 everywhere,
    the run folders that fixtures share included. test_ddpm.py's bf16 test asks for bf16 explicitly."""
    import data
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data, "sampling_precision", lambda device: "fp32")
        yield


def tiny_args(data_dir, out, *extra):
    """A training script's argv for the tiny run in folder `out`."""
    return [*TINY, "--data-dir", str(data_dir), "--out", str(out), "--log-every", "1", *extra]


def fake_dataset(n=64, channels=1, size=32):
    """What config_from_args reads of a dataset (its shape and display), without loading one."""
    import data
    return data.Dataset(torch.zeros(n, channels, size, size, dtype=torch.uint8), "kanji", channels == 1)


def run_cli(*args, cwd=HERE, timeout=300):
    """Run a script of this repo as a user would (one thread); returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def ctrl_c_inside(monkeypatch, module_cls, at_call):
    """Press Ctrl-C (a real SIGINT to this process) from inside the at_call-th forward pass of module_cls,
    i.e. in the middle of a training step, after that step has already drawn its random numbers."""
    forward, calls = module_cls.forward, [0]

    def interrupted(self, *args):
        calls[0] += 1
        if calls[0] == at_call:
            signal.raise_signal(signal.SIGINT)
        return forward(self, *args)

    monkeypatch.setattr(module_cls, "forward", interrupted)


def states_equal(a, b):
    """Exact equality of two checkpoint (sub)trees: dicts, lists, tensors, numbers."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def write_mnist(root, n=20):
    """Random MNIST in its real idx files under root/MNIST/raw (train: n images, t10k: 5) -> the train images.

    idx: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian int32 dims, raw bytes."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    imgs = np.random.default_rng(0).integers(0, 256, (n, 28, 28))
    for prefix, k in (("train", n), ("t10k", 5)):
        for kind, array in (("images-idx3", imgs[:k]), ("labels-idx1", np.arange(k) % 10)):
            with open(os.path.join(raw, f"{prefix}-{kind}-ubyte"), "wb") as f:
                f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim))
                f.write(struct.pack(f">{array.ndim}I", *array.shape))
                f.write(array.astype(np.uint8).tobytes())
    return imgs


def write_cifar10(root, monkeypatch):
    """Random CIFAR-10 in its real pickled batches under root/cifar-10-batches-py, 4 images per batch (20 for
    training) -> the first training image's 3072 bytes."""
    import torchvision.datasets.cifar as cifar
    # synthetic batches cannot match the real files' md5 sums; everything else is the real code path
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), "labels": [0, 1, 2, 3]}
        first = batch["data"][0] if first is None else first
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return first
