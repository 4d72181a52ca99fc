"""MaskCut's cost per support image at the recipe sizes (issue 12, point 10): 224 px vs MaskCut's own 480 px (60x60
patches at stride 8) and its dense CRF, on DINO ViT-B/8's architecture (timm `vit_base_patch8_224`, random weights).

Prints `name: value` lines; ratios are against 224 px without CRF in the same process. Random weights give masks
of arbitrary shapes, so the cut count (3 per image) and the CRF's work are as with real weights.

    python bench/maskcut_bench.py [--images 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 480])
    a = ap.parse_args(argv)
    import timm
    import torch

    from ovdiff_ray.models.extractors import DinoExtractor
    from ovdiff_ray.models.masks import MaskCut, maskcut
    from ovdiff_ray.recipe import ExtractorConfig, MasksConfig

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch8_224", pretrained=False, dynamic_img_size=True, num_classes=0)
    dino = DinoExtractor(model.to(a.device).eval(), ExtractorConfig(name="dino", type="dino"), a.device)
    from skimage import data

    photo = np.asarray(data.astronaut())  # 512 x 512 RGB, like a support image
    images = np.stack([photo] * a.images)
    base = None
    MaskCut(dino, MasksConfig(maskcut_size=min(a.sizes))).batch(images[:1])  # warm-up
    for size in a.sizes:
        for crf in (False, True):
            cfg = MasksConfig(maskcut_size=size, maskcut_crf=crf)
            mc = MaskCut(dino, cfg)
            c0 = time.process_time()
            t0 = time.perf_counter()
            with torch.no_grad():
                x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
                feats = dino(x).cpu().numpy()
            t_dino = (time.perf_counter() - t0) / len(images)
            t0 = time.perf_counter()
            for f in feats:
                maskcut(f, cfg.maskcut_n, cfg.maskcut_tau)
            t_cut = (time.perf_counter() - t0) / len(images)
            t0 = time.perf_counter()
            out = mc.batch(images)
            total = (time.perf_counter() - t0) / len(images)
            cpu = (time.process_time() - c0) / len(images) / 2  # each step above ran twice (parts, then whole)
            base = base or total
            tag = f"maskcut_{size}px" + ("_crf" if crf else "")
            print(f"{tag}_s_per_image: {total:.2f} (dino {t_dino:.2f}, cuts {t_cut:.2f}, "
                  f"crf+resize {max(0.0, total - t_dino - t_cut):.2f}; masks {np.mean([len(m) for m in out]):.1f}), "
                  f"ratio {total / base:.2f}; cpu {cpu:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
