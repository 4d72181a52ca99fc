"""`ovdiff bank audit URI [--version N] [--json] [--top N]`: rank a bank's classes worst first and say why (issue 26).

Per class, from its shard (class-level fg/bg prototypes) and its support record (`store/support.py`):

- `name_top1`: share of its support images whose nearest class name under the pre-filter's classifier, among the
  bank's names, is its own (cleanlab's self-confidence with the bank as the label set); the most frequent other
  name is `confused_with` (cleanlab's overlapping classes);
- `name_agreement`, `prompt_agreement`: mean cosine of the images to the class name's and the prompt's text;
  `name_vs_prompt` = name - prompt (below zero: the images show the prompt's words, not the name);
- `kept`: share of images the prototypes were made from; `fg_coverage`: mean foreground share of an image;
- `separation`: 1 - cosine of the class fg and bg prototypes (mean over extractors);
- `nearest`: the most similar other classes by class fg prototype (mean cosine over extractors): duplicates or
  likely confusions.

Each signal is compared with the classes of the same kind (thing / stuff) in the bank: a robust z-score (median and
1.4826 MAD, with a floor per signal, so a bank where every class agrees does not flag noise). A class's suspicion is
the weighted sum of how far its signals fall on the bad side (FiftyOne's mistakenness weighs disagreement by the
model's certainty: here, by how far from its cohort a class is); `score` = 1 / (1 + suspicion), worst first. A
signal 3 spreads or more on the bad side makes the class a suspect and adds a reason in words.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

SUSPECT_Z = 3.0
# signal -> (weight, spread floor, direction: +1 higher is better, -1 lower is better, 0 both sides are bad)
SIGNALS = {
    "name_top1": (1.0, 0.10, 1),
    "name_agreement": (1.0, 0.05, 1),
    "prompt_agreement": (0.5, 0.05, 1),
    "name_vs_prompt": (1.0, 0.05, 1),
    "kept": (1.0, 0.10, 1),
    "fg_coverage": (0.5, 0.05, 0),
    "separation": (0.5, 0.05, 1),
    "nearest_similarity": (0.5, 0.02, -1),
}
CAP = 10.0  # one signal adds at most this much suspicion


@dataclass
class ClassAudit:
    name: str
    kind: str
    prompt: str
    signals: dict[str, float] = field(default_factory=dict)
    z: dict[str, float] = field(default_factory=dict)
    nearest: list[tuple[str, float]] = field(default_factory=list)
    confused_with: tuple[str, float] | None = None
    n_images: int = 0
    n_kept: int = 0
    record: bool = False
    suspicion: float = 0.0
    reasons: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return 1.0 / (1.0 + self.suspicion)

    def to_dict(self) -> dict:
        return {"name": self.name, "score": round(self.score, 4), "suspect": bool(self.reasons),
                "reasons": self.reasons, "kind": self.kind, "prompt": self.prompt,
                "signals": {k: round(v, 4) for k, v in self.signals.items()},
                "z": {k: round(v, 2) for k, v in self.z.items()},
                "nearest": [{"name": n, "similarity": round(s, 4)} for n, s in self.nearest],
                "confused_with": None if self.confused_with is None else
                {"name": self.confused_with[0], "share": round(self.confused_with[1], 4)},
                "n_images": self.n_images, "kept": self.n_kept, "record": self.record}


@dataclass
class ClassData:
    """What the audit reads of one class: class-level fg/bg prototypes per extractor, its record's signals."""

    fg: dict[str, np.ndarray]  # extractor -> [D] unit norm
    bg: dict[str, np.ndarray]
    text: np.ndarray | None  # shard text embedding (the prompt's words)
    kept: np.ndarray | None = None
    signals: dict[str, np.ndarray] = field(default_factory=dict)
    embeddings: np.ndarray | None = None
    name_text: np.ndarray | None = None


def read_class(loc, entry: dict) -> ClassData:
    """One class's shard (sha256-checked; only its class-level rows are kept) and record, when it has one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .store.shards import read_shard_bytes
    from .store.support import SIGNALS as REC_SIGNALS, read_record

    t = pq.read_table(pa.BufferReader(read_shard_bytes(loc, entry)),
                      columns=["extractor", "kind", "level", "dim", "vector"])
    ex = t.column("extractor").to_pylist()
    kind = t.column("kind").to_pylist()
    level = t.column("level").to_pylist()
    vec = t.column("vector")
    fg, bg, text = {}, {}, None
    for i, (e, k, lv) in enumerate(zip(ex, kind, level)):
        if lv != "class":
            continue
        v = np.frombuffer(vec[i].as_py(), "<f2").astype(np.float32)
        if e == "text":
            text = v / max(np.linalg.norm(v), 1e-12)
        elif k == "fg":
            fg[e] = v
        elif k == "bg":
            bg[e] = v
    d = ClassData(fg, bg, text)
    if entry.get("support"):
        rec = read_record(loc, entry)
        d.kept = rec.kept
        d.signals = {s: rec.signal(s) for s in REC_SIGNALS}
        d.embeddings = rec.embeddings()
        d.name_text = rec.text("name")
    return d


def _robust_z(x: np.ndarray, floor: float) -> np.ndarray:
    ok = np.isfinite(x)
    if not ok.any():
        return np.zeros_like(x)
    med = np.median(x[ok])
    spread = max(1.4826 * float(np.median(np.abs(x[ok] - med))), floor)
    return np.where(ok, (x - med) / spread, 0.0)


def audit_classes(entries: list[dict], data: list[ClassData], top_nearest: int = 3) -> list[ClassAudit]:
    """Manifest entries and their ClassData -> ClassAudits, worst first."""
    n = len(entries)
    out = [ClassAudit(e["name"], e["kind"], e.get("prompt", "")) for e in entries]
    # nearest other classes by class fg prototype, mean cosine over the extractors every class has
    exs = sorted(set.intersection(*(set(d.fg) for d in data))) if data else []
    sim = np.zeros((n, n), np.float32)
    for e in exs:
        v = np.stack([d.fg[e] for d in data])
        v /= np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)
        sim += v @ v.T
    sim /= max(len(exs), 1)
    np.fill_diagonal(sim, -np.inf)
    for i, a in enumerate(out):
        d = data[i]
        if n > 1:
            order = np.argsort(-sim[i], kind="stable")[:top_nearest]
            a.nearest = [(entries[j]["name"], float(sim[i, j])) for j in order]
            a.signals["nearest_similarity"] = float(sim[i, order[0]])
        seps = [1.0 - float(np.dot(d.fg[e], d.bg[e]) / max(np.linalg.norm(d.fg[e]) * np.linalg.norm(d.bg[e]), 1e-12))
                for e in exs if e in d.bg]
        if seps:
            a.signals["separation"] = float(np.mean(seps))
        if d.kept is not None:
            a.record = True
            a.n_images, a.n_kept = int(len(d.kept)), int(d.kept.sum())
            a.signals["kept"] = a.n_kept / max(a.n_images, 1)
            for s in ("name_agreement", "prompt_agreement", "fg_coverage"):
                x = d.signals[s]
                x = x[d.kept] if s == "fg_coverage" and d.kept.any() else x  # coverage of the images used
                if np.isfinite(x).any():
                    a.signals[s] = float(np.nanmean(x))
            if "name_agreement" in a.signals and "prompt_agreement" in a.signals:
                a.signals["name_vs_prompt"] = a.signals["name_agreement"] - a.signals["prompt_agreement"]
    _classifier_top1(entries, data, out)
    # cohort z-scores, suspicion, reasons
    for kind in ("thing", "stuff"):
        idx = [i for i, a in enumerate(out) if a.kind == kind]
        if not idx:
            continue
        for s, (w, floor, direction) in SIGNALS.items():
            x = np.array([out[i].signals.get(s, np.nan) for i in idx], np.float64)
            if not np.isfinite(x).any():
                continue
            z = _robust_z(x, floor)
            cohort_med = float(np.nanmedian(x))
            for i, zi in zip(idx, z):
                a = out[i]
                if s not in a.signals:
                    continue
                a.z[s] = float(zi)
                bad = -zi if direction > 0 else zi if direction < 0 else abs(zi)
                if bad > 0:
                    a.suspicion += w * min(bad, CAP)
                if bad >= SUSPECT_Z:
                    a.reasons.append(_reason(s, a, cohort_med))
    return sorted(out, key=lambda a: (-a.suspicion, a.name))


def _classifier_top1(entries: list[dict], data: list[ClassData], out: list[ClassAudit]) -> None:
    """`name_top1` and `confused_with`: each support image against every class name of the bank (the names' text
    embeddings from the records; the shard's prompt text where a class has no record)."""
    texts = [d.name_text if d.name_text is not None else d.text for d in data]
    dims = {t.shape[0] for t in texts if t is not None}
    if len(dims) != 1 or any(t is None for t in texts):
        return
    names = np.stack(texts).astype(np.float32)  # [C, E]
    for i, d in enumerate(data):
        if d.embeddings is None or not len(d.embeddings):
            continue
        top = np.argmax(d.embeddings @ names.T, axis=1)  # [N]
        out[i].signals["name_top1"] = float(np.mean(top == i))
        other = top[top != i]
        if len(other):
            j = np.bincount(other, minlength=len(data)).argmax()
            out[i].confused_with = (entries[j]["name"], float(np.mean(top == j)))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _reason(s: str, a: ClassAudit, med: float) -> str:
    v = a.signals[s]
    typical = f"typical for {a.kind} classes of this bank {med:.2f}"
    if s == "name_top1":
        r = (f"only {round(v * a.n_images)} of {a.n_images} support images look like {a.name!r} to the "
             f"classifier among the bank's names")
        if a.confused_with:
            r += f" ({_pct(a.confused_with[1])} look like {a.confused_with[0]!r})"
        return r
    if s == "name_agreement":
        return f"support images agree little with the name {a.name!r} (cosine {v:.2f}, {typical})"
    if s == "prompt_agreement":
        return f"support images agree little with the prompt {a.prompt or a.name!r} (cosine {v:.2f}, {typical})"
    if s == "name_vs_prompt":
        return (f"support images match the prompt {a.prompt!r} better than the name {a.name!r} (cosine "
                f"{a.signals.get('prompt_agreement', 0):.2f} vs {a.signals.get('name_agreement', 0):.2f}): "
                "wrong words in the vocabulary's prompt column?")
    if s == "kept":
        return (f"only {a.n_kept} of {a.n_images} support images kept ({_pct(v)}; {typical} "
                f"{_pct(med)}): empty foregrounds or dropped by the agreement filter")
    if s == "fg_coverage":
        side = "more" if v > med else "less"
        return (f"foreground covers {_pct(v)} of a support image, {side} than typical for {a.kind} classes "
                f"({_pct(med)}): a {'stuff' if a.kind == 'thing' and v > med else 'missing or partial'} "
                "drawing?")
    if s == "separation":
        return f"foreground and background prototypes are alike (1 - cosine {v:.3f}, {typical})"
    if s == "nearest_similarity":
        return (f"prototypes nearly the same as {a.nearest[0][0]!r} (cosine {v:.3f}, {typical}): a likely duplicate "
                "or confusion")
    return f"{s} = {v:.3f} ({typical})"


def audit_bank(uri: str, version: int | None = None, threads: int = 8, progress: bool = False) -> tuple[dict,
                                                                                                      list[ClassAudit]]:
    """-> (manifest, ClassAudits worst first). Reads every shard (sha256-checked) and record of the version."""
    from .store.fs import Location
    from .store.schema import ManifestError
    from .store.shards import read_manifest

    loc = Location(uri)
    m = read_manifest(loc, version)
    if m is None:
        raise ManifestError(f"{uri}: no committed bank here (no manifests/)")
    entries = [c for c in m["classes"] if c.get("removed") is None]  # tombstones have no shard (store/edits.py)
    bar = None
    if progress and len(entries) > 50:
        from tqdm import tqdm

        bar = tqdm(total=len(entries), unit="class", desc="audit", file=sys.stderr, mininterval=1.0)

    def one(e):
        d = read_class(loc, e)
        if bar is not None:
            bar.update(1)
        return d

    with ThreadPoolExecutor(max(1, min(threads, len(entries)))) as ex:
        data = list(ex.map(one, entries))
    if bar is not None:
        bar.close()
    return m, audit_classes(entries, data)


DESCRIPTION = ("Rank a bank's classes worst first by the signals its shards and support records allow, and flag "
               "suspects with reasons.")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """`ovdiff bank audit`'s arguments (its own parser, or a subparser of `ovdiff bank`)."""
    ap.add_argument("uri", help="bank location: local folder, file:// or s3://bucket/prefix")
    ap.add_argument("--version", type=int, default=None, help="manifest version (default: latest)")
    ap.add_argument("--json", action="store_true", help='print [{"name", "score", "reasons", ...}] worst first')
    ap.add_argument("--top", type=int, default=20, help="text output: how many classes to list (default 20)")


def main(argv: list[str] | None = None) -> int:
    from .cli_help import Parser

    ap = Parser(prog="ovdiff bank audit", description=DESCRIPTION)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(a: argparse.Namespace) -> int:
    """Audit the bank named by parsed arguments `a` and print the ranking (text or `--json`)."""
    from .store.fs import StoreError
    from .store.schema import ManifestError

    t0 = time.perf_counter()
    try:
        m, audits = audit_bank(a.uri, a.version, progress=not a.json)
    except (StoreError, ManifestError, OSError) as e:
        print(f"ovdiff bank audit: error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps([x.to_dict() for x in audits]))
        return 0
    suspects = [x for x in audits if x.reasons]
    no_record = sum(not x.record for x in audits)
    print(f"bank {m['bank_id']} v{m['version']}: {len(audits)} classes, worst first")
    for rank, x in enumerate(audits[: a.top], 1):
        near = f"; nearest {x.nearest[0][0]!r} {x.nearest[0][1]:.3f}" if x.nearest else ""
        print(f"{rank:4d}. {x.name!r} score {x.score:.3f}{' SUSPECT' if x.reasons else ''}{near}")
        for r in x.reasons:
            print(f"        - {r}")
    print(f"summary: {len(suspects)} suspect(s) of {len(audits)} classes"
          f"{f', {no_record} without a support record' if no_record else ''}, {time.perf_counter() - t0:.1f}s")
    return 0
