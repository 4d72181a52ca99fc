"""Which parts of the segmentation method run: the recipe's `segmentation` switches plus ablation names.

Ablations (recipe `segmentation.*` or the `ablate` argument of `Segmenter.segment`): `no_background`,
`no_prefilter`, `no_stuff_filter`, `class_mean_only`, `no_regions`, `only:<extractor>`; and for the switches beyond
the paper (off in paper.yaml): issue 10's `no_stuff_filter_self`, `no_stuff_presence`, `no_bounded_search`, and
issue 23's `no_stuff_opening`, `no_background_presence` (precedence.py), issue 27's `no_thing_proposals`
(proposals.py) and `no_background_margin` (precedence.py).

`SegmentError` lives here (re-exported by segment.py) so that a bad ablation name is the segmenter's error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ABLATIONS = ("no_background", "no_prefilter", "no_stuff_filter", "class_mean_only", "no_regions",
             # issue 10's switches (ovdiff_ray/prefilter.py, ovdiff_ray/matching.py): each turns one off
             "no_stuff_filter_self", "no_stuff_presence", "no_bounded_search",
             # issue 23's (ovdiff_ray/precedence.py)
             "no_stuff_opening", "no_background_presence",
             # issue 27's (ovdiff_ray/proposals.py; the margin: ovdiff_ray/precedence.py)
             "no_thing_proposals", "no_background_margin")


class SegmentError(ValueError):
    """Bad input to the segmenter (unknown or empty classes, unreadable image, unknown ablation)."""


@dataclass(frozen=True)
class Switches:
    """Which parts of the method run (the paper's ablations, then the switches of issues 10 and 23, each
    `no_<name>`)."""

    background: bool = True
    prefilter: bool = True
    stuff_filter: bool = True
    class_mean_only: bool = False
    only: str | None = None
    stuff_filter_self: bool = False  # segmentation.stuff_filter_rule == "self"
    stuff_presence: bool = False  # segmentation.stuff_min_area > 0
    bounded_search: bool = False  # segmentation.subset_search != "exhaustive"
    regions: bool = True  # snap to the recipe's (or the request's) regions; `no_regions` turns it off
    stuff_opening: bool = False  # segmentation.stuff_opening > 0
    background_presence: bool = False  # segmentation.background_min_area > 0
    thing_proposals: bool = False  # segmentation.thing_proposals > 0
    background_margin: bool = False  # segmentation.background_margin > 0

    @classmethod
    def of(cls, seg, ablate: Sequence[str], extractors: Sequence[str]) -> "Switches":
        """From the recipe's `segmentation` section plus ablation names."""
        s = dict(background=seg.background, prefilter=seg.prefilter, stuff_filter=seg.stuff_filter,
                 class_mean_only=seg.class_mean_only, only=None, stuff_filter_self=seg.stuff_filter_rule == "self",
                 stuff_presence=seg.stuff_min_area > 0,
                 bounded_search=seg.subset_search != "exhaustive", stuff_opening=seg.stuff_opening > 0,
                 background_presence=seg.background_min_area > 0, thing_proposals=seg.thing_proposals > 0,
                 background_margin=seg.background_margin > 0)
        for a in ablate:
            if a.startswith("only:"):
                name = a[5:]
                if name not in extractors:
                    raise SegmentError(f"ablation {a!r}: unknown extractor {name!r} (bank has: {', '.join(extractors)})")
                s["only"] = name
            elif a in ABLATIONS:
                key = a[3:] if a.startswith("no_") else a
                s[key] = not a.startswith("no_")
            else:
                raise SegmentError(f"unknown ablation {a!r} (known: {', '.join(ABLATIONS)}, only:<extractor>)")
        return cls(**s)
