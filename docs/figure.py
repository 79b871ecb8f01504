"""The method in one picture: docs/method.png, drawn from PIL primitives so it changes with the code.

Regenerate (from the repository root, or from anywhere):   python docs/figure.py

The figure is data: BOXES (module, name, text, rectangle, colour) and ARROWS (points, label, side).
A box whose module is set is labelled with the exact class of model.py (or genedml/trunk.py, genedml/encoders.py) or function
of losses.py that implements it, so a reader can look it up (tests/test_figure.py checks every name).
A box drawn inside another is a part of it (the trunk of LocalEncoder, the PEG of GlobalEncoder).
The first line of a box's text is its title; a box that holds others writes its text at the top.
Text is ASCII: Pillow's built-in font (Aileron) has no arrows or Greek letters.
"""
import math
import os
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent / "method.png"
SIZE = (1600, 900)
Box = namedtuple("Box", "module name text xy colour")  # xy = (x0, y0, x1, y1); module None: data, not code
Arrow = namedtuple("Arrow", "points label side")        # label at the longest segment's middle, on `side`
COLOURS = {  # (fill, outline): one per level, genes, losses; grey for what the levels share
    "local": ("#dce8f5", "#4d7aa8"), "neighbour": ("#dcefdf", "#4f8f5f"), "global": ("#f7ead5", "#b3832f"),
    "genes": ("#ece1f3", "#7d569b"), "losses": ("#f6dfdf", "#a85050"), "shared": ("#ececec", "#707070"),
    "note": ("#ffffff", "#b8b8b8")}
C0, C1, C2, C3, C4, C5 = (20, 210), (275, 445), (510, 830), (900, 1040), (1110, 1300), (1370, 1580)  # columns
LOCAL, NBR, GLOB, LOSS, GENE = (58, 178), (196, 316), (334, 454), (495, 640), (680, 780)              # rows


def rect(col, row):
    return (col[0], row[0], col[1], row[1])


BOXES = [
    # image side, one row per level: input -> encoder -> tokens into the fusion
    Box(None, "crop", "spot crop\n224 x 224 px, uint8\n(B,3,224,224)", rect(C0, LOCAL), "local"),
    Box("model", "LocalEncoder", "LocalEncoder  (trainable, as in TRIPLEX; or frozen tokens)",
        (C1[0], LOCAL[0], C2[1], LOCAL[1]), "local"),
    Box("genedml.trunk", "ResNet18Trunk", "ResNet18Trunk\nResNet18 without avgpool, fc", (300, 96, 520, 166), "local"),
    Box(None, "tokens", "49 tokens\nthe 7 x 7 map, flattened", (610, 96, 810, 166), "local"),
    Box(None, "tiles", "5 x 5 tiles around it\n(224 px each)\n+ on-image mask (B,25)", rect(C0, NBR), "neighbour"),
    Box("genedml.encoders", "FrozenEncoder", "FrozenEncoder\n(encoders.py)\nfrozen ResNet18 or\nfoundation model:\n"
        "one feature per tile,\nextracted once, cached", (C1[0], NBR[0], C1[1], GLOB[1]), "shared"),
    Box("model", "NeighbourEncoder", "NeighbourEncoder\n4 x Block, off-image tiles masked", rect(C2, NBR), "neighbour"),
    Box("model", "RelativePositionBias", "RelativePositionBias\na bias per head and (|drow|, |dcol|)",
        (530, 250, 810, 306), "neighbour"),
    Box(None, "section", "every spot of the section\n+ its array (x, y)\n(T spots in the step)", rect(C0, GLOB),
        "global"),
    Box("model", "GlobalEncoder", "GlobalEncoder  (each section alone)\nBlock -> PEG -> 4 x Block -> the spot's row",
        rect(C2, GLOB), "global"),
    Box("model", "PEG", "PEG\ndepthwise 3x3 conv on the array grid", (530, 388, 810, 444), "global"),
    Box("model", "Fusion", "Fusion\n\nconcatenate\n49 + 25 + 1 tokens\n\n1 Block (1 head)\n+ feed-forward\n\n"
        "mean-pool per level\nand over all tokens", (C3[0], LOCAL[0], C3[1], GLOB[1]), "shared"),
    Box("model", "GeneDML.head", "GeneDML.head\nregression MLP\nD -> 1536 -> D -> G", rect(C4, LOCAL), "shared"),
    Box(None, "prediction", "predicted expression\nof G genes (B,G)\n= expr_mean + head", rect(C5, LOCAL), "shared"),
    Box("model", "GeneDML.cluster_head", "GeneDML.cluster_head\nLinear D -> D, L2-normalise\n(shared with genes)",
        rect(C4, GLOB), "shared"),
    # the losses: two discrimination pathways and the regression
    Box("losses", "multi_scale_instance_loss", "multi_scale_instance_loss\ninstance-level pathway: mean over the "
        "3 levels", (C2[0], LOSS[0], C3[1], LOSS[1]), "losses"),
    Box("losses", "soft_info_nce", "soft_info_nce(v_s, g)\nsoft-target InfoNCE, v_s vs g for s = local, neighbour, "
        "global; tau = 0.07", (530, 572, 1020, 630), "losses"),
    Box("losses", "instance_group_loss", "instance_group_loss\ninstance-group pathway (CLD):\nz_v classified into "
        "gene groups,\nz_g into image groups; tau_group = 0.07", (1080, LOSS[0], 1350, LOSS[1]), "losses"),
    Box("losses", "kmeans", "kmeans: k = 18 groups per side", (1095, 600, 1335, 632), "losses"),
    Box("losses", "gene_dml_loss", "regression\nin gene_dml_loss:\nF.mse_loss(\nprediction,\nexpression)",
        (1400, LOSS[0], C5[1], LOSS[1]), "losses"),
    # gene side (training only)
    Box(None, "expression", "measured expression\n(B,G), G = 250 genes\ntraining only", rect(C0, GENE), "genes"),
    Box("model", "GeneEncoder", "GeneEncoder\nLinear G -> D, GELU, Linear, dropout, residual,\n"
        "LayerNorm, feed-forward, L2-normalise", rect(C2, GENE), "genes"),
    Box("model", "GeneDML.cluster_head", "GeneDML.cluster_head\nthe same Linear D -> D,\nL2-normalise",
        rect(C4, GENE), "genes"),
    Box("losses", "gene_dml_loss", "gene_dml_loss\nL = w_inst·L_inst + w_mse·L_mse + lam·L_group   "
        "(w_inst = w_mse = 1, lam = 0.8), returned with its parts", (C2[0], 828, C5[1], 886), "losses"),
    Box(None, "notation", "notation\neach box names its class in model.py, trunk.py,\nencoders.py or its function in losses.py\n"
        "B: spots in the batch;  D = 512 (cfg.dim)\nG = 250 genes (cfg.n_genes)\nF: frozen feature width "
        "(512 ResNet18)\nT: every spot of the step's sections\nlayer counts: her2st (GeneDMLConfig)\n"
        "inference runs the image side only", (C0[0], 470, C1[1], 660), "note"),
]

ARROWS = [
    Arrow([(C0[1], 131), (300, 131)], "", "above"),
    Arrow([(520, 131), (610, 131)], "(B,512,7,7)", "above"),
    Arrow([(C2[1], 118), (C3[0], 118)], "(B,49,512)", "above"),
    Arrow([(C0[1], 256), (C1[0], 256)], "", "above"),
    Arrow([(C1[1], 256), (C2[0], 256)], "(B,25,F)", "above"),
    Arrow([(C2[1], 256), (C3[0], 256)], "(B,25,D)", "above"),
    Arrow([(C0[1], 394), (C1[0], 394)], "", "above"),
    Arrow([(C1[1], 394), (C2[0], 394)], "(T,F)", "above"),
    Arrow([(C2[1], 394), (C3[0], 394)], "(B,1,D)", "above"),
    Arrow([(C3[1], 118), (C4[0], 118)], "mean\ntoken", "above"),
    Arrow([(C4[1], 118), (C5[0], 118)], "(B,G)", "above"),
    Arrow([(C3[1], 394), (C4[0], 394)], "mean\ntoken", "above"),
    Arrow([(970, GLOB[1]), (970, LOSS[0])], "v_local, v_neighbour, v_global  (B,D)", "left"),
    Arrow([(1205, GLOB[1]), (1205, LOSS[0])], "z_v (B,D)", "right"),
    Arrow([(1490, LOCAL[1]), (1490, LOSS[0])], "prediction", "right"),
    Arrow([(C0[1], 730), (C2[0], 730)], "standardised (B,G)", "above"),
    Arrow([(670, GENE[0]), (670, LOSS[1])], "g (B,D)", "right"),
    Arrow([(C2[1], 730), (C4[0], 730)], "g (B,D)", "above"),
    Arrow([(1205, GENE[0]), (1205, LOSS[1])], "z_g (B,D)", "right"),
    Arrow([(115, GENE[1]), (115, 805), (1420, 805), (1420, LOSS[1])], "measured expression: the regression target",
          "below"),
]
TITLE = "Gene-DML: three image levels, a gene encoder, two discrimination pathways and a regression"


def fonts():
    """Pillow's built-in TrueType font (Pillow >= 10.1); the old bitmap font where there is none."""
    try:
        return {size: ImageFont.load_default(size=size) for size in (13, 14, 16, 22)}
    except TypeError:
        return dict.fromkeys((13, 14, 16, 22), ImageFont.load_default())


def text_block(font, title_font, text, x, y):
    """[(xy, line, font)] of a text centred under (x, y), its first line in title_font; and its rectangle."""
    out, width = [], 0
    for i, line in enumerate(text.split("\n")):
        f = title_font if i == 0 else font
        width = max(width, f.getlength(line))
        out.append(((x - f.getlength(line) / 2, y), line, f))
        y += getattr(f, "size", 11) + 5  # the bitmap fallback font is 11 px high
    return out, (x - width / 2, out[0][0][1], x + width / 2, y - 5)


def inside(inner, outer, pad=0):
    return (outer[0] + pad <= inner[0] and outer[1] + pad <= inner[1]
            and inner[2] <= outer[2] - pad and inner[3] <= outer[3] - pad)


def overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def layout(f):
    """Where each box's text and each arrow's label go, [(xy, line, font)], and the layout's problems:
    text outside its box or over one of its parts, boxes that cross without nesting, labels on boxes."""
    placed, problems = [], []
    for i, b in enumerate(BOXES):
        parts = [p.xy for p in BOXES if p is not b and inside(p.xy, b.xy)]
        _, (_, ty0, _, ty1) = text_block(f[14], f[16], b.text, 0, 0)
        top = b.xy[1] + 8 if parts else (b.xy[1] + b.xy[3] - (ty1 - ty0)) / 2  # holds parts: text on top
        lines, box = text_block(f[14], f[16], b.text, (b.xy[0] + b.xy[2]) / 2, top)
        placed += lines
        if not inside(box, b.xy, pad=4) or any(overlap(box, p) for p in parts):
            problems.append(f"the text of {b.name} does not fit its box")
        problems += [f"{b.name} and {p.name} cross" for p in BOXES[i + 1:]
                     if overlap(b.xy, p.xy) and not inside(b.xy, p.xy) and not inside(p.xy, b.xy)]
    for a in ARROWS:
        if not a.label:
            continue
        (xa, ya), (xb, yb) = max(zip(a.points, a.points[1:]), key=lambda s: math.dist(*s))
        mx, my = (xa + xb) / 2, (ya + yb) / 2
        _, (bx0, by0, bx1, by1) = text_block(f[13], f[13], a.label, 0, 0)
        w, h = bx1 - bx0, by1 - by0
        x, y = {"above": (mx, my - h - 4), "below": (mx, my + 4), "left": (mx - w / 2 - 6, my - h / 2),
                "right": (mx + w / 2 + 6, my - h / 2)}[a.side]
        lines, box = text_block(f[13], f[13], a.label, x, y)
        placed += lines
        problems += [f"the label {a.label!r} lies on {b.name}" for b in BOXES
                     if overlap(box, b.xy) and not inside(box, b.xy)]
    return placed, problems


def draw(path=OUT):
    """Draw the figure into `path` (written atomically: a temporary file, then os.replace); return the path."""
    f = fonts()
    placed, problems = layout(f)
    assert not problems, "layout: " + "; ".join(problems)
    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    d.text(((SIZE[0] - f[22].getlength(TITLE)) / 2, 14), TITLE, font=f[22], fill="#222222")
    for b in BOXES:  # in list order, so a part is drawn over the box that holds it
        fill, outline = COLOURS[b.colour]
        d.rounded_rectangle(b.xy, radius=8, fill=fill, outline=outline, width=2)
    for a in ARROWS:
        d.line(a.points, fill="#555555", width=2, joint="curve")
        (xa, ya), (xb, yb) = a.points[-2:]
        n = math.hypot(xb - xa, yb - ya)
        ux, uy = (xb - xa) / n, (yb - ya) / n  # the head: a triangle 10 px long, 10 px wide
        d.polygon([(xb, yb), (xb - 10 * ux - 5 * uy, yb - 10 * uy + 5 * ux),
                   (xb - 10 * ux + 5 * uy, yb - 10 * uy - 5 * ux)], fill="#555555")
    for xy, line, font in placed:
        d.text(xy, line, font=font, fill="#222222")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            img.save(fh, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would make the picture private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


if __name__ == "__main__":
    print(draw(sys.argv[1] if len(sys.argv) > 1 else OUT))
