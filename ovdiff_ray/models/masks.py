"""Attribution + instance masks -> foreground/background masks (OVDIFF.md section 3).

`fg_bg_masks` is the ranking / complement / erosion / fallback rule; instance maskers (MaskCut on DINO keys,
CutLER through detectron2) produce its candidates.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from scipy import ndimage

from ..recipe import MasksConfig

CROSS = ndimage.generate_binary_structure(2, 1)  # 3x3 cross


def fg_bg_masks(attribution: np.ndarray, instances: np.ndarray | None, cfg: MasksConfig) -> tuple[np.ndarray, np.ndarray]:
    """attribution: [H, W] in [0, 1]; instances: [M, H, W] bool or None -> (fg [H, W] bool, bg [H, W] bool).

    Candidates are the instance masks plus their complement; each is weighted by its mean attribution and each pixel
    goes to the covering candidate of highest weight. Foreground = pixels won by the best candidate; background =
    pixels won by the lowest-weight candidate that wins any (as the authors' code), with attribution <
    bg_threshold, eroded `erode` times. No instance masks: thresholds, not eroded (as the authors' code).
    """
    attr = np.asarray(attribution, np.float32)
    low = attr < cfg.bg_threshold
    inst = None if instances is None else np.asarray(instances, bool)
    if inst is not None:
        inst = inst[inst.reshape(len(inst), -1).any(1)] if len(inst) else inst
    if inst is None or len(inst) == 0:
        return attr > cfg.fg_threshold, low & ~(attr > cfg.fg_threshold)
    comp = ~inst.any(0)
    cands = np.concatenate([inst, comp[None]]) if comp.any() else inst  # [K, H, W]
    weights = np.array([attr[c].mean() for c in cands], np.float32)  # [K]
    # each pixel -> covering candidate of highest weight (ties: the first)
    w = np.where(cands, weights[:, None, None], -np.inf)
    winner = w.argmax(0)  # [H, W]
    best = int(weights.argmax())
    winners = np.unique(winner)
    worst = int(winners[np.argmin(weights[winners])])  # lowest weight among the candidates that win pixels
    fg = winner == best
    bg = (winner == worst) & low if worst != best else np.zeros_like(fg)
    if cfg.erode > 0 and bg.any():
        # the image border does not erode (border_value=1), as skimage.morphology.binary_erosion in the authors code
        bg = ndimage.binary_erosion(bg, structure=CROSS, iterations=cfg.erode, border_value=1)
    return fg, bg & ~fg


# ----------------------------------------------------------------------------------------------------------------
# MaskCut: normalised cuts on DINO keys (CutLER's training-free pseudo-masks, Wang et al. 2023)


def ncut_bipartition(feats: np.ndarray, tau: float, eps: float = 1e-5) -> np.ndarray:
    """feats `[N, D]` -> second smallest generalised eigenvector `[N]` of `(D - A) x = l D x` for the thresholded
    cosine affinity graph A (MaskCut's `eigh(D - A, D)`), D-normalised (x' D x = 1). An eigenvector's sign is
    arbitrary and MaskCut's corner / salient-patch rule is not symmetric in it, so the sign is fixed: the entry of
    largest magnitude (the most salient patch) is positive.

    Solved as the symmetric normalised problem: with N = D^-1/2 A D^-1/2, x = D^-1/2 y for the eigenvector y of
    N's second largest eigenvalue (Lanczos on N; a dense solve when it does not converge). The same vector as the
    generalised solve at a fraction of its cost (60 x 60 patches: ~1 s instead of ~70 s on 2 CPU cores).
    """
    from scipy.linalg import eigh
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    f = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(min=1e-8)
    a = np.where(f @ f.T > tau, 1.0, eps)
    d = a.sum(1)
    r = 1.0 / np.sqrt(d)
    n = a * r[:, None] * r[None, :]
    if len(n) <= 64:
        y = eigh(n, subset_by_index=[len(n) - 2, len(n) - 2])[1][:, 0]
    else:
        try:
            v0 = np.random.default_rng(0).uniform(0.5, 1.5, len(n))
            vals, vecs = eigsh(n, k=2, which="LA", v0=v0, tol=1e-10, maxiter=20 * len(n))
            y = vecs[:, int(np.argmin(vals))]
        except ArpackNoConvergence:
            y = eigh(n, subset_by_index=[len(n) - 2, len(n) - 2])[1][:, 0]
    x = y * r
    return x if x[np.argmax(np.abs(x))] >= 0 else -x


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




from ..densecrf import crf_refine, require_crf  # noqa: E402,F401 (re-exported: MaskCut's CRF lives there)


class MaskCut:
    """Instance masker: `image [H, W, 3] uint8 -> masks [M, H, W] bool` from a DINO extractor's keys, at
    `maskcut_size` (MaskCut's own: 480, 60x60 patches at stride 8), with MaskCut's dense CRF when `maskcut_crf`."""

    def __init__(self, extractor, cfg: MasksConfig):
        self.extractor, self.cfg = extractor, cfg
        if cfg.maskcut_crf:
            require_crf()

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
        small = (x * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy() if self.cfg.maskcut_crf else None
        out = []
        for j, f in enumerate(feats):
            m = maskcut(f, self.cfg.maskcut_n, self.cfg.maskcut_tau)
            if len(m) and small is not None:  # CRF at MaskCut's image size, as MaskCut does
                m_up = F.interpolate(torch.from_numpy(m).float()[None], size=(s, s), mode="nearest")[0].numpy() > 0.5
                kept = [r for r in (crf_refine(small[j], mi) for mi in m_up) if r is not None]
                m = np.stack(kept) if kept else np.zeros((0, s, s), bool)
            if len(m) == 0:
                out.append(np.zeros((0, h, w), bool))
                continue
            up = F.interpolate(torch.from_numpy(m).float()[None], size=(h, w), mode="nearest")[0]
            out.append(up.numpy() > 0.5)
        return out


# ----------------------------------------------------------------------------------------------------------------
# CutLER (detectron2 + CutLER's own code, optional)

CUTLER_CODE_ENV = "OVDIFF_CUTLER_CODE"
CUTLER_CONFIG_FILE = "model_zoo/configs/CutLER-ImageNet/cascade_mask_rcnn_R_50_FPN.yaml"  # inside CutLER's `cutler`
# What CutLER's checkpoint was trained with (its config above); a merged config that differs would give garbage masks.
CUTLER_EXPECTED = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.ROI_HEADS.NAME": "CustomCascadeROIHeads",
    "MODEL.ROI_HEADS.NUM_CLASSES": 1,
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": True,
    "MODEL.MASK_ON": True,
}
CUTLER_HINT = ("masks.method 'cutler' needs detectron2 and CutLER's own code, neither on PyPI: build detectron2 from "
               "source (pip install 'git+https://github.com/facebookresearch/detectron2.git') and `pip install -e .[cutler]`, "
               "set OVDIFF_CUTLER_CODE to "
               "the `cutler` folder of a checkout of https://github.com/facebookresearch/CutLER (CutLER's config and "
               "its CustomCascadeROIHeads), set masks.cutler_weights to CutLER's cascade checkpoint "
               "(cutler_cascade_final.pth); or use masks.method 'maskcut'")


def cutler_overrides(cfg: MasksConfig, device: str, distributed: bool = False) -> dict:
    """Test-time values set on top of CutLER's config, as the authors' `utils/cutler.py` does.

    SyncBN (CutLER trains with it in the ResNet and the FPN) becomes BN in a single process: the same running
    statistics at inference, and SyncBN does not run on a CPU.
    """
    out = {"MODEL.DEVICE": str(device), "MODEL.ROI_HEADS.SCORE_THRESH_TEST": float(cfg.cutler_score),
           "MODEL.RETINANET.SCORE_THRESH_TEST": float(cfg.cutler_score), "TEST.DETECTIONS_PER_IMAGE": 100,
           "INPUT.MIN_SIZE_TEST": 800, "INPUT.MAX_SIZE_TEST": 1333}
    if str(device).startswith("cpu") or not distributed:
        out.update({"MODEL.RESNETS.NORM": "BN", "MODEL.FPN.NORM": "BN"})
    return out


def check_cutler_config(get) -> None:
    """`get(dotted key) -> value` of a merged detectron2 config; raises naming each value that differs from
    CutLER's (BGR input, Caffe pixel statistics, stride in the 1x1 conv, the model zoo's ROI heads)."""
    bad = []
    for key, want in CUTLER_EXPECTED.items():
        have = get(key)
        have = list(have) if isinstance(have, (tuple, list)) else have
        if (have != want) if not isinstance(want, list) else not np.allclose(have, want):
            bad.append(f"{key} = {have!r} (CutLER: {want!r})")
    if bad:
        raise ValueError("the detectron2 config is not CutLER's: " + "; ".join(bad))


def cutler_inputs(image: np.ndarray, min_size: int = 800, max_size: int = 1333) -> dict:
    """`image [H, W, 3]` uint8 RGB -> one detectron2 model input: `image [3, h, w]` float RGB in 0..255 resized so the
    short side is `min_size` (the long side at most `max_size`), and the original `height`, `width` (masks come back
    at that size)."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape[:2]
    s = min(min_size / min(h, w), max_size / max(h, w))
    size = (max(1, round(h * s)), max(1, round(w * s)))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()  # RGB, as CutLER's INPUT.FORMAT
    if size != (h, w):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=s < 1)[0]
    return {"image": x, "height": h, "width": w}


class CutLER:
    """CutLER class-agnostic instances, built as CutLER builds it: its own config file and cascade ROI heads
    (the `cutler` folder of CutLER's repository, named by $OVDIFF_CUTLER_CODE), RGB input with ImageNet statistics, score >= cutler_score, at most 100 per image,
    shortest side 800. Refuses with what is missing when detectron2 or CutLER's code is not importable."""

    def __init__(self, cfg: MasksConfig, device: str = "cpu"):
        import torch

        code = cutler_code_dir()
        missing = []
        try:
            from detectron2.checkpoint import DetectionCheckpointer
            from detectron2.config import get_cfg
        except ImportError as e:
            missing.append(f"detectron2 ({e})")
        if code is None:
            missing.append(f"CutLER's code (set {CUTLER_CODE_ENV} to the `cutler` folder of a CutLER checkout)")
        if missing:
            raise RuntimeError(f"{CUTLER_HINT}. Missing: {'; '.join(missing)}") from None
        if str(code) not in sys.path:
            sys.path.insert(0, str(code))  # CutLER's own modules import each other as top-level `config`, `modeling`
        try:
            from config.cutler_config import add_cutler_config
            from modeling import build_model  # CutLER's registry: GeneralizedRCNN + CustomCascadeROIHeads
        except ImportError as e:
            raise RuntimeError(f"{CUTLER_HINT}. {CUTLER_CODE_ENV}={code}: cannot import CutLER's code ({e})") from None
        c = get_cfg()
        add_cutler_config(c)
        c.merge_from_file(str(code / CUTLER_CONFIG_FILE))
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        for k, v in cutler_overrides(cfg, device, dist).items():
            c.merge_from_list([k, v])
        c.MODEL.WEIGHTS = cutler_checkpoint(cfg.cutler_weights)
        check_cutler_config(lambda key: _cfg_get(c, key))
        c.freeze()
        self.cfg = c
        self.model = build_model(c).eval()
        DetectionCheckpointer(self.model).load(c.MODEL.WEIGHTS)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            inp = cutler_inputs(image, self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST)
            inst = self.model([inp])[0]["instances"]
        return inst.pred_masks.cpu().numpy().astype(bool)


def cutler_code_dir():
    """CutLER's `cutler` folder (holding `config/`, `modeling/`, `model_zoo/`) from $OVDIFF_CUTLER_CODE, or None."""
    from pathlib import Path

    ref = os.environ.get(CUTLER_CODE_ENV, "")
    if not ref:
        return None
    p = Path(ref).expanduser().resolve()
    return p if (p / CUTLER_CONFIG_FILE).is_file() else None


def _cfg_get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


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
