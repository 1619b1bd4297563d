"""Export generated kanji as an OpenType font (CFF outlines, .otf) that types beside the real ones.

A sample is a bitmap drawn in the em box of the font the model learned from: data.em_box gives the one pixel size
and baseline origin (size, ox, oy) at which every training kanji was rendered, so image point (x, y) is font point
((x - ox) * upem / size, (oy - y) * upem / size). Through that map a traced outline lands where the source font
would have drawn a real kanji; the new font copies the source's units per em, vertical metrics and kanji advance,
so generated glyphs sit on the same baseline, at the same size, as the kanji typed beside them.

Each bitmap is upsampled 4x (bicubic), thresholded at half ink and traced by vtracer (binary mode; method:
visioncortex.org/vtracer-docs): every connected ink region becomes one path of cubic splines whose outer boundary
runs clockwise on screen (y down) and whose holes run counter-clockwise. Flipping y into font units turns outers
counter-clockwise, the PostScript/CFF convention, with holes opposite, so under the non-zero rule a hole (口) stays
empty. Most of vtracer's cubics are straight, and become lines (one point instead of three). Speckle rule: a
contour, outer or hole, enclosing less than MIN_AREA source pixels is dropped, and a glyph left with no contour is
not written. The glyphs written take consecutive Private Use Area code points from U+E000 (uniE000, ...).
docs/font.md measures vtracer against other tracers, and the round trip.
"""
import argparse
import functools
import math
import os
import re
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.areaPen import AreaPen
from fontTools.pens.recordingPen import RecordingPen
from fontTools.pens.t2CharStringPen import T2CharStringPen
from fontTools.pens.transformPen import TransformPen
from fontTools.svgLib.path import parse_path
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

import data

PUA = (0xE000, 0xF8FF)
UPSAMPLE = 4
MIN_AREA = 2.0  # source pixels; the smallest dot of a 64 px kanji covers several times this


def trace(ink):
    """(H, W) bool, ink True -> closed contours (RecordingPen each) in pixels, y down, none under MIN_AREA."""
    import vtracer

    pgm = b"P5 %d %d 255\n" % ink.shape[::-1] + np.where(ink, 0, 255).astype(np.uint8).tobytes()  # ink black
    svg = vtracer.convert_raw_image_to_svg(pgm, img_format="pnm", colormode="binary", mode="spline",
                                           filter_speckle=UPSAMPLE, path_precision=2)
    contours = []
    for d, tx, ty in re.findall(r'<path d="([^"]*)"[^>]*translate\(([-\d.]+),([-\d.]+)\)', svg):
        path = RecordingPen()
        parse_path(d, TransformPen(path, (1, 0, 0, 1, float(tx), float(ty))))
        for op, pts in path.value:
            if op == "moveTo":
                contours.append(RecordingPen())
            elif op == "curveTo" and straight(last, *pts):
                op, pts = "lineTo", pts[2:]
            contours[-1].value.append((op, pts))
            last = pts[-1] if pts else last
    return [c for c in contours if abs(area(c)) >= MIN_AREA * UPSAMPLE ** 2]


def area(contour):
    contour.replay(pen := AreaPen())
    return pen.value


def straight(p0, p1, p2, p3, tol=0.1):
    """Whether both control points of the cubic p0..p3 lie within tol pixels of its chord."""
    dx, dy = p3[0] - p0[0], p3[1] - p0[1]
    chord = math.hypot(dx, dy) or 1
    return all(abs(dx * (p[1] - p0[1]) - dy * (p[0] - p0[0])) / chord < tol for p in (p1, p2))


@functools.lru_cache(maxsize=4)
def em_box(font_path, image_size):
    """(size, ox, oy) at which data.render_glyphs drew the font's kanji (measuring them all takes seconds).
    Pillow's hinted rendering snaps the pen to whole pixels, so the origin the kanji really got is the rounded one."""
    size, ox, oy = data.em_box(font_path, data.font_codepoints(font_path), image_size, progress=False)
    return size, math.floor(ox + 0.5), math.floor(oy + 0.5)


def check_output(out_path, n, cfg=None):
    """Bad input fails here, in one line, before any work (sample.py calls it before sampling)."""
    if cfg is not None and cfg.get("dataset") != "kanji":
        raise data.GanjiError(f"a font needs a kanji model (this one learned {cfg.get('dataset')!r}): "
                              "only kanji have a source font whose em box the glyphs can take")
    if not 1 <= n <= PUA[1] - PUA[0] + 1:
        raise data.GanjiError(f"a font takes 1 to {PUA[1] - PUA[0] + 1} glyphs (the Private Use Area "
                              f"U+{PUA[0]:04X}-U+{PUA[1]:04X}), not {n}")
    if not out_path.lower().endswith(".otf"):
        raise data.GanjiError(f"the font path must end in .otf (OpenType, CFF outlines), got {out_path}")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(out_path) or \
            (os.path.exists(out_path) and not os.access(out_path, os.W_OK)):
        raise data.GanjiError(f"cannot write the font to {out_path}")


def summary(report):
    """write_font's report as one line for people."""
    cps = [c for c in report["codepoints"] if c]
    return (f"{report['written']} glyphs at U+{cps[0]:04X}-U+{cps[-1]:04X}, {report['dropped']} dropped (speckle "
            f"rule), traced and written in {report['seconds']:.1f} s; specimen {report['specimen']}, "
            f"list {report['listing']}")


def write_font(images, cfg, out_path, family, model_file, font=None):
    """Float (N, 1, S, S) glyphs in [0, 1], ink = 1 -> an .otf at out_path, a specimen .png and a .txt listing
    beside it. Returns their paths, the code point of each image (None: dropped), counts, and the seconds spent
    measuring the em box (first call in a process for a font and size), tracing and writing the font."""
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise data.GanjiError(f"a font takes square one-channel glyphs (N, 1, S, S), got {tuple(images.shape)}")
    check_output(out_path, len(images), cfg)
    start, images = time.perf_counter(), images.detach().float().cpu()
    font = font or cfg.get("font") or data.default_font()
    with TTFont(font, fontNumber=0, lazy=True) as src:
        upem, hhea, os2, hmtx = src["head"].unitsPerEm, src["hhea"], src["OS/2"], src["hmtx"]
        lo, hi = data.KANJI_RANGE  # the advance most kanji share (all of them, in a CJK font)
        advance = Counter(hmtx[g][0] for c, g in src.getBestCmap().items() if lo <= c <= hi).most_common(1)[0][0]
        metrics = dict(ascent=hhea.ascent, descent=hhea.descent, lineGap=hhea.lineGap)
        vertical = {k: getattr(os2, k) for k in ("sTypoAscender", "sTypoDescender", "sTypoLineGap",
                                                 "usWinAscent", "usWinDescent")}
    size, ox, oy = em_box(font, images.shape[-1])
    u = upem / size / UPSAMPLE  # font units per traced pixel
    to_font = (u, 0, 0, -u, -ox * u * UPSAMPLE, oy * u * UPSAMPLE)

    names, charstrings, codepoints = [".notdef", "space"], {}, []
    for x in images:
        contours = trace((F.interpolate(x[None], scale_factor=UPSAMPLE, mode="bicubic") > 0.5)[0, 0].numpy())
        codepoints.append(PUA[0] + len(names) - 2 if contours else None)
        if contours:
            pen = T2CharStringPen(advance, None)
            for c in contours:
                c.replay(TransformPen(pen, to_font))
            names.append(f"uni{codepoints[-1]:04X}")
            charstrings[names[-1]] = pen.getCharString()
    if len(names) == 2:
        raise data.GanjiError(f"none of the {len(images)} glyphs has ink left to trace")
    notdef, m = T2CharStringPen(advance, None), advance // 10  # the customary hollow box
    for x0, y0, x1, y1 in ((m, 0, advance - m, upem - 2 * m), (advance - 2 * m, m, 2 * m, upem - 3 * m)):
        notdef.moveTo((x0, y0)), notdef.lineTo((x1, y0)), notdef.lineTo((x1, y1)), notdef.lineTo((x0, y1))
        notdef.closePath()  # the second square runs clockwise: the hole
    charstrings.update({".notdef": notdef.getCharString(), "space": T2CharStringPen(advance, None).getCharString()})

    fb = FontBuilder(upem, isTTF=False)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({0x20: "space", **{c: f"uni{c:04X}" for c in codepoints if c}})
    ps = (re.sub(r"[^A-Za-z0-9]", "", family)[:40] or "GANji") + "-Regular"
    fb.setupCFF(ps, {}, charstrings, {})
    bounds = {n: charstrings[n].calcBounds(None) for n in names}
    fb.setupHorizontalMetrics({n: (advance, round(bounds[n][0]) if bounds[n] else 0) for n in names})
    fb.setupHorizontalHeader(**metrics)
    fb.setupNameTable({"familyName": family, "styleName": "Regular", "fullName": f"{family} Regular",
                       "uniqueFontIdentifier": f"GANji: {family}", "psName": ps, "version": "Version 1.000",
                       "manufacturer": "GANji",
                       "description": f"Generated by GANji from the model {os.path.basename(model_file)}"},
                      mac=False)
    fb.setupOS2(**vertical, usWeightClass=400, fsType=0)
    fb.setupPost()
    fb.save(out_path)
    seconds = time.perf_counter() - start

    stem = os.path.splitext(out_path)[0]
    with open(stem + ".txt", "w", encoding="utf-8") as f:
        f.write(f"# {family}: code point, glyph name, glyph, index of the sampled image\n")
        for i, c in enumerate(codepoints):
            f.write(f"U+{c:04X}\tuni{c:04X}\t{chr(c)}\t{i}\n" if c else f"-\tdropped (speckle rule)\t-\t{i}\n")
    specimen(out_path, [c for c in codepoints if c], size, ox, oy, images.shape[-1], stem + ".png")
    return {"font": out_path, "specimen": stem + ".png", "listing": stem + ".txt", "codepoints": codepoints,
            "written": len(names) - 2, "dropped": codepoints.count(None), "seconds": seconds}


def render(font_path, codepoints, size, ox, oy, image_size):
    """Code points of a font, each drawn as data.render_glyphs draws a kanji -> list of (S, S) uint8, ink 255."""
    pil_font, out = ImageFont.truetype(font_path, size), []
    for c in codepoints:
        im = Image.new("L", (image_size, image_size))
        ImageDraw.Draw(im).text((ox, oy), chr(c), fill=255, font=pil_font, anchor="ls")
        out.append(np.asarray(im))
    return out


def specimen(font_path, codepoints, size, ox, oy, s, png, cols=16):
    """Every glyph of the written font, black on white, its code point under it."""
    sheet = Image.new("L", (cols * s, -(-len(codepoints) // cols) * (s + 12)), 255)
    draw, label = ImageDraw.Draw(sheet), ImageFont.load_default(10)
    for k, g in enumerate(render(font_path, codepoints, size, ox, oy, s)):
        x, y = k % cols * s, k // cols * (s + 12)
        sheet.paste(Image.fromarray(255 - g), (x, y))
        draw.text((x + s // 2, y + s + 6), f"U+{codepoints[k]:04X}", fill=0, font=label, anchor="mm")
    sheet.save(png)


def round_trip_iou(images, font_path, cfg, codepoints, font=None):
    """IoU of each written glyph, rendered back in the em box, with its image, both binarised at half ink -> (K,)."""
    keep = [i for i, c in enumerate(codepoints) if c]
    box = em_box(font or cfg.get("font") or data.default_font(), images.shape[-1])
    back = render(font_path, [codepoints[i] for i in keep], *box, images.shape[-1])
    a, b = images[keep, 0].cpu() > 0.5, torch.from_numpy(np.stack(back)) >= 128
    return (a & b).sum((1, 2)) / (a | b).sum((1, 2)).clamp(min=1)


def main():
    p = argparse.ArgumentParser(description="Measure the font export on sampled glyph PNGs: time, glyphs dropped, "
                                            "bytes per glyph, round-trip IoU.")
    p.add_argument("folder", help="glyph PNGs, black ink on white, as sample.py --each writes them")
    p.add_argument("ckpt", help="the checkpoint that drew them (its config names the source font)")
    p.add_argument("--out", default="fake_kanji.otf", help="font path (default fake_kanji.otf)")
    args = p.parse_args()
    files = sorted(os.path.join(args.folder, f) for f in os.listdir(args.folder) if f.endswith(".png")) \
        if os.path.isdir(args.folder) else []
    if not files:
        raise data.GanjiError(f"no glyph PNGs in {args.folder}")
    images = torch.stack([torch.from_numpy(255 - np.asarray(Image.open(f).convert("L"))) for f in files])
    images, cfg = images[:, None].float() / 255, data.load_checkpoint(args.ckpt)["config"]
    cpu = time.process_time()
    r = write_font(images, cfg, args.out, "GANji Fake Kanji", args.ckpt)
    cpu = time.process_time() - cpu  # with the specimen; unlike wall time, not stretched by other processes
    iou = round_trip_iou(images, args.out, cfg, r["codepoints"])
    print(f"{r['written']} glyphs written, {r['dropped']} dropped, in {r['seconds']:.2f} s (em box included; CPU "
          f"{cpu:.2f} s), {os.path.getsize(args.out) / r['written']:.0f} bytes/glyph; round-trip IoU median "
          f"{iou.median():.3f}, 10th percentile {iou.quantile(0.1):.3f}, min {iou.min():.3f}")


if __name__ == "__main__":
    data.cli(main)
