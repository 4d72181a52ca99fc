"""Who keeps a contested pixel at large vocabularies (issue 23; recipe `segmentation.*`, off in paper.yaml).

Two rules on the whole-image view the stuff presence check already scores (`[K + 1, h, w]`, row 0 = background,
then the kept classes in order), each a switch with an ablation name:

- `stuff_opening` (> 0; ablation `no_stuff_opening`): a stuff class's won pixels count towards
  `stuff_min_area` only after a morphological opening with a square of radius `stuff_opening` x the short side. A
  thin thing (a ring, a cross; a bicycle frame on grass) looks like stuff of its own colour in every pixel: its
  features mix its edges with what lies around it, and a texture of its colour explains them about as well as its
  own prototypes. With every stuff class of the world in the vocabulary, that stuff class then "wins" the thing's
  pixels in the whole view, passes the presence check although the image holds none of it, and takes the thing.
  An opening removes won areas narrower than the square; a stuff region keeps its area.
- `background_min_area` (> 0; ablation `no_background_presence`): background is matched in an image only when it
  wins at least this share of the whole-image view. Background prototypes are other classes' surroundings; when
  the vocabulary names the stuff an image is made of, they are that stuff under another name and win scattered
  pixels where the named stuff's own prototypes are a hair behind (a floor or a wall labelled "background" although
  the vocabulary names it). An image whose background is real loses it to no named class over a region of it.
- `background_margin` (> 0, with `background_min_area`; ablation `no_background_margin`; issue 27): a background
  pixel counts towards `background_min_area` only when background leads the best named class there by at least
  this much (scores of the whole view, clamped at 0). Background prototypes that are a named stuff class under
  another name lead it by a hair (cosine 0.98-0.999 to the stuff's own); a region no named class explains is
  led by a clear margin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def opened_shares(win: torch.Tensor, n: int, radius: int) -> torch.Tensor:
    """`win [h, w]` int64 winning row per pixel (0..n-1) -> `[n]` float32 share of all pixels each row wins after a
    morphological opening of its won mask with a `(2 * radius + 1)` square (erosion then dilation, the image border
    counting as outside neither). `radius` <= 0: the plain shares."""
    if radius <= 0:
        return torch.bincount(win.flatten(), minlength=n).float() / win.numel()
    k = 2 * radius + 1
    masks = F.one_hot(win, n).permute(2, 0, 1)[None].float()  # [1, n, h, w]
    eroded = -F.max_pool2d(-masks, k, stride=1, padding=radius)  # -inf padding: the border does not erode
    opened = F.max_pool2d(eroded, k, stride=1, padding=radius) * masks
    return opened[0].flatten(1).sum(1) / win.numel()


def background_present(scores: torch.Tensor, min_area: float, margin: float = 0.0) -> bool:
    """`scores [K + 1, h, w]` of the whole-image view -> whether background (row 0) wins at least `min_area` of the
    pixels (argmax of the scores clamped at 0, ties to background, as the final labels); with `margin` > 0 a pixel
    counts only where background leads the best other row by at least `margin`."""
    s = scores.clamp_min(0)
    if margin > 0:
        won = s[0] - s[1:].max(0).values >= margin if len(s) > 1 else torch.ones_like(s[0], dtype=torch.bool)
    else:
        won = s.argmax(0) == 0
    return float(won.float().mean()) >= min_area
