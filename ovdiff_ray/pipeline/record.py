"""The support set's record and signals on the device (issue 26): the classifier's view of each support image, the
T2S-style agreement filter, and the host copy the store keeps (`support.SupportData`).

    images [N, 3, H, W], fg/bg [N, H, W], instances [N, M, H, W] (device)
      -> classifier image embeddings [N, E]; agreement with the name's and the prompt's text embeddings [N]
      -> (prototypes.support_filter: clip) kept &= not an outlier below the class's agreement
      -> thumbnails [N, h, w, 3] uint8 and masks [N, h, w] at the stored size, on the host

One classifier pass over the class's images and one resize; the images never leave the device at full size unless
the recipe asks for `bank.support_record: full`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..recipe import Recipe
from ..support import DROP_EMPTY, DROP_FILTER, SupportData, agreement_filter


def stored_size(h: int, w: int, mode: str, side: int) -> tuple[int, int]:
    """(h, w) of a stored image: as generated for `full`, else the long side at most `side` (never upscaled)."""
    if mode == "full" or max(h, w) <= side:
        return h, w
    s = side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _resize_masks(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[..., H, W]` bool -> `[..., h, w]` bool, nearest."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    lead = m.shape[:-2]
    x = m.reshape(-1, 1, *m.shape[-2:]).float()
    return (F.interpolate(x, size=size, mode="nearest") > 0.5).reshape(*lead, *size)


@torch.no_grad()
def embed_images(classifier, images: torch.Tensor, size: int, batch: int = 64) -> np.ndarray:
    """`images [N, 3, H, W]` in [0, 1] -> `[N, E]` float32 unit norm, at the classifier's image size (as the
    pre-filter feeds it)."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(np.asarray(classifier.encode_image(x), np.float32))
    return np.concatenate(out)


def support_signals(recipe: Recipe, classifier, kind: str, name: str, prompt_text: np.ndarray, images: torch.Tensor,
                    fg: torch.Tensor, bg: torch.Tensor, instances: torch.Tensor | None, seeds: list[int],
                    ) -> tuple[torch.Tensor, SupportData | None]:
    """-> (kept `[N]` bool on the device after the agreement filter, the record to store or None for
    `bank.support_record: none`). `prompt_text [E]`: the class text embedding (of the prompt words) in the shard."""
    mode, pf = recipe.bank.support_record, recipe.prototypes
    nonempty = fg.flatten(1).any(1)
    filtering = pf.support_filter == "clip" and kind == "thing"  # as the pre-filter: things only
    if mode == "none" and not filtering:
        return nonempty, None
    emb = embed_images(classifier, images, recipe.classifier.image_size)
    prompt_agree = emb @ np.asarray(prompt_text, np.float32)
    kept_np = nonempty.cpu().numpy()
    if filtering:
        kept_np = agreement_filter(prompt_agree, kept_np, pf.support_filter_mads, pf.support_filter_keep)
    kept = torch.from_numpy(kept_np).to(nonempty.device)
    if mode == "none":
        return kept, None
    name_text = np.asarray(classifier.encode_text([recipe.classifier.text_template.format(name=name)])[0],
                           np.float32)
    h, w = images.shape[-2:]
    size = stored_size(h, w, mode, recipe.bank.thumbnail_size)
    x = images if (h, w) == size else F.interpolate(images.float(), size=size, mode="bilinear",
                                                    align_corners=False, antialias=True)
    host = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    inst = None
    n_inst = np.zeros(len(seeds), np.float32)
    if instances is not None:
        nz = instances.flatten(2).any(2)  # [N, M]
        n_inst = nz.sum(1).float().cpu().numpy()
        inst = _resize_masks(instances.bool(), size).cpu().numpy()
    area = float(h * w)
    signals = {
        "name_agreement": (emb @ name_text).astype(np.float32),
        "prompt_agreement": prompt_agree.astype(np.float32),
        "fg_coverage": (fg.flatten(1).sum(1).float() / area).cpu().numpy().astype(np.float32),
        "bg_coverage": (bg.flatten(1).sum(1).float() / area).cpu().numpy().astype(np.float32),
        "n_instances": n_inst.astype(np.float32),
    }
    ne = nonempty.cpu().numpy()
    dropped = ["" if k else (DROP_EMPTY if not e else DROP_FILTER) for k, e in zip(kept_np, ne)]
    return kept, SupportData(host, _resize_masks(fg.bool(), size).cpu().numpy(),
                             _resize_masks(bg.bool(), size).cpu().numpy(), inst, [int(s) for s in seeds], kept_np,
                             dropped, (int(h), int(w)), signals, emb, name_text,
                             np.asarray(prompt_text, np.float32), mode)
