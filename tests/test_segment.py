"""The Segmenter on a toy bank: contract, views, matching, pre-filter, retrieval, PAMR, errors and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovdiff_ray.models import toy
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.segment import (SegmentError, Segmenter, main, make_views, overlay, pamr_refine, read_image,
                                segment_max, window_starts)
from ovdiff_ray.store.bank import Bank
from ovdiff_ray.vocab import load_vocab

VOCAB = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bank" / "vocab" / "toy.tsv")


@pytest.fixture(scope="module")
def protos():
    from ovdiff_ray.sample import SamplingModels, sample_class

    recipe = load_recipe("toy")
    models = SamplingModels.load(recipe, "cpu")
    return [sample_class(c.name, recipe, models, kind=c.kind) for c in load_vocab(VOCAB).classes]


@pytest.fixture()
def seg(protos):
    return Segmenter.from_bank(Bank.from_prototypes(protos, load_recipe("toy")), "cpu")


@pytest.fixture(scope="module")
def scenes():
    v = load_vocab(VOCAB)
    return [toy.make_scene(v.names, [c.kind for c in v.classes], np.random.default_rng(s), 128) for s in range(4)]


def write_bank(root, protos, recipe) -> str:
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, new_manifest, write_shard

    loc = Location(str(root))
    entries = [write_shard(loc, p, i).to_entry() for i, p in enumerate(protos)]
    commit_manifest(loc, new_manifest("toy-test", 1, recipe.to_dict(), entries))
    return str(root)


def test_views_cover_the_image_with_snapped_windows():
    assert window_starts(200, 96, 64) == [0, 64, 104]
    assert window_starts(96, 96, 64) == [0] and window_starts(50, 96, 64) == [0]
    views = make_views(128, 200, [[96, 64]], True)
    assert views == [(0, 0, 96, 96), (0, 64, 96, 96), (0, 104, 96, 96), (32, 0, 96, 96), (32, 64, 96, 96),
                     (32, 104, 96, 96), (0, 0, 128, 200)]
    assert make_views(50, 60, [[96, 64]], True) == [(0, 0, 50, 60)]  # a window larger than the image is the image
    cover = np.zeros((128, 200), int)
    for y, x, h, w in make_views(128, 200, [[96, 64], [64, 48]], False):
        cover[y:y + h, x:x + w] += 1
    assert cover.min() >= 1


def test_segment_max_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(9, 50, generator=g)
    lengths = [3, 1, 5]
    index = torch.full((3, 5), 9, dtype=torch.long)
    start = 0
    for i, n in enumerate(lengths):
        index[i, :n] = torch.arange(start, start + n)
        start += n
    out = segment_max(sims, index)
    ref = torch.stack([sims[0:3].amax(0), sims[3:4].amax(0), sims[4:9].amax(0)])
    assert torch.equal(out, ref)


def test_match_equals_brute_force_cosines(seg):
    """Scores = max cosine over a class's fg prototypes (and over the kept things' bg prototypes at 0)."""
    from ovdiff_ray.segment import Switches

    ids = seg.resolve(["red circle", "blue star", "green stripes"])
    feats = torch.rand(2, 28, 5, 7)
    for sw in (Switches(), Switches(class_mean_only=True)):
        g = seg.gather("toy", ids, sw)
        got = seg.match(feats, g)
        a = seg.bank.extractors["toy"]
        pix = torch.nn.functional.normalize(feats, dim=1)
        for i, c in enumerate(ids):
            r = np.arange(*a.rows_of(c).indices(len(a.vectors)))
            r = r[(a.kind[r] == 0) & ((a.level[r] == 0) | (not sw.class_mean_only))]
            p = torch.from_numpy(a.vectors[r]).float()
            ref = torch.einsum("rd,bdhw->brhw", p, pix).amax(1)
            assert torch.allclose(got[:, i + 1], ref, atol=1e-5)
        bg = torch.einsum("rd,bdhw->brhw", g.protos[g.n_fg:], pix).amax(1)
        assert g.n_bg > 0 and torch.allclose(got[:, 0], bg, atol=1e-5)


def test_result_contract_and_class_restriction(seg, scenes):
    img = np.asarray(Image.fromarray(scenes[0][0]).resize((150, 100)))
    r = seg.segment(img, return_scores=True)
    assert r.labels.shape == (100, 150) and r.labels.dtype == np.int32
    assert set(np.unique(r.labels)) == set(r.classes)
    assert all(r.classes[v] == ("background" if v == 0 else seg.bank.names[v - 1]) for v in r.classes)
    assert r.scores.shape == (len(r.kept) + 1, 100, 150) and r.scores.dtype == np.float32
    assert r.scores.min() >= 0 and r.scores.max() <= 1
    assert set(r.timings) == {"features", "prefilter", "matching", "upsample", "pamr", "regions"}
    paper = seg.segment(img, ablate=["no_stuff_presence"])
    assert set(paper.kept) >= {"green stripes", "blue checks"}  # the paper keeps every stuff class
    assert seg.segment(Image.fromarray(img)).labels.tolist() == r.labels.tolist()  # PIL in, same result

    only = seg.segment(scenes[0][0], classes=["red circle", "Green Stripes"])
    allowed = {0, seg.bank.index("red circle") + 1, seg.bank.index("green stripes") + 1}
    assert set(np.unique(only.labels)) <= allowed



def test_batch_of_mixed_sizes_matches_one_by_one(seg, scenes):
    """Views of several images share forward passes; each result is the one-image result (up to float rounding)."""
    imgs = [scenes[0][0], np.asarray(Image.fromarray(scenes[1][0]).resize((150, 100))), scenes[2][0],
            np.asarray(Image.fromarray(scenes[3][0]).resize((90, 200)))]
    for kw in ({}, {"pamr": True}, {"ablate": ["no_prefilter"]}):
        batch = seg.segment_batch(imgs, return_scores=True, **kw)
        for img, b in zip(imgs, batch):
            one = seg.segment(img, return_scores=True, **kw)
            assert b.labels.shape == img.shape[:2] and b.kept == one.kept
            assert np.allclose(b.scores, one.scores, atol=1e-4)
            assert (b.labels != one.labels).mean() < 1e-3  # only exact ties can flip
    class Counting:  # counts the images of each extractor forward pass
        def __init__(self, e):
            self.e = e

        def __getattr__(self, k):
            return getattr(self.e, k)

        def __call__(self, x):
            calls.append(len(x))
            return self.e(x)

    calls: list[int] = []
    orig = seg.extractors
    seg.extractors = {k: Counting(e) for k, e in orig.items()}
    try:
        seg.segment_batch([scenes[i][0] for i in range(4)])
    finally:
        seg.extractors = orig
    assert max(calls) == seg.view_batch and sum(calls) == 4 * len(make_views(128, 128, seg.seg.windows, True)) * len(seg.extractors)
    assert seg.segment_batch([]) == []


def test_segments_a_scene_correctly(seg, scenes):
    """Most ground-truth pixels get their label, and the pre-filter keeps the things that are present."""
    names = seg.bank.names
    good, found, things = 0, 0, 0
    for img, lab in scenes:
        r = seg.segment(img)
        ok = lab != 255
        good += (r.labels[ok] == lab[ok]).mean() > 0.85
        present = {names[i - 1] for i in np.unique(lab) if 0 < i < 255 and seg.bank.kinds[i - 1] == "thing"}
        found += len(present & set(r.kept))
        things += len(present)
    assert good >= 3 and found >= 0.75 * things


def test_ablations_change_the_answer(seg, scenes):
    img, lab = next(s for s in scenes if (s[1] == 0).mean() > 0.3)
    ok = lab != 255
    acc = lambda r: (r.labels[ok] == lab[ok]).mean()  # noqa: E731
    full = acc(seg.segment(img))
    assert acc(seg.segment(img, ablate=["no_background"])) < full - 0.1
    r = seg.segment(img, ablate=["no_prefilter"])
    assert len(r.kept) == len(seg.bank.names)
    assert acc(seg.segment(img, ablate=["class_mean_only", "only:toy"])) > 0.5
    with pytest.raises(SegmentError, match="unknown ablation 'no_magic'"):
        seg.segment(img, ablate=["no_magic"])
    with pytest.raises(SegmentError, match="unknown extractor 'dino'"):
        seg.segment(img, ablate=["only:dino"])


def test_stuff_filter_drops_background_like_stuff(seg):
    """yellow cross's typical background is the stuff 'green stripes': its bg prototypes go when that stuff is kept."""
    ids = seg.resolve(["yellow cross", "green stripes"])
    from ovdiff_ray.segment import Switches

    on = seg.gather("toy", ids, Switches())
    off = seg.gather("toy", ids, Switches(stuff_filter=False))
    assert off.n_bg > 0 and on.n_bg < off.n_bg / 2
    assert seg.gather("toy", ids, Switches(background=False)).n_bg == 0


def test_retrieval_bounds_the_classes_without_prefilter(seg, scenes):
    seg.bank.recipe.segmentation.retrieval_classes = 4
    for img, lab in scenes:
        r = seg.segment(img, ablate=["no_prefilter"])
        assert len(r.kept) == 4
        # class-level retrieval sees colours and textures: every present class has a same-colour class kept
        present = {seg.bank.names[i - 1] for i in np.unique(lab) if 0 < i < 255}
        colours = {toy.parse_name(k).colour for k in r.kept}
        assert all(toy.parse_name(p).colour in colours for p in present)


def test_unknown_and_empty_classes_are_errors(seg, scenes):
    with pytest.raises(SegmentError) as e:
        seg.segment(scenes[0][0], classes=["red circle", "purple unicorn", "zebra"])
    assert "purple unicorn" in str(e.value) and "zebra" in str(e.value) and "red circle" not in str(e.value)
    with pytest.raises(SegmentError, match="empty class list"):
        seg.segment(scenes[0][0], classes=[])
    with pytest.raises(SegmentError, match="expected an image"):
        seg.segment(np.zeros((4, 4, 7), np.uint8))


def test_pamr_keeps_shapes():
    """Coarse, noisy scores of a disk snap to the disk's edges; nothing else moves."""
    h = w = 96
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 50) ** 2 + (xx - 44) ** 2 <= 22 ** 2
    img = np.where(disk[..., None], [200, 40, 40], [40, 90, 200]).astype(np.float32) / 255
    coarse = torch.nn.functional.interpolate(torch.from_numpy(disk[None, None].astype(np.float32)), size=(12, 12),
                                             mode="area")
    fg = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    fg = fg + 0.15 * torch.randn(h, w, generator=torch.Generator().manual_seed(0))
    scores = torch.stack([1 - fg, fg])
    image = torch.from_numpy(img).permute(2, 0, 1)
    out = pamr_refine(image, scores, 10, (1, 2, 4, 8, 12, 24))
    iou = lambda m: (m & disk).sum() / (m | disk).sum()  # noqa: E731
    before, after = iou(scores.argmax(0).numpy() == 1), iou(out.argmax(0).numpy() == 1)
    assert after > 0.97 and after > before + 0.03
    # a constant image has uniform affinities: constant scores stay exactly constant
    flat = pamr_refine(torch.full((3, 40, 40), 0.5), torch.full((3, 40, 40), 0.25), 10, (1, 2, 4))
    assert torch.allclose(flat, torch.full_like(flat, 0.25))


def test_pamr_leaves_a_constant_image_unchanged(seg):
    for colour in ((200, 30, 30), (128, 128, 128)):
        img = np.full((100, 140, 3), colour, np.uint8)
        a = seg.segment(img)
        b = seg.segment(img, pamr=True)
        assert np.array_equal(a.labels, b.labels) and len(np.unique(a.labels)) == 1
        assert b.timings["pamr"] > 0


def test_non_image_files_are_clear_errors(tmp_path, capsys, protos):
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    with pytest.raises(SegmentError, match="notes.png: not a readable image"):
        read_image(txt)
    with pytest.raises(SegmentError, match="no such image file"):
        read_image(tmp_path / "missing.jpg")
    bank = write_bank(tmp_path / "bank", protos, load_recipe("toy"))
    assert main([str(txt), "--bank", bank, "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "notes.png" in err and "not a readable image" in err
    assert not (tmp_path / "o.png").exists()


def test_segment_cli_writes_an_overlay(tmp_path, capsys, protos, scenes):
    bank = write_bank(tmp_path / "bank", protos, load_recipe("toy"))
    img, lab = scenes[2]
    Image.fromarray(img).save(tmp_path / "scene.png")
    assert main([str(tmp_path / "scene.png"), "--bank", bank, "--out", str(tmp_path / "out" / "o.png")]) == 0
    out = capsys.readouterr().out
    assert "classes found" in out and "o.png" in out
    pic = Image.open(tmp_path / "out" / "o.png")
    assert pic.width == 128 and pic.height > 128  # image + legend
    assert main([str(tmp_path / "scene.png"), "--bank", bank, "--out", str(tmp_path / "x.png"),
                 "--classes", "red circle,blue unicorn"]) == 2
    assert "blue unicorn" in capsys.readouterr().err


def test_overlay_legend_lists_found_classes(seg, scenes):
    r = seg.segment(scenes[0][0])
    pic = overlay(scenes[0][0], r)
    found = [v for v in r.classes if v]
    assert pic.size == (128, 128 + 18 * max(1, len(found)) + 6)
    top = np.asarray(pic)[:128]
    assert not np.array_equal(top, scenes[0][0])  # labels are drawn on the image


def test_chunked_upsample_argmax_equals_interpolate():
    from ovdiff_ray.segment import upsample_argmax

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 13, 17, generator=g)
    scores[0] = 0.0  # background row with ties to negative scores
    for h0, w0 in ((13, 17), (100, 37), (531, 640), (7, 9)):
        ref = torch.nn.functional.interpolate(scores[None], size=(h0, w0), mode="bilinear", align_corners=False)[0]
        want = ref.clamp_min(0).argmax(0).numpy()
        got = upsample_argmax(scores, h0, w0, rows=64)
        assert (got == want).mean() > 0.9999
        assert got.dtype == np.uint8  # 5 rows: one byte a pixel crosses to the host, not eight


def test_argmax_crosses_narrow_and_confidence_is_optional(seg, scenes):
    from ovdiff_ray.segment import to_host_index

    arg = torch.tensor([[0, 299], [12, 7]])
    assert to_host_index(arg, 300).dtype == np.int16 and to_host_index(arg, 300).tolist() == arg.tolist()
    assert to_host_index(arg, 70000).dtype == np.int32
    full, bare = seg.segment(scenes[0][0]), seg.segment(scenes[0][0], confidence=False)
    assert bare.confidence is None and full.confidence.shape == full.labels.shape
    assert np.array_equal(bare.labels, full.labels) and bare.labels.dtype == np.int32
