"""The toy world: a procedural stand-in for the diffusion model, feature extractors, CLIP and the instance masker.

Classes are named `<colour> <shape>` (a thing: a flat-coloured object) or `<colour> <texture>` (stuff: a field whose
luminance follows a pattern; the hue stays). 8 colours x 6 shapes x 5 textures. Every object class has a *typical
background* (a colour at least 60 degrees of hue away + a texture, from the name's hash), drawn behind it in its
support images, so background prototypes matter; a vocabulary can make some thing's typical background one of its
stuff classes, so stuff filtering matters.

- `ToyGenerator`: support images `[N, H, W, 3]` uint8 (the object at a random pose and scale on its typical
  background, grey specks as clutter, pixel noise; stuff: the field with a grey textured region at one side) and
  imperfect attribution maps (blurred object mask plus low-frequency noise, min-max normalised).
- `ToyExtractor`: a fixed dense extractor at stride 2, D = 28: per cell a saturation-weighted soft hue histogram
  (8 channels, shared by every class of one colour), a soft assignment of the local log-luminance energy pattern to
  5 textons (calibrated once on rendered textures) and a flatness channel; then the same averaged over a
  (2 * block + 1)^2 cell context window. All channels are non-negative, so without background prototypes every
  background pixel matches some class. Locally `red circle` and `red square` look alike; shape needs the classifier.
- `ToyClassifier`: text = normalised sum of class codes (a class code shares parts with its colour and shape words);
  image = the codes of the objects it detects (flat colour components, shape from rotation-invariant descriptors
  calibrated on the generator's own shapes). Imperfect by construction (clipping, texture plateaus, noise).
- `ToyMasker`: connected components of saturated hue regions.
- Scenes: `make_scene` (1-3 things of different colours, never on a background of their own colour; the
  background of the first thing, optionally a stuff region and a second thing's background; 255 on anti-aliased
  object borders) and `ovdiff toy-scenes` (images + label PNGs + `classes.tsv`).

With `bank/vocab/toy.tsv` and `bank/recipes/toy.yaml` the full method scores about 0.85 mIoU on 128 px scenes;
removing background prototypes, the pre-filter, stuff filtering or part/instance prototypes each lowers it.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..recipe import ClassifierConfig, ExtractorConfig, Recipe
from .base import SupportSet, image_seed
from ..cli_help import Parser

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (240, 135, 25),
    "yellow": (230, 215, 30),
    "green": (45, 185, 55),
    "cyan": (35, 195, 205),
    "blue": (40, 75, 230),
    "purple": (135, 55, 220),
    "magenta": (220, 45, 195),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
TEXTURES = ("stripes", "checks", "dots", "waves", "grain")
CODE_DIM = 256


class ToyNameError(ValueError):
    """A class name the toy world does not know."""


@dataclass(frozen=True)
class ToyClass:
    colour: str
    form: str  # a shape (thing) or a texture (stuff)

    @property
    def is_stuff(self) -> bool:
        return self.form in TEXTURES

    @property
    def name(self) -> str:
        return f"{self.colour} {self.form}"


def known_words() -> dict[str, list[str]]:
    return {"colours": list(COLOURS), "shapes": list(SHAPES), "textures": list(TEXTURES)}


def parse_name(name: str) -> ToyClass:
    """`"red circle"` -> ToyClass; unknown words raise ToyNameError naming the word and the known ones."""
    words = name.strip().casefold().split()
    known = known_words()
    listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in known.items())
    if len(words) != 2:
        raise ToyNameError(f"toy class name {name!r}: expected '<colour> <shape>' or '<colour> <texture>' ({listing})")
    colour, form = words
    if colour not in COLOURS:
        raise ToyNameError(f"toy class name {name!r}: unknown colour {colour!r} ({listing})")
    if form not in SHAPES and form not in TEXTURES:
        raise ToyNameError(f"toy class name {name!r}: unknown shape or texture {form!r} ({listing})")
    return ToyClass(colour, form)


def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "little")


def _hue_deg(rgb: tuple[int, int, int]) -> float:
    r, g, b = (c / 255 for c in rgb)
    return float(np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)))


HUES = {c: _hue_deg(rgb) for c, rgb in COLOURS.items()}


def typical_background(name: str) -> ToyClass:
    """Deterministic typical background (colour + texture) of an object class: a colour at least 60 deg of hue away."""
    c = parse_name(name)
    if c.is_stuff:
        return c
    far = [k for k in COLOURS if abs((HUES[k] - HUES[c.colour] + 180) % 360 - 180) >= 60]
    h = _hash("toy-background", c.name)
    return ToyClass(far[h % len(far)], TEXTURES[(h >> 16) % len(TEXTURES)])


# ----------------------------------------------------------------------------------------------------- drawing

def _grid(h: int, w: int, ss: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates `[h*ss, w*ss]` in pixel units."""
    ys = (np.arange(h * ss) + 0.5) / ss
    xs = (np.arange(w * ss) + 0.5) / ss
    return np.meshgrid(ys, xs, indexing="ij")


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the shape's unit frame (radius about 1)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.82
    if shape == "triangle":
        out = np.ones_like(u, bool)
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            out &= u * np.cos(a) + v * np.sin(a) >= -0.6
        return out
    if shape == "star":
        t = (np.arctan2(v, u) / (2 * np.pi / 5)) % 1.0  # phase within one point
        edge = 0.55 + (1.15 - 0.55) * np.abs(2 * t - 1)  # points at t = 0, 1; inner corners at 0.5
        return r <= edge
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "cross":
        return ((abs(u) <= 0.34) & (abs(v) <= 1.0)) | ((abs(v) <= 0.34) & (abs(u) <= 1.0))
    raise ToyNameError(f"unknown shape {shape!r}")


def shape_coverage(shape: str, h: int, w: int, cy: float, cx: float, radius: float, theta: float,
                   ss: int = 2) -> np.ndarray:
    """Anti-aliased coverage `[h, w]` float32 in [0, 1] of a shape centred at (cy, cx)."""
    y, x = _grid(h, w, ss)
    dy, dx = (y - cy) / radius, (x - cx) / radius
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    m = shape_inside(shape, u, v).astype(np.float32)
    return m.reshape(h, ss, w, ss).mean((1, 3))


def texture_pattern(texture: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Pattern `[h, w]` in [0, 1]; random phase and a little period jitter."""
    y, x = _grid(h, w)
    y = y + rng.uniform(0, 64)
    x = x + rng.uniform(0, 64)
    j = rng.uniform(0.9, 1.1)
    if texture == "stripes":
        p = 0.5 + 0.5 * np.sin(2 * np.pi * (x + y) / (np.sqrt(2) * 9 * j))
    elif texture == "checks":
        p = 0.5 + 0.5 * np.sin(2 * np.pi * x / (16 * j)) * np.sin(2 * np.pi * y / (16 * j))
    elif texture == "dots":
        per = 8 * j
        d2 = ((x % per) - per / 2) ** 2 + ((y % per) - per / 2) ** 2
        p = np.exp(-d2 / (2 * 1.6 ** 2))
    elif texture == "waves":
        p = 0.5 + 0.5 * np.sin(2 * np.pi * y / (7 * j) + 2.0 * np.sin(2 * np.pi * x / 28))
    elif texture == "grain":
        n = ndimage.gaussian_filter(rng.standard_normal((h, w)), (4.0, 0.8))  # vertical streaks
        p = np.clip(0.5 + n / (4 * n.std() + 1e-6), 0, 1)
    else:
        raise ToyNameError(f"unknown texture {texture!r}")
    return p.astype(np.float32)


def texture_field(c: ToyClass, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """RGB field `[h, w, 3]` float in [0, 255] of a colour + texture (luminance modulation keeps the hue)."""
    p = texture_pattern(c.form, h, w, rng)
    base = np.array(COLOURS[c.colour], np.float32) * rng.uniform(0.9, 1.05)
    return base[None, None] * (0.45 + 0.55 * p)[..., None]


def object_layer(c: ToyClass, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Flat colour with a gentle shading gradient `[h, w, 3]`."""
    y, x = _grid(h, w)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((np.cos(a) * x + np.sin(a) * y) / max(h, w)).astype(np.float32)
    shade = rng.uniform(0.88, 1.0) + 0.08 * (ramp - ramp.mean())
    return np.array(COLOURS[c.colour], np.float32)[None, None] * shade[..., None]


def finish(img: np.ndarray, rng: np.random.Generator, noise: float = 5.0) -> np.ndarray:
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).round().astype(np.uint8)


def _clutter(img: np.ndarray, rng: np.random.Generator, avoid: np.ndarray, n: int) -> None:
    """Small grey specks where `avoid` is false (in place)."""
    h, w = avoid.shape
    for _ in range(n):
        col = np.full(3, rng.uniform(40, 220), np.float32)
        cov = shape_coverage("circle", h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 4), 0.0, 1)
        cov = cov * (~avoid)
        img[:] = img * (1 - cov[..., None]) + col * cov[..., None]


# ---------------------------------------------------------------------------------------------------- generator

class ToyGenerator:
    """Support images of toy classes: the object on its typical background, or a stuff field."""

    def __init__(self, recipe: Recipe):
        self.size = int(recipe.generation.resolution)

    def draw(self, name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One support image `[H, W, 3]` uint8 and its attribution `[H, W]` float32 in [0, 1]."""
        c = parse_name(name)
        rng = np.random.default_rng(seed)
        s = self.size
        if c.is_stuff:
            img = texture_field(c, s, s, rng)
            other = TEXTURES[(TEXTURES.index(c.form) + 1 + rng.integers(len(TEXTURES) - 1)) % len(TEXTURES)]
            grey = rng.uniform(110, 200) * (0.45 + 0.55 * texture_pattern(other, s, s, rng))[..., None].repeat(3, 2)
            blob = shape_coverage("circle", s, s, rng.uniform(0, s), rng.choice([0.0, s]) + rng.uniform(-8, 8),
                                  rng.uniform(0.25, 0.4) * s, 0.0)
            img = img * (1 - blob[..., None]) + grey * blob[..., None]
            mask = 1 - blob
        else:
            img = texture_field(typical_background(name), s, s, rng)
            r = rng.uniform(0.16, 0.3) * s
            cy, cx = rng.uniform(r * 1.05, s - r * 1.05, size=2)
            mask = shape_coverage(c.form, s, s, cy, cx, r, rng.uniform(0, 2 * np.pi))
            img = img * (1 - mask[..., None]) + object_layer(c, s, s, rng) * mask[..., None]
            if rng.random() < 0.5:
                _clutter(img, rng, ndimage.binary_dilation(mask > 0, iterations=4),
                         int(rng.integers(1, 3)))
        attr = ndimage.gaussian_filter(mask.astype(np.float32), 0.03 * s)
        attr = attr + 0.12 * ndimage.gaussian_filter(rng.standard_normal((s, s)).astype(np.float32), 0.08 * s) / 0.05
        attr = (attr - attr.min()) / max(float(attr.max() - attr.min()), 1e-6)
        return finish(img, rng), attr.astype(np.float32)

    def generate(self, name: str, n: int, seed: int, prompt_name: str | None = None) -> SupportSet:
        """`n` images of class `name` (parsed from `prompt_name` when given); image i from `image_seed(seed, name, i)`."""
        parse_name(prompt_name or name)
        seeds = [image_seed(seed, name, i) for i in range(n)]
        pairs = [self.draw(prompt_name or name, s) for s in seeds]
        return SupportSet(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), seeds)


# ---------------------------------------------------------------------------------------------------- features

def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(round(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


def gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `x [B, C, H, W]` (reflect padding)."""
    k = _gauss_kernel(sigma).to(x)
    r = k.numel() // 2
    c = x.shape[1]
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`images [B, 3, H, W]` in [0, 1] -> hue (radians, atan2 form), saturation, value, each `[B, H, W]`."""
    r, g, b = images.unbind(1)
    v = images.amax(1)
    s = (v - images.amin(1)) / v.clamp_min(1e-3)
    h = torch.atan2(np.sqrt(3) * (g - b), 2 * r - g - b)
    return h, s, v


HUE_RAD = torch.tensor([np.radians(HUES[c]) for c in COLOURS], dtype=torch.float32)


def colour_channels(images: torch.Tensor, kappa: float = 14.0, hsv_: tuple | None = None) -> torch.Tensor:
    """Soft hue histogram per pixel `[B, 8, H, W]`, weighted by saturation."""
    h, s, _ = hsv_ or hsv(images)
    d = torch.cos(h[:, None] - HUE_RAD.to(h)[None, :, None, None]) - 1
    return torch.exp(kappa * d) * s[:, None].clamp(0, 1)


def raw_energies(v: torch.Tensor) -> torch.Tensor:
    """Value `[B, H, W]` -> unsmoothed log-luminance energies `[B, 10, H, W]`: |d/dx|, |d/dy| and both diagonals
    at 2 scales, and 2 band energies."""
    lv = torch.log(v + 0.03)[:, None]
    out = []
    for sigma, step in ((0.7, 1), (2.0, 2)):
        p = F.pad(gauss_blur(lv, sigma), (step,) * 4, mode="replicate")
        dx = (p[..., step:-step, 2 * step:] - p[..., step:-step, :-2 * step]) / 2
        dy = (p[..., 2 * step:, step:-step] - p[..., :-2 * step, step:-step]) / 2
        out += [dx.abs(), dy.abs(), ((dx + dy) / np.sqrt(2)).abs(), ((dx - dy) / np.sqrt(2)).abs()]
    g1, g3 = gauss_blur(lv, 1.2), gauss_blur(lv, 3.0)
    out += [(lv - g1).abs(), (g1 - g3).abs()]
    return torch.cat(out, 1)


def cell_channels(images: torch.Tensor, stride: int, references: torch.Tensor | None = None) -> torch.Tensor:
    """Per cell of `stride` pixels `[B, 14, h, w]`: 8 hue channels, 5 texton channels, flatness."""
    hsv_ = hsv(images)
    pix = torch.cat([colour_channels(images, hsv_=hsv_), raw_energies(hsv_[2])], 1)
    cells = F.avg_pool2d(pix, stride, ceil_mode=True) if stride > 1 else pix
    e = gauss_blur(cells[:, 8:], 2.0 / stride)
    return torch.cat([cells[:, :8], texton_channels(e, references)], 1)


@lru_cache(maxsize=4)
def texton_references(stride: int = 2) -> torch.Tensor:
    """Mean energy direction of each texture `[T, 10]` from rendered samples: the extractor's fixed calibration."""
    rng = np.random.default_rng(12345)
    refs = []
    for t in TEXTURES:
        imgs = [finish(texture_field(ToyClass(c, t), 96, 96, rng), rng) for c in ("red", "green", "blue")]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
        e = gauss_blur(F.avg_pool2d(raw_energies(hsv(x)[2]), stride), 2.0 / stride)
        m = 8 // stride
        e = e[..., m:-m, m:-m]
        refs.append((e / e.sum(1, keepdim=True).clamp_min(1e-6)).mean((0, 2, 3)))
    return torch.stack(refs)


def texton_channels(e: torch.Tensor, references: torch.Tensor | None = None, tau: float = 0.003) -> torch.Tensor:
    """Energies `[B, 10, h, w]` -> `[B, T + 1, h, w]`: soft assignment of the energy direction to the textures
    (zero where flat), and flatness."""
    total = e.sum(1, keepdim=True)
    flat = torch.exp(-(total / 0.15) ** 2)
    d = e / total.clamp_min(1e-6)
    ref = (texton_references() if references is None else references).to(d)
    dist = ((d[:, None] - ref[None, :, :, None, None]) ** 2).sum(2)  # [B, T, h, w]
    tex = torch.softmax(-dist / tau, 1) * (1 - flat)
    return torch.cat([tex, flat], 1)


class ToyExtractor:
    """Fixed dense features `[B, D, h, w]` at stride 2: local colour + texture, plus the same over `cfg.block` cells.

    D = 28: 14 local channels (8 hue, 5 texton, 1 flatness) and 14 context channels (box mean over a
    (2*block+1)^2 cell window; block <= 0 means 1).
    """

    stride = 2

    def __init__(self, cfg: ExtractorConfig):
        self.name = cfg.name
        self.view_size = int(cfg.view_size)
        self.context = max(1, int(cfg.block))
        self.dim = 28

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # one image at a time: these ops are memory-bound, and a batch of large views only thrashes the cache
        return torch.cat([self._one(images[i:i + 1].float()) for i in range(len(images))])

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        cells = cell_channels(image, self.stride, texton_references(self.stride))  # [1, 14, h, w]
        k = 2 * self.context + 1
        ctx = F.avg_pool2d(cells, k, stride=1, padding=self.context, count_include_pad=False)
        return torch.cat([cells, 0.7 * ctx], 1)


# -------------------------------------------------------------------------------------------------- classifier

def _unit(seed_text: str, dim: int = CODE_DIM) -> np.ndarray:
    v = np.random.default_rng(_hash("toy-code", seed_text)).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@lru_cache(maxsize=4096)
def class_code(name: str) -> np.ndarray:
    """Code of one class name: shares a part with its colour and its shape/texture words; unknown names are random."""
    key = " ".join(name.strip().casefold().split())
    try:
        c = parse_name(key)
    except ToyNameError:
        return _unit("name:" + key)
    v = _unit("class:" + c.name) + 0.35 * _unit("word:" + c.colour) + 0.25 * _unit("word:" + c.form)
    return v / np.linalg.norm(v)


def _descriptors(mask: np.ndarray) -> np.ndarray:
    """Rotation-invariant shape descriptors of one binary component: holes, solidity, fill, radial spread."""
    from skimage.measure import regionprops

    p = regionprops(mask.astype(np.uint8))[0]
    ys, xs = np.nonzero(mask)
    d = np.hypot(ys - p.centroid[0], xs - p.centroid[1])
    rmax = max(float(d.max()), 1.0)
    fill = p.area / (np.pi * rmax ** 2)
    holes = float(p.euler_number < 1)
    return np.array([holes * 2.0, p.solidity * 3.0, fill * 3.0, d.std() / rmax * 4.0], np.float32)


@lru_cache(maxsize=1)
def _shape_references() -> np.ndarray:
    """Mean descriptors per shape from rendered examples `[S, 4]` (the classifier's fixed 'training')."""
    refs = []
    for shape in SHAPES:
        rows = []
        for r in (14.0, 22.0, 32.0):
            for t in np.linspace(0, np.pi, 5, endpoint=False):
                rows.append(_descriptors(shape_coverage(shape, 96, 96, 48.3, 47.7, r, t) > 0.5))
        refs.append(np.mean(rows, 0))
    return np.stack(refs)


class ToyClassifier:
    """Presence classifier: unit-norm text and image embeddings in one space (`dim` = 256)."""

    def __init__(self, cfg: ClassifierConfig):
        self.dim = CODE_DIM
        self.text_template = cfg.text_template
        self.image_size = int(cfg.image_size)
        pre, _, post = cfg.text_template.partition("{name}")
        self._pre, self._post = pre, post

    def names_in(self, prompt: str) -> list[str]:
        """`"a X and a Y"` -> `["X", "Y"]` (parts without the template prefix are glued to the previous name)."""
        parts = prompt.split(" and ")
        names: list[str] = []
        for part in parts:
            if names and self._pre and not part.startswith(self._pre):
                names[-1] += " and " + part
            else:
                names.append(part)
        out = []
        for n in names:
            if self._pre and n.startswith(self._pre):
                n = n[len(self._pre):]
            if self._post and n.endswith(self._post):
                n = n[: -len(self._post)]
            out.append(n)
        return out

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        out = np.zeros((len(prompts), self.dim), np.float32)
        for i, p in enumerate(prompts):
            v = sum(class_code(n) for n in self.names_in(p))
            out[i] = v / max(float(np.linalg.norm(v)), 1e-6)
        return out

    def detect(self, image: torch.Tensor) -> list[tuple[str, np.ndarray]]:
        """`image [3, H, W]` -> [(colour, shape probabilities [S])] for flat coloured components."""
        x = image[None].float()
        col = colour_channels(x)[0]  # [8, H, W]
        idx = col.argmax(0).numpy()
        sat = col.amax(0).numpy() > 0.3
        _, _, v = hsv(x)
        lv = torch.log(v + 0.03)[:, None]
        std = (gauss_blur(lv * lv, 1.0) - gauss_blur(lv, 1.0) ** 2).clamp_min(0).sqrt()[0, 0].numpy()
        flat = std < 0.07
        h, w = idx.shape
        min_area = 0.008 * h * w
        refs = _shape_references()
        found = []
        for k, colour in enumerate(COLOURS):
            region = (idx == k) & sat
            core = region & flat
            if core.sum() < min_area / 2:
                continue
            grown = ndimage.binary_dilation(core, iterations=4) & region
            lab, n = ndimage.label(grown)
            for j in range(1, n + 1):
                comp = lab == j
                area = comp.sum()
                if area < min_area or (core & comp).sum() < 0.3 * area:
                    continue
                d = np.linalg.norm(refs - _descriptors(comp)[None], axis=1)
                p = np.exp(-(d - d.min()) / 0.15)
                found.append((colour, p / p.sum()))
        return found

    def encode_image(self, images: torch.Tensor) -> np.ndarray:
        out = np.zeros((images.shape[0], self.dim), np.float32)
        for b in range(images.shape[0]):
            v = np.zeros(self.dim, np.float32)
            for colour, probs in self.detect(images[b]):
                v += sum(float(p) * class_code(f"{colour} {s}") for s, p in zip(SHAPES, probs) if p > 0.05)
            if not v.any():
                v = _unit("nothing")
            out[b] = v / np.linalg.norm(v)
        return out


# ------------------------------------------------------------------------------------------------------ masker

class ToyMasker:
    """Instance masks `[M, H, W]` bool: connected components of hue regions covering 0.5% - 95% of the image."""

    def __init__(self, recipe: Recipe | None = None, max_masks: int = 8):
        self.max_masks = max_masks

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
        col = gauss_blur(colour_channels(x), 1.0)[0]
        idx = col.argmax(0).numpy()
        sat = col.amax(0).numpy() > 0.2
        h, w = idx.shape
        masks = []
        for k in range(col.shape[0]):
            lab, n = ndimage.label(ndimage.binary_opening((idx == k) & sat))
            for j in range(1, n + 1):
                m = lab == j
                if 0.005 * h * w <= m.sum() <= 0.95 * h * w:
                    masks.append(m)
        masks.sort(key=lambda m: -int(m.sum()))
        return np.stack(masks[: self.max_masks]) if masks else np.zeros((0, h, w), bool)


# ------------------------------------------------------------------------------------------------------ scenes

def _half_plane(h: int, w: int, rng: np.random.Generator, frac: float) -> np.ndarray:
    """A random straight-edged region covering about `frac` of the image."""
    y, x = _grid(h, w)
    a = rng.uniform(0, 2 * np.pi)
    proj = np.cos(a) * (x - w / 2) + np.sin(a) * (y - h / 2)
    return proj >= np.quantile(proj, 1 - frac)


def make_scene(vocab_names: list[str], kinds: list[str], rng: np.random.Generator,
               size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image `[size, size, 3]` uint8, labels `[size, size]` uint8 (0 background, i+1 = vocab[i], 255 ignore).

    1-3 objects (vocabulary things of different colours, no overlap) on the typical background of the first (or on a second object's
    background, or on a stuff region of the vocabulary), never on a background of their own colour. A background equal to a vocabulary stuff class is labelled
    as that class.
    """
    classes = [parse_name(n) for n in vocab_names]
    ids = {c.name: i + 1 for i, c in enumerate(classes)}
    things = [i for i, k in enumerate(kinds) if k == "thing"]
    stuffs = [i for i, k in enumerate(kinds) if k == "stuff"]
    objs: list[ToyClass] = []
    for i in rng.permutation(things)[: int(rng.integers(1, 4))] if things else []:
        if all(o.colour != classes[i].colour for o in objs):  # at most one thing per colour
            objs.append(classes[i])
    first = typical_background(objs[0].name) if objs else classes[stuffs[0]]
    img = texture_field(first, size, size, rng)
    labels = np.full((size, size), ids.get(first.name, 0), np.uint8)
    hue_map = np.full((size, size), first.colour, dtype=object)
    regions = []
    if stuffs and rng.random() < 0.5:
        regions.append(classes[stuffs[rng.integers(len(stuffs))]])
    if len(objs) > 1 and rng.random() < 0.35:
        regions.append(typical_background(objs[1].name))
    for c in regions:
        m = _half_plane(size, size, rng, rng.uniform(0.25, 0.5))
        img[m] = texture_field(c, size, size, rng)[m]
        labels[m] = ids.get(c.name, 0)
        hue_map[m] = c.colour
    placed: list[tuple[float, float, float]] = []
    for c in objs:
        for _ in range(60):
            r = rng.uniform(0.11, 0.2) * size
            cy, cx = rng.uniform(r * 1.05, size - r * 1.05, size=2)
            if any(np.hypot(cy - y, cx - x) <= 1.08 * (r + q) for y, x, q in placed):
                continue
            cov = shape_coverage(c.form, size, size, cy, cx, r, rng.uniform(0, 2 * np.pi))
            if (hue_map[cov > 0] == c.colour).mean() <= 0.05:  # no camouflage: not on a same-colour background
                break
        else:
            continue
        placed.append((cy, cx, r))
        img = img * (1 - cov[..., None]) + object_layer(c, size, size, rng) * cov[..., None]
        labels[cov >= 0.5] = ids[c.name]
        labels[(cov > 0.02) & (cov < 0.98)] = 255
    return finish(img, rng), labels


def write_scenes(vocab_path: str, n: int, out: str, seed: int = 0, size: int = 128, progress: bool = True) -> Path:
    """Write `images/0000.png`, `labels/0000.png` and `classes.tsv` (label id = line index, 1-based after header)."""
    from PIL import Image
    from tqdm import tqdm

    from ..vocab import load_vocab

    vocab = load_vocab(vocab_path)
    for c in vocab.classes:
        parse_name(c.name)
        if c.kind == "stuff" and not parse_name(c.name).is_stuff or c.kind == "thing" and parse_name(c.name).is_stuff:
            raise ToyNameError(f"{vocab_path}: class {c.name!r} is marked {c.kind} but its last word says otherwise")
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in tqdm(range(n), desc="toy scenes", disable=not progress, file=sys.stderr):
        img, lab = make_scene(vocab.names, [c.kind for c in vocab.classes], np.random.default_rng(rng.integers(2**63)), size)
        Image.fromarray(img).save(root / "images" / f"{i:04d}.png")
        Image.fromarray(lab).save(root / "labels" / f"{i:04d}.png")
    (root / "classes.tsv").write_text("name\tkind\n" + "".join(f"{c.name}\t{c.kind}\n" for c in vocab.classes))
    return root


def scenes_main(argv: list[str] | None = None) -> int:
    """`ovdiff toy-scenes --vocab FILE --n N --out DIR [--seed S] [--size PX]` or `ovdiff toy-scenes --list --json`."""
    ap = Parser(
        prog="ovdiff toy-scenes",
        description="Write toy-world scenes with ground truth: images/NNNN.png, labels/NNNN.png (uint8: 0 background, "
                    "i = i-th class of classes.tsv counting from 1 after the header, 255 ignore), classes.tsv.")
    from ..recipe import REPO_ROOT

    ap.add_argument("--vocab", default=str(REPO_ROOT / "bank" / "vocab" / "toy.tsv"),
                    help="toy vocabulary (.tsv name<TAB>kind)")
    ap.add_argument("--n", type=int, default=20, help="how many scenes")
    ap.add_argument("--out", default="toy-scenes", metavar="DIR", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the scenes")
    ap.add_argument("--size", type=int, default=128, metavar="PX", help="scene side in pixels (at least 32)")
    ap.add_argument("--list", action="store_true", help="print the known words (colours, shapes, textures) and exit")
    ap.add_argument("--json", action="store_true", help="with --list: as one JSON object")
    a = ap.parse_args(argv)
    if a.json and not a.list:
        ap.error("--json goes with --list")
    if a.list:
        words = known_words()
        print(json.dumps(words) if a.json else "\n".join(f"{k}: {' '.join(v)}" for k, v in words.items()))
        return 0
    if a.n < 1 or a.size < 32:
        ap.error("--n must be >= 1 and --size >= 32")
    try:
        root = write_scenes(a.vocab, a.n, a.out, a.seed, a.size)
    except ValueError as e:
        print(f"ovdiff toy-scenes: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.n} toy scenes ({a.size}px) to {root}")
    return 0
