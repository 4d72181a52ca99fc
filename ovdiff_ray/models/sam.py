"""SAM automatic masks through transformers (`SamModel` + `SamProcessor` in the `mask-generation` pipeline).

The model reference goes through the project's weights resolver (weights.py): a hub id (`facebook/sam-vit-base`),
a local folder, an `s3://` prefix, or `tiny:sam` (a tiny random SAM built by tiny.py; with random weights set both
thresholds to 0, or every mask is filtered out). One mask-generation pass per image, on the GPU when there is one.
Models are shared per (reference, device) within a process, so several banks' segmenters load SAM once.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from ..recipe import SamRegionsConfig
from .weights import ModelLoadError, quiet_loading, resolve_model

_CACHE: dict[tuple[str, str], tuple] = {}
_LOCK = threading.Lock()


def load_sam(ref: str, device: str = "cpu"):
    """`(SamModel, SamProcessor)` for a model reference, loaded once per (reference, device) in this process."""
    key = (ref, str(device))
    with _LOCK:
        if key not in _CACHE:
            from transformers import SamModel, SamProcessor

            path = resolve_model(ref)
            try:
                with quiet_loading():
                    processor = SamProcessor.from_pretrained(path)
                    model = SamModel.from_pretrained(path).to(device).eval()
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"SAM model {ref!r}: cannot load it ({e.__class__.__name__}: {e})") from None
            _CACHE[key] = (model, processor)
        return _CACHE[key]


def _pipeline_class():
    from transformers import MaskGenerationPipeline

    class SingleOrMultiMaskPipeline(MaskGenerationPipeline):
        """The mask-generation pipeline with SAM's `multimask_output` chosen by the recipe (the pipeline itself
        always asks for three masks per point; CorrCLIP uses one)."""

        multimask_output = True

        def preprocess(self, image, *args, **kwargs):
            for batch in super().preprocess(image, *args, **kwargs):
                yield {**batch, "multimask_output": self.multimask_output}

    return SingleOrMultiMaskPipeline


class SamMaskGenerator:
    """`image [H, W, 3] uint8` -> masks `[M, H, W]` bool from a `points_per_side`^2 grid of point prompts, filtered
    by predicted IoU and stability and de-duplicated by box NMS (the recipe's `segmentation.sam`)."""

    def __init__(self, cfg: SamRegionsConfig, device: str = "cpu"):
        self.cfg = cfg
        model, processor = load_sam(cfg.model, device)
        cls = _pipeline_class()
        with quiet_loading():
            self.pipe = cls(model=model, image_processor=processor.image_processor, device=torch.device(device))
        self.pipe.multimask_output = cfg.multimask_output

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = image.shape[:2]
        c = self.cfg
        out = self.pipe(Image.fromarray(np.ascontiguousarray(image, np.uint8)), points_per_crop=c.points_per_side,
                        points_per_batch=c.points_per_batch, pred_iou_thresh=c.pred_iou_thresh,
                        stability_score_thresh=c.stability_score_thresh, crops_nms_thresh=c.crops_nms_thresh)
        masks = [np.asarray(m, bool) for m in out["masks"]]
        return np.stack(masks) if masks else np.zeros((0, h, w), bool)
