"""font.write_font on a tiny "model": real kanji bitmaps, a synthetic ring, a blank and a speck as its samples."""
import io
import os

import numpy as np
import pytest
import torch
from fontTools.pens.recordingPen import RecordingPen
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

import data
import font

KANJI = "口回永一鬱"
CFG = {"dataset": "kanji", "image_size": 64, "font": None}


@pytest.fixture(scope="module")
def made(data_dir, tmp_path_factory):
    """(images, result of write_font): the kanji of KANJI, a ring (square with a square hole), a blank, a speck."""
    images, cps = data.load_kanji(None, 64, data_dir, progress=False)
    kanji = images[torch.tensor([(cps == ord(k)).nonzero()[0, 0] for k in KANJI])].float() / 255
    ring, blank, speck = torch.zeros(3, 1, 64, 64)
    ring[0, 12:52, 12:52], ring[0, 24:40, 24:40] = 1, 0
    speck[0, 30, 30] = 1
    images = torch.cat([kanji, ring[None], blank[None], speck[None]])
    out = str(tmp_path_factory.mktemp("font") / "fake.otf")
    return images, font.write_font(images, CFG, out, "偽漢字 Test", "/some/run/ckpt.pt")


def test_files_listing_and_dropped_glyphs(made):
    images, r = made
    n = len(KANJI) + 1
    assert r["written"] == n and r["dropped"] == 2  # the blank and the lone speck trace to nothing
    assert r["codepoints"] == [0xE000 + i for i in range(n)] + [None, None]
    assert all(os.path.isfile(r[k]) for k in ("font", "specimen", "listing"))
    lines = open(r["listing"], encoding="utf-8").read().splitlines()[1:]
    assert lines[0] == "U+E000\tuniE000\t\ue000\t0" and lines[-1].startswith("-") and lines[-1].endswith("\t7")
    with Image.open(r["specimen"]) as im:
        assert im.width == 16 * 64 and im.height > 64
    assert font.summary(r).startswith("6 glyphs at U+E000-U+E005, 2 dropped")


def test_tables_metrics_and_names(made):
    _, r = made
    src, out = TTFont(data.default_font()), TTFont(r["font"])
    assert out.sfntVersion == "OTTO" and out["head"].unitsPerEm == src["head"].unitsPerEm
    assert (out["hhea"].ascent, out["hhea"].descent) == (src["hhea"].ascent, src["hhea"].descent)
    assert out["OS/2"].sTypoAscender == src["OS/2"].sTypoAscender
    cmap = out.getBestCmap()
    assert {c: cmap[c] for c in r["codepoints"] if c} == {c: f"uni{c:04X}" for c in r["codepoints"] if c}
    assert cmap[0x20] == "space" and out.getGlyphOrder()[0] == ".notdef"
    real = src["hmtx"][src.getBestCmap()[ord("口")]][0]
    assert {out["hmtx"][g][0] for g in out.getGlyphOrder()} == {real}
    assert out["name"].getDebugName(1) == "偽漢字 Test"
    about = " ".join(rec.toUnicode() for rec in out["name"].names)
    assert "GANji" in about and "ckpt.pt" in about and "/some/run" not in about


def test_ttx_dump_and_recompile_round_trip(made, tmp_path):
    _, r = made
    xml = io.StringIO()
    TTFont(r["font"]).saveXML(xml)
    again = TTFont()
    again.importXML(io.StringIO(xml.getvalue()))
    again.save(tmp_path / "again.otf")
    a, b = TTFont(r["font"]), TTFont(tmp_path / "again.otf")
    assert a.getGlyphOrder() == b.getGlyphOrder() and a.getBestCmap() == b.getBestCmap()
    for g in a.getGlyphOrder():
        pa, pb = RecordingPen(), RecordingPen()
        a.getGlyphSet()[g].draw(pa), b.getGlyphSet()[g].draw(pb)
        assert pa.value == pb.value


def test_round_trip_matches_the_bitmaps(made):
    images, r = made
    iou = font.round_trip_iou(images, r["font"], CFG, r["codepoints"])
    assert len(iou) == r["written"] and iou.min() >= 0.85  # the acceptance floor for a 10th percentile


def test_holes_render_as_holes(made):
    _, r = made
    size, ox, oy = font.em_box(data.default_font(), 64)
    ring, kou = font.render(r["font"], [0xE005, 0xE000], size, ox, oy, 64)
    assert ring[32, 32] == 0 and ring[16, 32] == 255 and ring[4, 4] == 0
    assert kou[32, 32] == 0 and kou[32].max() == 255  # 口: an empty counter between two inked sides


def test_types_on_the_baseline_beside_real_kanji(made):
    """A line mixing real kanji (source font) and their traced copies (new font), as a program would type it."""
    _, r = made
    real, fake = ImageFont.truetype(data.default_font(), 96), ImageFont.truetype(r["font"], 96)
    line = Image.new("L", (96 * 2 * len(KANJI) + 20, 160))
    draw, x = ImageDraw.Draw(line), 10
    boxes = []
    for i, k in enumerate(KANJI):
        for text, f in ((k, real), (chr(0xE000 + i), fake)):
            draw.text((x, 120), text, font=f, fill=255, anchor="ls")  # one baseline at y = 120
            cell = np.asarray(line)[:, x:x + round(f.getlength(text))]
            ys, xs = np.nonzero(cell)
            boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))
            x += round(f.getlength(text))
    for real_box, fake_box in zip(boxes[::2], boxes[1::2]):
        assert np.abs(np.subtract(real_box, fake_box)).max() <= 2


def test_bad_inputs_fail_in_one_line_before_any_work(tmp_path):
    few = torch.zeros(2, 1, 64, 64)
    cases = [(torch.zeros(1, 1, 64, 64).expand(6401, -1, -1, -1), CFG, tmp_path / "a.otf", "6400"),
             (few, CFG, tmp_path / "missing" / "a.otf", "cannot write"),
             (few, CFG, tmp_path, "must end in .otf"),
             (few, CFG, tmp_path / "dir.otf", "cannot write"),
             (few, {**CFG, "dataset": "mnist"}, tmp_path / "a.otf", "kanji"),
             (torch.zeros(2, 3, 64, 64), CFG, tmp_path / "a.otf", "one-channel")]
    (tmp_path / "dir.otf").mkdir()
    for images, cfg, out, words in cases:
        with pytest.raises(data.GanjiError, match=words) as e:
            font.write_font(images, cfg, str(out), "F", "m.pt")
        assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["dir.otf"]
    for n in (0, 6401):  # what sample.py checks before it samples
        with pytest.raises(data.GanjiError, match="6400"):
            font.check_output(str(tmp_path / "a.otf"), n)
