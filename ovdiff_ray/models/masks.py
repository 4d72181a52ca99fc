"""Attribution + instance masks -> foreground/background masks (OVDIFF.md section 3).

`fg_bg_masks` is the ranking / complement / erosion / fallback rule; instance maskers (MaskCut on DINO keys,
CutLER through detectron2) produce its candidates.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..recipe import MasksConfig

CROSS = ndimage.generate_binary_structure(2, 1)  # 3x3 cross


def fg_bg_masks(attribution: np.ndarray, instances: np.ndarray | None, cfg: MasksConfig) -> tuple[np.ndarray, np.ndarray]:
    """attribution: [H, W] in [0, 1]; instances: [M, H, W] bool or None -> (fg [H, W] bool, bg [H, W] bool).

    Candidates are the instance masks plus their complement; each is weighted by its mean attribution and each pixel
    goes to the covering candidate of highest weight. Foreground = pixels won by the best candidate; background =
    pixels won by the worst one, with attribution < bg_threshold, eroded `erode` times. No instance masks: thresholds.
    """
    attr = np.asarray(attribution, np.float32)
    low = attr < cfg.bg_threshold
    inst = None if instances is None else np.asarray(instances, bool)
    if inst is not None:
        inst = inst[inst.reshape(len(inst), -1).any(1)] if len(inst) else inst
    if inst is None or len(inst) == 0:
        fg = attr > cfg.fg_threshold
        bg = low
    else:
        comp = ~inst.any(0)
        cands = np.concatenate([inst, comp[None]]) if comp.any() else inst  # [K, H, W]
        weights = np.array([attr[c].mean() for c in cands], np.float32)  # [K]
        # each pixel -> covering candidate of highest weight
        w = np.where(cands, weights[:, None, None], -np.inf)
        winner = w.argmax(0)  # [H, W]
        best, worst = int(weights.argmax()), int(weights.argmin())
        fg = winner == best
        bg = (winner == worst) & low if worst != best else np.zeros_like(fg)
    if cfg.erode > 0 and bg.any():
        bg = ndimage.binary_erosion(bg, structure=CROSS, iterations=cfg.erode)
    return fg, bg & ~fg


# ----------------------------------------------------------------------------------------------------------------
# MaskCut: normalised cuts on DINO keys (CutLER's training-free pseudo-masks, Wang et al. 2023)


def ncut_bipartition(feats: np.ndarray, tau: float, eps: float = 1e-5) -> np.ndarray:
    """feats `[N, D]` -> second smallest generalised eigenvector `[N]` of the thresholded cosine affinity graph."""
    from scipy.linalg import eigh

    f = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(min=1e-8)
    a = f @ f.T
    a = np.where(a > tau, 1.0, eps)
    d = np.diag(a.sum(1))
    _, vecs = eigh(d - a, d, subset_by_index=[1, 1])
    return vecs[:, 0]


def _corners_in(mask: np.ndarray) -> int:
    return int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])


def maskcut(feats: np.ndarray, n: int, tau: float = 0.15, min_frac: float = 0.01) -> np.ndarray:
    """feats `[D, h, w]` -> up to `n` masks `[M, h, w]` bool; each cut is made on the patches left by earlier ones.

    Per cut: bipartition by the second eigenvector (above its mean); flip it if the foreground holds 3+ grid
    corners or misses the most salient patch; keep the connected component of the most salient patch. Stops early
    when a mask is smaller than `min_frac` of the grid or fewer than 3 patches remain.
    """
    d, h, w = feats.shape
    flat = np.asarray(feats, np.float64).reshape(d, -1).T  # [h*w, D]
    remaining = np.ones(h * w, bool)
    masks = []
    for _ in range(n):
        idx = np.flatnonzero(remaining)
        if len(idx) < 3:
            break
        vec = ncut_bipartition(flat[idx], tau)
        part = np.zeros(h * w, bool)
        part[idx] = vec > vec.mean()
        salient = idx[np.argmax(np.abs(vec))]
        if _corners_in(part.reshape(h, w)) >= 3 or not part[salient]:
            part[idx], vec = ~part[idx], -vec
        seed = idx[np.argmax(vec)]  # the most foreground patch
        labels, _ = ndimage.label(part.reshape(h, w))
        lab = labels.reshape(-1)[seed]
        mask = labels == lab if lab > 0 else np.zeros((h, w), bool)
        if mask.sum() <= min_frac * h * w:
            break
        masks.append(mask)
        remaining &= ~mask.reshape(-1)
    return np.stack(masks) if masks else np.zeros((0, h, w), bool)


class MaskCut:
    """Instance masker: `image [H, W, 3] uint8 -> masks [M, H, W] bool` from a DINO extractor's keys."""

    def __init__(self, extractor, cfg: MasksConfig):
        self.extractor, self.cfg = extractor, cfg

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.batch(image[None])[0]

    def batch(self, images: np.ndarray) -> list[np.ndarray]:
        """`[N, H, W, 3]` uint8 -> N arrays `[M_i, H, W]` bool (one DINO pass for the batch)."""
        import torch
        import torch.nn.functional as F

        h, w = images.shape[1:3]
        s = self.cfg.maskcut_size
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        feats = self.extractor(x).cpu().numpy()  # [N, D, g, g]
        out = []
        for f in feats:
            m = maskcut(f, self.cfg.maskcut_n, self.cfg.maskcut_tau)
            if len(m) == 0:
                out.append(np.zeros((0, h, w), bool))
                continue
            up = F.interpolate(torch.from_numpy(m).float()[None], size=(h, w), mode="nearest")[0]
            out.append(up.numpy() > 0.5)
        return out


# ----------------------------------------------------------------------------------------------------------------
# CutLER (detectron2, optional)

CUTLER_HINT = ("masks.method 'cutler' needs detectron2, which is not on PyPI: build it from source "
               "(pip install 'git+https://github.com/facebookresearch/detectron2.git'), then "
               "`pip install -e .[cutler]` and set masks.cutler_weights to CutLER's cascade checkpoint; "
               "or use masks.method 'maskcut'")


class CutLER:
    """CutLER class-agnostic instances: cascade Mask R-CNN R50-FPN, score >= cutler_score, at most 100 per image,
    shortest side 800. Uses detectron2's model-zoo cascade config with one class-agnostic class; untested here
    (no detectron2 on this machine)."""

    def __init__(self, cfg: MasksConfig, device: str = "cpu"):
        try:
            from detectron2 import model_zoo
            from detectron2.config import get_cfg
            from detectron2.engine import DefaultPredictor
        except ImportError as e:
            raise RuntimeError(f"{CUTLER_HINT} ({e})") from None
        c = get_cfg()
        c.merge_from_file(model_zoo.get_config_file("Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml"))
        c.MODEL.ROI_HEADS.NUM_CLASSES = 1
        c.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = True
        c.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.cutler_score
        c.TEST.DETECTIONS_PER_IMAGE = 100
        c.INPUT.MIN_SIZE_TEST = 800
        c.MODEL.WEIGHTS = cutler_checkpoint(cfg.cutler_weights)
        c.MODEL.DEVICE = str(device)
        self.predictor = DefaultPredictor(c)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        inst = self.predictor(np.ascontiguousarray(image[:, :, ::-1]))["instances"]  # detectron2 wants BGR
        return inst.pred_masks.cpu().numpy().astype(bool)


def cutler_checkpoint(ref: str) -> str:
    """CutLER weights: a checkpoint file, or a folder / s3 prefix / hub id holding exactly one `.pth`/`.pkl`."""
    from pathlib import Path

    from .weights import ModelNotFoundError, resolve_model

    if not ref:
        raise ValueError("masks.cutler_weights: missing (path, folder or s3:// prefix of CutLER's checkpoint)")
    if Path(ref).expanduser().is_file():
        return str(Path(ref).expanduser())
    folder = Path(resolve_model(ref))
    found = sorted(p for p in folder.glob("*") if p.suffix in (".pth", ".pkl")) if folder.is_dir() else []
    if len(found) != 1:
        raise ModelNotFoundError(f"masks.cutler_weights {ref!r}: expected one .pth/.pkl checkpoint, found {found}")
    return str(found[0])


def build_instance_masker(recipe, device: str = "cpu"):
    """Instance masker for `recipe.masks.method`: MaskCut on the recipe's DINO extractor, CutLER, or None."""
    method = recipe.masks.method
    if method == "none":
        return None
    if method == "cutler":
        return CutLER(recipe.masks, device)
    if method != "maskcut":
        raise ValueError(f"masks.method: unknown method {method!r} (maskcut | cutler | none)")
    dino = next((e for e in recipe.extractors if e.type == "dino"), None)
    if dino is None:
        raise ValueError("masks.method 'maskcut' needs a DINO extractor (an extractors entry with type: dino); "
                         "add one or use masks.method 'none'")
    from .extractors import DinoExtractor

    return MaskCut(DinoExtractor.from_config(dino, device), recipe.masks)
