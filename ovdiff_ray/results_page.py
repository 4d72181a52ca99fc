"""The results page of `ovdiff demo` (`demo-out/index.html`): what a labeller needs to judge the method.

Per scene: the image, the prediction, the ground truth and the confidence side by side (PNG files beside the page;
the confidence is grey, brighter = surer, with diagonal hatching where a pixel is unsure: under `min_confidence`);
a per-class IoU chart of the whole vocabulary sorted worst first (CSS bars; classes neither in the scenes nor
predicted are listed last as "n/a"); the headline figures with how they were measured. Static HTML + PNGs: no
script, no external URL, opens from the file system.

    write_results_page(out, scenes, classes, iou, headline) -> out / "index.html"
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

IGNORE = 255  # ground-truth value left out of mIoU (drawn grey)


@dataclass
class SceneView:
    """One scene on the page; label maps index `classes` (0 = background)."""

    name: str
    image: np.ndarray  # [H, W, 3] uint8
    prediction: np.ndarray  # [H, W] int, values index the page's classes
    truth: np.ndarray  # [H, W] int, values index the page's classes; IGNORE = not scored
    confidence: np.ndarray | None = None  # [H, W] float in [0, 1]
    ms: float | None = None  # request latency, shown in the caption


def colour(value: int) -> tuple[int, int, int]:
    """Class colour: black for background, the segmenter's golden-ratio hues otherwise."""
    from .segment import class_colour

    return (0, 0, 0) if value == 0 else class_colour(value)


def paint(labels: np.ndarray, n: int) -> np.ndarray:
    """`labels [H, W]` (0..n-1, IGNORE grey) -> `[H, W, 3]` uint8 colours."""
    lut = np.zeros((max(n, IGNORE + 1), 3), np.uint8)
    for v in range(n):
        lut[v] = colour(v)
    lut[IGNORE] = (128, 128, 128)
    return lut[np.clip(labels, 0, len(lut) - 1)]


def confidence_picture(conf: np.ndarray, min_confidence: float, period: int = 6) -> np.ndarray:
    """`conf [H, W]` in [0, 1] -> `[H, W, 3]` uint8: grey by confidence, unsure pixels (`conf < min_confidence`)
    tinted red with dark diagonal hatching every `period` pixels."""
    g = (np.clip(conf, 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(g[..., None], 3, 2)
    unsure = conf < min_confidence
    yy, xx = np.mgrid[:conf.shape[0], :conf.shape[1]]
    stripe = ((yy + xx) % period) < 2
    tint = rgb.astype(np.int32)
    tint[..., 0] = np.maximum(tint[..., 0], 160)
    rgb = np.where(unsure[..., None], np.where(stripe[..., None], 40, tint), rgb).astype(np.uint8)
    return rgb


def save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


def _chart(classes: Sequence[str], iou: np.ndarray) -> str:
    """Rows of the per-class IoU chart, worst first, classes without an IoU last."""
    order = sorted(range(len(classes)), key=lambda i: (not np.isfinite(iou[i]), float(iou[i])
                                                        if np.isfinite(iou[i]) else 0.0, classes[i]))
    rows = []
    for i in order:
        v = iou[i]
        r, g, b = colour(i)
        known = np.isfinite(v)
        width = f"{100 * v:.1f}%" if known else "0"
        label = f"{v:.3f}" if known else "n/a"
        cls = "bar" + ("" if known else " na") + (" low" if known and v < 0.8 else "")
        rows.append(f"<li class='{cls}' data-class='{html.escape(classes[i])}' data-iou='{label}'>"
                    f"<span class='sw' style='background:rgb({r},{g},{b})'></span>"
                    f"<span class='nm'>{html.escape(classes[i])}</span><span class='track'><span class='fill' "
                    f"style='width:{width}'></span></span><span class='v'>{label}</span></li>")
    return "".join(rows)


def write_results_page(out: Path, scenes: Sequence[SceneView], classes: Sequence[str], iou: np.ndarray,
                       headline: Sequence[str], min_confidence: float = 0.5, title: str = "ovdiff results",
                       extra_html: str = "") -> Path:
    """Write `out/index.html` and its PNGs under `out/results/`; returns the page's path. `iou [len(classes)]`
    (nan: the class is neither in the scenes nor predicted); `headline`: lines shown verbatim (figures and how they
    were measured)."""
    out = Path(out)
    pics = out / "results"
    pics.mkdir(parents=True, exist_ok=True)
    n = len(classes)
    cards = []
    for s in scenes:
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s.name)
        files = {"image": s.image, "prediction": paint(s.prediction, n), "truth": paint(s.truth, n)}
        if s.confidence is not None:
            files["confidence"] = confidence_picture(s.confidence, min_confidence)
        figs = []
        for kind, rgb in files.items():
            save_png(pics / f"{stem}-{kind}.png", rgb)
            figs.append(f"<figure><img src='results/{stem}-{kind}.png' alt='{html.escape(s.name)} {kind}' "
                        f"width='{rgb.shape[1]}' height='{rgb.shape[0]}'><figcaption>{kind}</figcaption></figure>")
        present = sorted(set(np.unique(s.prediction).tolist()) | set(np.unique(s.truth).tolist()) - {IGNORE})
        legend = "".join(f"<span class='key'><span class='sw' style='background:rgb{colour(v)}'></span>"
                         f"{html.escape(classes[v])}</span>" for v in present if 0 <= v < n)
        right = s.truth != IGNORE
        acc = float((s.prediction[right] == s.truth[right]).mean()) if right.any() else float("nan")
        ms = f" &middot; {s.ms:.0f} ms" if s.ms is not None else ""
        cards.append(f"<section class='scene'><h3>{html.escape(s.name)} <small>pixel accuracy {acc:.3f}{ms}</small>"
                     f"</h3><div class='row'>{''.join(figs)}</div><div class='legend'>{legend}</div></section>")
    finite = iou[np.isfinite(iou)]
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:15px system-ui,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;color:#222}}
pre{{white-space:pre-wrap;background:#f4f4f6;padding:.8rem}}
.row{{display:flex;flex-wrap:wrap;gap:.6rem}}figure{{margin:0}}figure img{{width:12rem;height:auto;
border:1px solid #ccc;image-rendering:pixelated;display:block}}figcaption{{font-size:.8rem;color:#555}}
.scene h3{{margin:1.2rem 0 .4rem}}.scene small{{font-weight:normal;color:#666}}
.legend{{font-size:.8rem;margin:.3rem 0}}.key{{margin-right:.8rem;white-space:nowrap}}
.sw{{display:inline-block;width:.8rem;height:.8rem;border:1px solid #999;margin-right:.3rem;vertical-align:middle}}
#chart{{list-style:none;padding:0;columns:2;column-gap:2rem}}#chart li{{display:flex;align-items:center;gap:.4rem;
font-size:.82rem;break-inside:avoid;margin:.1rem 0}}.nm{{width:9.5rem;overflow:hidden;white-space:nowrap;
text-overflow:ellipsis}}.track{{flex:1;background:#eee;height:.8rem;position:relative}}.fill{{display:block;
height:100%;background:#4a7bd0}}.low .fill{{background:#d0604a}}.na .nm,.na .v{{color:#999}}.v{{width:3rem;
text-align:right;font-variant-numeric:tabular-nums}}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Headline</h2><pre id="headline">{html.escape(chr(10).join(headline))}</pre>
<h2>Per-class IoU, worst first</h2>
<p>{len(classes)} classes; {len(finite)} in the scenes or predicted (red: under 0.80), the rest n/a.</p>
<ol id="chart">{_chart(classes, iou)}</ol>
<h2>Scenes: image | prediction | ground truth | confidence</h2>
<p>Label colours are per class (the chart's swatches), not the objects' own colours; ground truth grey = not
scored. Confidence is grey (brighter = surer), hatched red where unsure (under {min_confidence:g}).</p>
{''.join(cards)}{extra_html}</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
