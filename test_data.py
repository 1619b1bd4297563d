"""data.py: the rendered kanji, folders, MNIST/CIFAR-10 in their real file formats, batching, small helpers."""
import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch

import data
from conftest import HERE, run_cli, write_cifar10, write_mnist


@pytest.fixture(scope="module")
def kanji(data_dir):
    return data.load_dataset("kanji", data_dir=data_dir, progress=False)


def test_import_does_no_work(tmp_path):
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import data; "
            "print(sorted(m for m in ('PIL', 'torchvision') if m in sys.modules))")
    out = run_cli("-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert os.listdir(tmp_path) == []  # no cache, no data folder written


def test_kanji_count_and_format(kanji):
    x = kanji.images
    assert x.dtype == torch.uint8 and x.shape[1:] == (1, 64, 64)
    assert len(x) > 12000 and len(kanji.labels) == len(x)
    assert kanji.display_invert
    cps = kanji.labels.tolist()
    assert all(data.KANJI_RANGE[0] <= c <= data.KANJI_RANGE[1] for c in cps)
    assert cps == sorted(set(cps))


def test_kanji_no_blank_or_duplicate(kanji):
    x = kanji.images.flatten(1)
    assert (x.amax(1) >= 64).all()  # every glyph has strokes
    assert len(torch.unique(x, dim=0)) == len(x)


def test_kanji_fixed_em_box(kanji):
    """One scale and offset for every glyph: 一 is a thin horizontal stroke near the middle."""
    ichi = kanji.images[kanji.labels.tolist().index(0x4E00), 0].float()
    rows = (ichi > 128).any(1).nonzero().flatten()
    assert rows.max() - rows.min() < 8
    assert 20 < rows.float().mean() < 44
    x = kanji.images  # a margin of 64/16 = 4 pixels stays empty around every glyph
    assert x[..., :3].max() == x[..., -3:].max() == x[..., :3, :].max() == x[..., -3:, :].max() == 0


def test_kanji_cache_reload_identical(data_dir, kanji):
    again = data.load_dataset("kanji", data_dir=data_dir, progress=False)
    assert torch.equal(again.images, kanji.images) and torch.equal(again.labels, kanji.labels)
    import hashlib
    digest = hashlib.sha256(open(data.default_font(), "rb").read()).hexdigest()[:16]
    assert os.path.isfile(os.path.join(data_dir, f"kanji-{digest}-64px-4e00-9fff.pt"))  # keyed by font hash


def test_font_cmap_decides_which_glyphs(kanji):
    cps = data.font_codepoints(data.default_font())
    assert set(kanji.labels.tolist()) <= set(cps)
    import pylopdf_fonts_jp
    sans = data.font_codepoints(str(pylopdf_fonts_jp.sans_path()))
    assert len(sans) > 12000 and all(data.KANJI_RANGE[0] <= c <= data.KANJI_RANGE[1] for c in sans)
    assert 0x9FFF not in cps  # not in the font, yet PIL draws it (as a tofu box): only the cmap tells
    tofu = data.render_glyphs(data.default_font(), [0x9FFF], 64, progress=False)
    assert tofu.max() == 255


def test_limit_and_sizes(data_dir):
    small = data.load_dataset("kanji", image_size=32, limit=10, data_dir=data_dir, progress=False)
    assert small.images.shape == (10, 1, 32, 32)
    rgb = data.load_dataset("kanji", image_size=32, channels=3, limit=4, data_dir=data_dir, progress=False)
    assert rgb.images.shape == (4, 3, 32, 32)
    assert torch.equal(rgb.images[:, 0], small.images[:4, 0])


def test_normalization_ranges():
    x = torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8)
    a, b = data.normalize(x, "01"), data.normalize(x, "11")
    assert a.min() == 0 and a.max() == 1 and b.min() == -1 and b.max() == 1
    assert torch.allclose(data.denormalize(a, "01"), a) and torch.allclose(data.denormalize(b, "11"), a)
    assert torch.allclose(b, a * 2 - 1)


def _png(path, value, size=(48, 48), mode="L"):
    from PIL import Image
    Image.new(mode, size, value).save(path)


def test_folder_skips_broken_and_text_files(tmp_path, capsys):
    for i in range(3):
        _png(tmp_path / f"k{i}.png", 40 * i)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.txt").write_text("hello")
    ds = data.load_dataset(str(tmp_path), image_size=32)
    assert ds.images.shape == (3, 1, 32, 32) and ds.display_invert
    assert ds.images[2].float().mean() == 80
    err = capsys.readouterr().err
    assert "skipped 2 unreadable" in err and err.count("\n") == 1
    inv = data.load_dataset(str(tmp_path), image_size=32, invert=True, channels=3)
    assert inv.images.shape == (3, 3, 32, 32) and inv.images[0].float().mean() == 255


def test_missing_or_empty_folder_is_one_line_error(tmp_path):
    with pytest.raises(data.GanjiError, match="not found"):
        data.load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.GanjiError, match="no readable images"):
        data.load_dataset(str(tmp_path / "empty"))
    out = run_cli("data.py", "--dataset", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "not found" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flag, value, low", [("--sample-every", "0", 1), ("--log-every", "0", 1),
                                              ("--eval-every", "-1", 0), ("--keep-every", "-2", 0)])
def test_every_n_epochs_flags_refuse_zero_or_negative_with_one_line(flag, value, low, capsys):
    parser = data.add_common_args(argparse.ArgumentParser(prog="x.py"), epochs=1, batch_size=8, lr=1e-3)
    with pytest.raises(SystemExit) as e:
        parser.parse_args([flag, value])  # unchecked, 0 divides by zero and -1 counts every epoch
    assert e.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]  # argparse's usage, then one error line
    assert last == f"x.py: error: argument {flag}: must be at least {low}, got {value}"


def test_mnist_real_format(tmp_path):
    imgs = write_mnist(tmp_path)
    ds = data.load_dataset("mnist", data_dir=str(tmp_path), download=False)
    assert ds.images.shape == (20, 1, 32, 32) and not ds.display_invert
    native = data.load_dataset("mnist", image_size=28, data_dir=str(tmp_path), download=False)
    assert np.array_equal(native.images[:, 0].numpy(), imgs)


def test_cifar10_real_format(tmp_path, monkeypatch):
    first = write_cifar10(tmp_path, monkeypatch)
    ds = data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    assert ds.images.shape == (20, 3, 32, 32) and not ds.display_invert
    assert np.array_equal(ds.images[0].numpy().reshape(-1), first)


def test_offline_mnist_error_says_where(tmp_path):
    with pytest.raises(data.GanjiError, match="MNIST/raw"):
        data.load_dataset("mnist", data_dir=str(tmp_path), download=False)


def test_epoch_covers_every_image_once_and_is_seeded():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous()
    b = data.Batches(images, 16, "cpu", "01", seed=3)
    assert len(b) == 4
    seen = torch.cat([x[:, 0, 0, 0] for x in b.epoch(0)]) * 255
    assert sorted(seen.round().long().tolist()) == list(range(50))
    again = torch.cat([x[:, 0, 0, 0] for x in data.Batches(images, 16, "cpu", "01", seed=3).epoch(0)]) * 255
    assert torch.equal(seen, again)
    other = torch.cat([x[:, 0, 0, 0] for x in b.epoch(1)]) * 255
    assert not torch.equal(seen, other)
    rest = torch.cat([x[:, 0, 0, 0] for x in b.epoch(0, start=2)]) * 255
    assert torch.equal(rest, seen[32:])


def test_ranks_share_each_global_batch():
    """Under torchrun rank r of `world` yields its equal, disjoint share of each batch one process yields; the
    n mod world leftover images (here 1 of 51) sit the epoch out."""
    images = torch.arange(51, dtype=torch.uint8).view(51, 1, 1, 1)
    ids = lambda batches: [(x[:, 0, 0, 0] * 255).round().long() for x in batches]
    for epoch in (0, 1):
        one = ids(data.Batches(images, 16, "cpu", "01", seed=3).epoch(epoch))
        ranks = [ids(data.Batches(images, 16, "cpu", "01", seed=3, rank=r, world=2).epoch(epoch)) for r in (0, 1)]
        assert [len(x) for x in ranks[0]] == [len(x) for x in ranks[1]] == [8, 8, 8, 1]
        together = [torch.cat(pair) for pair in zip(*ranks)]
        assert all(torch.equal(a, b) for a, b in zip(together[:3], one[:3]))  # the same batches, the same order
        assert len(one[-1]) == 3 and torch.equal(together[-1], one[-1][:2])  # the last one without its odd image
    rank1 = data.Batches(images, 16, "cpu", "01", seed=3, rank=1, world=2)
    assert len(rank1) == data.steps_per_epoch(51, 16, 2) == 4
    assert (data.steps_per_epoch(12744, 64), data.steps_per_epoch(12744, 64, 16)) == (200, 199)  # 8 kanji sit out
    rest, whole = ids(rank1.epoch(0, start=2)), ids(rank1.epoch(0))
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, whole[2:]))  # resume skips global batches


def test_hflip_only_when_asked():
    images = torch.zeros(40, 1, 4, 4, dtype=torch.uint8)
    images[..., 0] = 255  # ink in the left column only
    plain = torch.cat(list(data.Batches(images, 8, "cpu", "11").epoch(0)))
    assert (plain[..., 0] == 1).all() and (plain[..., 3] == -1).all()
    flipped = torch.cat(list(data.Batches(images, 8, "cpu", "11", hflip=True).epoch(0)))
    right = (flipped[:, 0, 0, 3] == 1).sum().item()
    assert 0 < right < 40  # about half flipped, and flipping moves ink to the right column
    assert ((flipped[..., 0] == 1) ^ (flipped[..., 3] == 1)).all()


def test_keep_freed_memory_applies_on_glibc_only():
    import platform
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert data.keep_freed_memory() is glibc


def test_latent_morph_rows_walk_from_start_to_end():
    z0, z1 = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    for spherical in (True, False):
        z = data.latent_morph(z0, z1, 5, spherical).view(3, 5, 16)  # row-major: row r is z0[r] -> z1[r]
        assert torch.allclose(z[:, 0], z0, atol=1e-5) and torch.allclose(z[:, -1], z1, atol=1e-5)
    mid = data.latent_morph(z0, z1, 3, spherical=False).view(3, 3, 16)[:, 1]
    assert torch.allclose(mid, (z0 + z1) / 2, atol=1e-6)


def test_curves_skip_rows_of_a_run_older_than_the_row_key(tmp_path):
    # a run resumed from before metrics rows carried "row": its old lines are left out of the picture, not fatal
    from PIL import Image
    log = data.MetricsLog(str(tmp_path))
    with open(log.path, "w") as f:
        f.write(json.dumps({"epoch": 1, "step": 50, "loss": 0.7, "img_per_s": 39.0}) + "\n")
    for step in (100, 150):
        log.write(row="step", epoch=2, step=step, loss=1.0 / step, img_per_s=30.0)
    data.plot_curves(log.path, str(tmp_path / "curves.png"))
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.width > im.height


def test_by_width_fills_only_what_nothing_gave():
    args = argparse.Namespace(width=0.5, batch_size=None, lr=3e-4)
    data.by_width(args, batch_size=(16, 64), lr=(1e-3, 2e-4))
    assert (args.batch_size, args.lr) == (16, 3e-4)  # 0.5 is still the CPU recipe's; a given --lr stays
    args = argparse.Namespace(width=0.75, batch_size=None, lr=None)
    assert vars(data.by_width(args, batch_size=(16, 64), lr=(1e-3, 2e-4))) == {"width": 0.75, "batch_size": 64,
                                                                                "lr": 2e-4}
    assert data.default_text((1e-3, 2e-4), "docs/gan.md") == "(default: 1e-3 at --width <= 0.5, else 2e-4; docs/gan.md)"
    assert data.default_text(64) == "(default: 64)"
