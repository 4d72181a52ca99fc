"""`build_bank`: build a prototype bank on Ray, one class per unit of work, resumable and exactly-once.

The driver (no GPU) diffs the vocabulary against the bank's committed manifest and sends only the pending classes
through Ray Data (`from_items` -> `map_batches(ClassWorker)` under an actor pool). Each worker loads the recipe's
models once, writes its class's shard and returns metadata only; the driver commits manifest v(N+1) = previous
classes + new ones, every `--commit-every` classes and at the end.

    build_bank --vocab bank/vocab/toy.tsv --recipe toy --out ./banks/toy
    build_bank --vocab bank/vocab/toy.tsv --recipe toy --out ./banks/toy --rebuild "red circle"   # in place
    build_bank --vocab lvis_v1_val.json --recipe paper --out s3://bucket/banks/lvis --check
    ray job submit --address http://HEAD:8265 -- build_bank --vocab bank/vocab/lvis1203.tsv --recipe paper \\
        --out s3://bucket/banks/lvis --gpus-per-worker 1 --workers 8
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from . import build_report, logs, preflight, terminal
from .build_report import class_record, worker_device
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from .store.fs import CommitConflict, Location, StorageConfig, StoreError
from .store.schema import ManifestError
from .store.retry import is_storage_error, with_retries
from .store.edits import EditError, effective_prompt, is_removed, merge_built, name_index
from .store.shards import commit_manifest, new_manifest, read_manifest, write_shard
from .vocab import VocabError, Vocabulary, fold
from .vocab_import import read_vocabulary
from .worker_start import start_with_retries
from .cli_help import Parser

COMMIT_SECONDS = 300.0  # also commit when this long has passed since the last commit


class ClassWorker:
    """Ray Data callable class: models loaded once per actor; one batch row = one class -> one metadata row.

    A class that raises is retried here up to `retries` times, then returned as failed with its reason; a worker
    process or node that dies is retried by Ray Data on another actor. Shard keys are content-addressed and seeds
    derive from (bank seed, class, image), so a retry rewrites the same shard. Model loading that fails on storage
    (weights copied from S3) is tried again with backoff (`worker_start.py`). A failure that no retry can fix
    (`permanent`: a model that cannot load, a recipe this worker cannot read) is not raised, so Ray does not
    restart the actor: every row then comes back `fatal` with that one line, and the driver stops the build.
    """

    start_backoff_s: float | None = None  # first wait between start attempts (None: worker_start's default)

    def __init__(self, recipe: dict, uri: str, storage: dict | None, retries: int = 2, device: str | None = None,
                 crf_workers: int = 0):
        self.device, self.crf_workers = device, crf_workers  # device None: cuda when this actor has a GPU
        self.node = socket.gethostname() + f":{os.getpid()}"
        self.retries, self.fatal, self.start_attempts = retries, "", 1
        try:
            self.recipe = recipe_from_dict(recipe, "bank recipe")
            self.loc = Location(uri, storage)
            started = start_with_retries(self.load_models, f"class worker {self.node}", permanent,
                                         base_s=self.start_backoff_s)
            self.models, self.start_attempts = started.value, started.attempts
        except Exception as e:  # noqa: BLE001 - transient errors past the start retries are raised
            if not permanent(e):
                raise
            self.fatal = f"{one_line(e)} (on worker {self.node})"

    def load_models(self):
        """The recipe's models on this worker (retried by `start_with_retries` on a storage failure)."""
        from .sample import SamplingModels

        return SamplingModels.load(self.recipe, self.device, crf_workers=self.crf_workers)

    def build_one(self, class_id: int, name: str, kind: str, prompt: str = "") -> dict:
        """One class -> its shard written and its manifest entry (as JSON), or `status` failed with the reason
        after `retries` more attempts. `prompt` (optional) is the text the support set is drawn from."""
        from .sample import sample_class

        if self.fatal:
            return dict(status="fatal", entry="", error=self.fatal, seconds=0.0, attempts=0, worker=self.node)
        errors = []
        t_first = time.perf_counter()
        for attempt in range(1, self.retries + 2):
            t0 = time.perf_counter()
            try:
                with_retries(lambda: build_report.mark_run(self.loc, name, self.node, attempt),
                             f"{self.loc.uri}: run marker of class {name!r}")
                protos = sample_class(name, self.recipe, self.models, kind=kind, prompt=prompt)
                t_write = time.perf_counter()
                info = with_retries(lambda: write_shard(self.loc, protos, class_id),
                                    f"{self.loc.uri}: shard of class {name!r}")
                record = write_support(self.loc, protos)  # issue 26: the support set beside the shard
                t_end = time.perf_counter()
                secs = t_end - t0
                entry = {**info.to_entry(), "id": class_id, "seconds": round(secs, 3), "n_images": protos.info["kept"]}
                if record is not None:
                    entry["support"] = record
                runs = with_retries(lambda: build_report.count_runs(self.loc, name),
                                    f"{self.loc.uri}: run markers of class {name!r}")
                entry["build"] = class_record(protos.info.get("seconds", {}), t_end - t_write, secs, t_end - t_first,
                                              attempt, self.node, *worker_device(self.models.device),
                                              self.start_attempts, runs)
                if prompt and prompt != name:
                    entry["prompt"] = prompt
                return dict(status="ok", entry=json.dumps(entry), error="", seconds=secs, attempts=attempt,
                            worker=self.node)
            except Exception as e:  # noqa: BLE001 - any model/data error is retried, then reported
                if permanent(e):
                    return dict(status="fatal", entry="", error=f"{one_line(e)} (class {name!r}, on worker "
                                f"{self.node})", seconds=0.0, attempts=attempt, worker=self.node)
                errors.append(f"{type(e).__name__}: {e}")
                last = traceback.format_exc(limit=3)
                if unfixable_class(e):
                    break  # this class can never be drawn: fail it now, the build goes on
                if isinstance(e, StoreError) and "storage unavailable" in str(e):
                    break  # with_retries already waited it out: report the storage, do not sample again
        return dict(status="failed", entry="", error=f"{errors[-1]} (after {len(errors)} attempt{'s' * (len(errors) != 1)})\n{last}",
                    seconds=0.0, attempts=len(errors), worker=self.node)

    def worker(self) -> str:
        """host:pid of this worker."""
        return self.node

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("class_id", "name", "status", "entry", "error", "seconds",
                                                "attempts", "worker")}
        prompts = batch["prompt"] if "prompt" in batch else [""] * len(batch["name"])
        for cid, name, kind, prompt in zip(batch["class_id"], batch["name"], batch["kind"], prompts):
            r = self.build_one(int(cid), str(name), str(kind), str(prompt))
            out["class_id"].append(int(cid))
            out["name"].append(str(name))
            for k, v in r.items():
                out[k].append(v)
        return out


def write_support(loc: Location, protos) -> dict | None:
    """A class's support record (`store/support.py`) written beside its shard -> its manifest reference
    `{key, sha256, bytes, mode, rows, seconds}` (seconds: encoding + writing), or None without a record."""
    from .store.support import write_record

    if protos.support is None:
        return None
    t0 = time.perf_counter()
    info = with_retries(lambda: write_record(loc, protos.name, protos.kind, protos.prompt, protos.support),
                        f"{loc.uri}: support record of class {protos.name!r}")
    return {**info.to_entry(), "seconds": round(time.perf_counter() - t0 + protos.info.get("seconds", {}).get(
        "record", 0.0), 4)}


def crf_workers(recipe: Recipe, cpus_per_worker: float) -> int:
    """Processes per actor running MaskCut's dense CRF beside the device (one per CPU of the actor), 0 when the
    recipe has no CRF."""
    if recipe.masks.method != "maskcut" or not recipe.masks.maskcut_crf:
        return 0
    return max(1, int(cpus_per_worker))


def actor_memory(recipe: Recipe, gpu: bool) -> int:
    """Bytes of memory each class worker asks Ray for: what the recipe's models take (models/footprint.py), at
    most the largest node's memory resource (so the pool can always be placed)."""
    import ray

    from .models.footprint import worker_memory

    want = worker_memory(recipe, gpu)
    nodes = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    return int(min(want, max(nodes))) if nodes and max(nodes) > 0 else want


def permanent(e: BaseException) -> bool:
    """A failure that will not go away on retry: a model reference that names nothing or does not load, weights
    that fail their sha256, a recipe this worker's code cannot read, a library that is not installed."""
    from .models.weights import ModelLoadError, ModelNotFoundError, WeightsIntegrityError

    return isinstance(e, (ModelNotFoundError, ModelLoadError, WeightsIntegrityError, RecipeError, ImportError))


def unfixable_class(e: BaseException) -> bool:
    """A failure of one class that no retry can fix, though other classes build: a name the generator cannot
    draw (the toy world's words)."""
    from .models.toy import ToyNameError

    return isinstance(e, ToyNameError)


def one_line(e: BaseException, limit: int = 400) -> str:
    """`Type: first line of the message`, cut at `limit` characters (library errors can run to pages)."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[:limit].rstrip() + " ..."
    return f"{type(e).__name__}: {msg}"


@dataclass
class BuildState:
    """What the driver holds between commits."""

    loc: Location
    bank_id: str
    recipe: Recipe
    vocab: Vocabulary
    committed: list[dict]  # manifest entries of the last committed version
    version: int  # last committed version (0 = none)
    pending_entries: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    built: int = 0
    fatal: str = ""  # a permanent failure that stopped the build
    rebuild_ids: set[int] = field(default_factory=set)  # ids of classes rebuilt in place (`--rebuild`)
    rebuilt: list[str] = field(default_factory=list)  # rebuilt classes committed so far
    changed: list[dict] = field(default_factory=list)  # classes whose prompt/kind changed, not rebuilt this run

    @classmethod
    def of(cls, loc: Location, manifest: dict, vocab: Vocabulary) -> "BuildState":
        """The state of an existing bank at its committed `manifest` (a job adding classes to it)."""
        return cls(loc, manifest["bank_id"], recipe_from_dict(manifest["recipe"], loc.display("manifest")), vocab,
                   list(manifest["classes"]), int(manifest["version"]))

    def commit(self) -> bool:
        """Commit the manifest it extends + the built classes as v(N+1) (`store.edits.merge_built`: rebuilt classes in
        place, new ones appended with ids re-derived from that manifest); on a conflict merge with the winner and
        retry. A class lands once; ids never repeat."""
        if not self.pending_entries:
            return False
        for _ in range(10):
            merged = merge_built(self.committed, self.pending_entries, self.rebuild_ids)
            if not merged.added and not merged.rebuilt:
                self.pending_entries = []
                return False
            m = new_manifest(self.bank_id, self.version + 1, self.recipe.to_dict(), merged.classes,
                             recipe_sha256=self.recipe.sha256(), vocab_sha256=self.vocab.sha256,
                             models=model_hashes(self.recipe), failed=self.failed,
                             change={"added": merged.added, "rebuilt": merged.rebuilt})
            try:
                with_retries(lambda: commit_manifest(self.loc, m), f"{self.loc.uri}: commit of v{self.version + 1}")
            except CommitConflict:
                latest = read_manifest(self.loc)
                if not same_recipe(latest["recipe"], self.recipe):
                    raise
                self.committed, self.version = latest["classes"], latest["version"]
                continue
            self.committed, self.version = m["classes"], m["version"]
            self.rebuilt += merged.rebuilt
            self.pending_entries = []
            return True
        raise StoreError(f"{self.loc.uri}: could not commit after 10 conflicting writers")


def model_hashes(recipe: Recipe) -> dict[str, str]:
    try:
        from .models.weights import model_hash
    except ImportError:  # pragma: no cover - weights module absent
        return dict(recipe.model_refs())
    out = {}
    for where, ref in recipe.model_refs().items():
        try:
            out[where] = f"{ref}@{model_hash(ref)}"
        except Exception:  # noqa: BLE001 - a hub id not in the local cache: record the reference only
            out[where] = ref
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(prog="build_bank", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--vocab", required=True,
                    help="vocabulary: .tsv (name, kind[, prompt]), .txt (one name a line) or COCO/LVIS .json")
    ap.add_argument("--recipe", required=True, help="recipe name in bank/recipes (paper, paper-plus, tiny, toy) or a YAML file")
    ap.add_argument("--out", required=True, help="bank location: local folder, file:// or s3://bucket/prefix")
    ap.add_argument("--workers", type=int, default=None, help="actors in the pool (default: GPUs, or 2 on CPU)")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0,
                    help="GPUs per actor (default 0; 1 on a GPU cluster: real models with 0 need --device cpu)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default 1)")
    ap.add_argument("--device", choices=preflight.DEVICES, default="auto", help=preflight.device_help())
    ap.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, a running cluster, or local)")
    ap.add_argument("--bank-id", default=None,
                    help="id of a new bank (default: RECIPE-VOCAB8-HASH6: the recipe's name, the vocabulary's sha256 "
                         "(8 hex), and 6 hex of a hash of the recipe, --out and the version the bank starts after; "
                         "the same inputs give the same id, and --check prints it)")
    ap.add_argument("--max-failures", type=int, default=None,
                    help="stop scheduling after this many failed classes (default: no limit)")
    ap.add_argument("--retries", type=int, default=2, help="retries of a class that raises (default 2)")
    ap.add_argument("--commit-every", type=int, default=16, help="commit a version every N built classes (default 16)")
    ap.add_argument("--new-bank", action="store_true", help="start a new bank at --out even if its recipe differs")
    ap.add_argument("--limit", type=int, default=None, help="build at most N pending classes this run (default: all)")
    ap.add_argument("--rebuild", nargs="+", default=None, metavar="NAME",
                    help="rebuild these classes of the bank (or bring back removed ones) from the vocabulary's kind "
                         "and prompt, in place: same label values, every other class's shard unchanged, one new "
                         "version. Default: none; classes whose prompt or kind changed are named, not rebuilt")
    ap.add_argument("--check", action="store_true",
                    help="run only the preflight and print what the build would do; start and write nothing")
    ap.add_argument("--verbose", action="store_true",
                    help="Ray's own lines on the terminal too (its native error lines, Ray Data's notes and issue "
                         "detector); without it they are only in Ray's log folder")
    return ap.parse_args(argv)


def pending_classes(committed: list[dict], classes, first_id: int | None = None,
                    rebuild: set[int] | frozenset = frozenset()) -> list[dict]:
    """The rows the ClassWorker takes (`class_id`, `name`, `kind`, `prompt`, `rebuild`), in vocabulary order:
    classes (VocabClass) not in `committed` (manifest entries; a name or an alias matches, a removed class is not
    brought back), with proposed new ids (the commit re-derives them from the manifest it extends); and the
    classes at the positions in `rebuild` (tombstones included), with their own name and id, drawn from the
    vocabulary's kind and prompt."""
    index = name_index(committed)
    nid = max(max((int(c.get("id", i)) for i, c in enumerate(committed)), default=-1) + 1, first_id or 0)
    pending, seen = [], set()
    for c in classes:
        i = index.get(fold(c.name))
        if i is not None and i in rebuild and i not in seen:
            e = committed[i]
            pending.append({"class_id": int(e.get("id", i)), "name": e["name"], "kind": c.kind, "prompt": c.prompt,
                            "rebuild": True})
            seen.add(i)
        elif i is None and fold(c.name) not in seen:
            pending.append({"class_id": nid, "name": c.name, "kind": c.kind, "prompt": c.prompt, "rebuild": False})
            seen.add(fold(c.name))
            nid += 1
    return pending


def changed_classes(committed: list[dict], classes) -> list[dict]:
    """Vocabulary classes (VocabClass) in `committed` whose definition there differs: the words they were drawn
    from (`prompt`, else the name) or their kind. Removed classes are listed with `removed` (a plain build skips
    them). Each: `position`, `name` (the bank's), `from`/`to` prompts, `kind_from`/`kind_to`."""
    index = name_index(committed)
    out, seen = [], set()
    for c in classes:
        i = index.get(fold(c.name))
        if i is None or i in seen:
            continue
        seen.add(i)
        e = committed[i]
        was, now = effective_prompt(e), " ".join((c.prompt or e["name"]).split())
        if is_removed(e):
            out.append({"position": i, "name": e["name"], "removed": e["removed"]})
        elif was != now or e["kind"] != c.kind:
            out.append({"position": i, "name": e["name"], "from": was, "to": now, "kind_from": e["kind"],
                        "kind_to": c.kind})
    return out


def rebuild_positions(committed: list[dict], names: list[str], vocab: Vocabulary, where: str,
                      vocab_path: str) -> set[int]:
    """`--rebuild` names -> positions of the bank's classes; each must be a class of the bank (or a removed one)
    and in the vocabulary, which gives its prompt. EditError names the first bad input."""
    index = name_index(committed)
    in_vocab = {index.get(fold(c.name)) for c in vocab.classes} | {None}
    out = set()
    for n in names:
        i = index.get(fold(n))
        if i is None:
            raise EditError(f"--rebuild {n!r}: not a class of {where}")
        if i not in in_vocab:
            raise EditError(f"--rebuild {n!r}: not in --vocab {vocab_path} (a rebuilt class is drawn from the "
                            "vocabulary's kind and prompt)")
        out.add(i)
    return out


def rebuild_command(args: argparse.Namespace, names: list[str]) -> str:
    """The command line that rebuilds `names` with this run's vocabulary, recipe and bank."""
    import shlex

    return (f"build_bank --vocab {shlex.quote(args.vocab)} --recipe {shlex.quote(args.recipe)} --out "
            f"{shlex.quote(args.out)} --rebuild {' '.join(shlex.quote(n) for n in names)}")


def changed_lines(args: argparse.Namespace, state: "BuildState", prefix: str = "build_bank") -> list[str]:
    """What a plain build says about classes whose vocabulary definition changed (never skipped silently)."""
    lines, todo = [], []
    for c in state.changed:
        if "removed" in c:
            lines.append(f"{prefix}: class {c['name']!r} was removed in v{c['removed']}: skipped (its label value "
                         f"{c['position'] + 1} stays reserved; `--rebuild` brings it back there)")
            continue
        what = []
        if c["from"] != c["to"]:
            what.append(f"prompt {c['from']!r} in the bank, {c['to']!r} in the vocabulary")
        if c["kind_from"] != c["kind_to"]:
            what.append(f"kind {c['kind_from']} in the bank, {c['kind_to']} in the vocabulary")
        lines.append(f"{prefix}: class {c['name']!r} changed ({'; '.join(what)}): not rebuilt")
        todo.append(c["name"])
    if todo:
        lines.append(f"{prefix}: to rebuild {'it' if len(todo) == 1 else 'them'} in place (same label value"
                     f"{'s' * (len(todo) != 1)}, one new version): {rebuild_command(args, todo)}")
    return lines


def same_recipe(stored: dict, recipe) -> bool:
    """Whether a manifest's recipe is `recipe`. A manifest written before a recipe key existed reads that key as its
    default, which is the behaviour the bank was built with, so adding a key (a new switch, off by default) does not
    make older banks impossible to extend; a key whose stored value differs still does."""
    if stored == recipe.to_dict():
        return True
    try:
        return recipe_from_dict(stored, "manifest").to_dict() == recipe.to_dict()
    except RecipeError:
        return False

def default_bank_id(recipe, vocab_sha256: str, loc: Location, latest: dict | None) -> str:
    """`<recipe name>-<vocab sha256, 8 hex>-<6 hex>`, the last part a hash of the recipe, the bank location and the
    version the new bank starts after (0 at a new location; the current version with `--new-bank`): the same
    inputs give the same id, so `--check` names the id the build will write."""
    out = loc.uri if "://" in loc.uri else os.path.abspath(loc.uri)
    where = json.dumps({"recipe": recipe.sha256(), "out": out, "after": latest["version"] if latest else 0},
                       sort_keys=True)
    return f"{recipe.name}-{vocab_sha256[:8]}-{hashlib.sha256(where.encode()).hexdigest()[:6]}"


def plan(args: argparse.Namespace) -> tuple[BuildState, list[dict]]:
    """Validate inputs and diff the vocabulary against the committed manifest. Nothing starts before this passes."""
    vocab = read_vocabulary(args.vocab)
    recipe = load_recipe(args.recipe)
    loc = Location(args.out)
    latest = read_manifest(loc)
    committed, version = [], 0
    bank_id = args.bank_id or default_bank_id(recipe, vocab.sha256, loc, latest)
    if latest is not None:
        version = latest["version"]
        if not same_recipe(latest["recipe"], recipe) and not args.new_bank:
            raise RecipeError(f"{args.out} holds bank {latest['bank_id']} v{version} built with recipe "
                              f"{latest['recipe'].get('name')!r}, which differs from {recipe.name!r}: a bank never "
                              "mixes recipes (pass --new-bank to start a new bank there, or choose another --out)")
        if not args.new_bank:
            committed, bank_id = latest["classes"], latest["bank_id"]
    rebuild = set()
    if args.rebuild:
        where = f"bank {bank_id} v{version} at {args.out}" if committed else f"{args.out} (no committed bank there)"
        rebuild = rebuild_positions(committed, args.rebuild, vocab, where, args.vocab)
    pending = pending_classes(committed, vocab.classes, rebuild=rebuild)
    if args.limit is not None:
        pending = pending[: args.limit]
    state = BuildState(loc, bank_id, recipe, vocab, committed, version,
                       rebuild_ids={int(committed[i].get("id", i)) for i in rebuild})
    state.changed = [c for c in changed_classes(committed, vocab.classes) if c["position"] not in rebuild]
    return state, pending


def run_preflight(args: argparse.Namespace) -> tuple[preflight.Preflight, BuildState | None, list[dict], bool]:
    """Every check before any work: vocab, recipe, its models, the bank location, the plan; then the cluster (Ray
    is asked only now, and only when there is a cluster to ask). Sets `args.workers` to the pool size the build
    will use. Returns (preflight, state, pending, whether this call started Ray)."""
    pf = preflight.Preflight()
    preflight.check_vocab(pf, args.vocab)
    preflight.check_recipe(pf, args.recipe)
    if pf.recipe is not None:
        preflight.check_models(pf, pf.recipe)
    args.worker_device = preflight.check_device(pf, [pf.recipe] if pf.recipe else [], args.device,
                                                args.gpus_per_worker)
    preflight.check_writable(pf, args.out)
    for flag, value, low in (("--workers", args.workers, 1), ("--gpus-per-worker", args.gpus_per_worker, 0),
                             ("--cpus-per-worker", args.cpus_per_worker, 0), ("--retries", args.retries, 0),
                             ("--commit-every", args.commit_every, 1)):
        if value is not None and value < low:
            pf.add(f"{flag} {value:g}", f"must be at least {low}")
    if not pf.ok:
        return pf, None, [], False
    try:
        state, pending = plan(args)
    except EditError as e:
        pf.add("--rebuild", str(e))
        return pf, None, [], False
    except (VocabError, RecipeError, ManifestError, StoreError) as e:
        pf.add("--out", str(e))
        return pf, None, [], False
    except Exception as e:  # noqa: BLE001 - storage down while reading the bank: name it
        if not is_storage_error(e):
            raise
        pf.add(args.out, f"storage unavailable ({type(e).__name__}: {e}); check the storage and retry")
        return pf, None, [], False
    started = False
    if pending:
        if preflight.local_ray_would_start(args.address):
            res = preflight.local_resources()
        else:
            import ray

            try:
                if not ray.is_initialized():
                    ray.init(address=args.address, log_to_driver=True, logging_level="WARNING")
                    started = True
                res = preflight.ray_resources()
            except Exception as e:  # noqa: BLE001 - a wrong address, a cluster that is down
                pf.add(f"--address {args.address or 'auto'}", f"cannot connect to the Ray cluster "
                       f"({' '.join(str(e).split())[:300]}): check the address and that it runs the same Ray version")
                return pf, state, pending, started
        workers = args.workers or preflight.default_workers(res, args.gpus_per_worker, args.cpus_per_worker)
        args.workers = max(1, min(workers, len(pending)))
        preflight.check_resources(pf, res, args.workers, args.gpus_per_worker, args.cpus_per_worker)
    return pf, state, pending, started


def print_check(args: argparse.Namespace, pf: preflight.Preflight, state: BuildState, pending: list[dict]) -> None:
    """`--check`: what was found and what the build would do."""
    for note in pf.notes:
        print(f"build_bank --check: {note}")
    skipped = len(state.vocab) - len(pending)
    for line in changed_lines(args, state, "build_bank --check"):
        print(line)
    if not pending:
        print(f"build_bank --check: nothing to build: all {len(state.vocab)} classes are in bank {state.bank_id} "
              f"v{state.version} at {args.out}")
        return
    g = state.recipe.generation
    cost = preflight.class_cost(state.recipe)
    if cost is None:
        est = f"generator {g.generator!r}: no GPU time to estimate"
    else:
        total = cost.seconds * len(pending)
        cpu = "the models run on the CPU: many times the " if args.worker_device == "cpu" else ""
        est = (f"{cpu}estimated GPU time {len(pending)} x ~{cost.seconds:.3g} s = "
               f"{preflight.human_seconds(total)} ({cost.basis}), about "
               f"{preflight.human_seconds(total / args.workers)} on {args.workers} worker(s)")
    head = "first " if args.limit is not None else ""
    names = ", ".join(p["name"] for p in pending[:5]) + (", ..." if len(pending) > 5 else "")
    n_re = sum(bool(p.get("rebuild")) for p in pending)
    rebuilt = f", {n_re} of them rebuilt in place" if n_re else ""
    print(f"build_bank --check: would build {len(pending)} classes ({head}{names}){rebuilt}; {skipped} already in "
          f"v{state.version}")
    print(f"build_bank --check: would write bank {state.bank_id} v{state.version + 1} to {args.out} "
          f"(shards/, manifests/), a version every {args.commit_every} classes; {args.workers} worker(s) x "
          f"({args.cpus_per_worker:g} CPU, {args.gpus_per_worker:g} GPU), models on {args.worker_device}")
    print(f"build_bank --check: {est}")


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    own_terminal = terminal.install(verbose=args.verbose)  # Ray's native lines stay in its log folder
    pf, state, pending, started_ray = run_preflight(args)
    if not pf.ok or args.check:
        if started_ray:
            import ray

            ray.shutdown()
        if not pf.ok:
            pf.report("build_bank", sys.stderr)
            print(f"summary: preflight found {len(pf.problems)} problem(s); nothing was started or written",
                  file=sys.stderr)
            return 2
        print_check(args, pf, state, pending)
        print(f"summary: preflight ok, {len(pending)} classes to build; nothing was started or written (--check)")
        return 0
    skipped = len(state.vocab) - len(pending)
    n_re = sum(bool(p.get("rebuild")) for p in pending)
    print(f"build_bank: bank {state.bank_id} at {args.out}: {len(state.vocab)} classes in vocab, {skipped} already "
          f"in v{state.version}, {len(pending)} to build{f' ({n_re} rebuilt in place)' if n_re else ''} "
          f"(recipe {state.recipe.name})", flush=True)
    for line in changed_lines(args, state):
        print(line, file=sys.stderr, flush=True)
    if not pending:
        print(f"build_bank: nothing to build: committed nothing, bank {args.out} stays at v{state.version}")
        n_changed = sum("removed" not in c for c in state.changed)
        print(f"summary: built 0, skipped {skipped}{f' ({n_changed} changed, not rebuilt)' if n_changed else ''}, "
              f"failed 0, wall {time.perf_counter() - t_start:.1f}s, bank {args.out} v{state.version}")
        return 0
    import ray

    logs.quiet_ray(args.verbose)  # Ray's start-up notes and Ray Data's INFO lines stay in Ray's log folder
    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=True, logging_level="WARNING")
        started_ray = True
    if own_terminal:
        terminal.forward_worker_lines(args.verbose)
    interrupted, storage_error = False, None
    try:
        interrupted = execute(args, state, pending)
    except StoreError as e:  # the commit failed after its retries: what is committed stays as it was
        if isinstance(e, CommitConflict):
            raise
        storage_error = str(e)
    finally:
        if started_ray:
            ray.shutdown()
    wall = time.perf_counter() - t_start
    for f in state.failed:
        print(f"failed: {f['name']}: {f['error'].splitlines()[0]}", file=sys.stderr)
    if state.fatal:
        print(f"build_bank: error: {state.fatal}", file=sys.stderr)
    n_changed = sum("removed" not in c for c in state.changed)
    print(f"summary: built {state.built}{f' ({len(state.rebuilt)} rebuilt in place)' if state.rebuilt else ''}, "
          f"skipped {skipped}{f' ({n_changed} changed, not rebuilt)' if n_changed else ''}, failed "
          f"{len(state.failed)}, wall {wall:.1f}s, bank {args.out} v{state.version}"
          f"{' (interrupted)' if interrupted else ''}"
          f"{' (stopped: a failure no retry can fix)' if state.fatal else ''}")
    if storage_error:
        print(f"build_bank: error: {storage_error}; nothing past v{state.version} was committed (shards written "
              "so far are unreferenced); rerun to resume", file=sys.stderr)
        return 3
    if interrupted:
        return 130
    if state.fatal:
        return 2
    return 1 if state.failed else 0


def execute(args: argparse.Namespace, state: BuildState, pending: list[dict]) -> bool:
    """Stream the pending classes through the actor pool, committing as results arrive. Returns True on Ctrl-C."""
    import ray
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    gpus = ray.cluster_resources().get("GPU", 0)
    workers = args.workers or (int(gpus // args.gpus_per_worker) if args.gpus_per_worker and gpus else 2)
    workers = max(1, min(workers, len(pending)))
    storage = StorageConfig.from_env().to_dict() if args.out.startswith("s3://") else None
    ds = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
        ClassWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"recipe": state.recipe.to_dict(), "uri": args.out, "storage": storage,
                               "retries": args.retries, "device": args.worker_device,
                               "crf_workers": crf_workers(state.recipe, args.cpus_per_worker)},
        num_gpus=args.gpus_per_worker, num_cpus=args.cpus_per_worker,
        memory=actor_memory(state.recipe, args.worker_device != "cpu" and bool(args.gpus_per_worker)))
    old = signal.getsignal(signal.SIGINT)
    last_commit, since = time.monotonic(), 0
    bar = tqdm(total=len(pending), unit="class", desc="build_bank", dynamic_ncols=True, file=sys.stderr,
               mininterval=1.0)
    t0 = time.perf_counter()
    try:
        for row in ds.iter_rows():
            build_report.record_row(state.bank_id, row, json.loads(row["entry"]) if row["status"] == "ok" else None)
            if row["status"] == "ok":
                state.pending_entries.append(json.loads(row["entry"]))
                state.built += 1
                since += 1
            elif row["status"] == "fatal":
                state.fatal = row["error"]
                break
            else:
                state.failed.append({"name": row["name"], "error": row["error"], "attempts": int(row["attempts"])})
                tqdm.write(f"build_bank: class {row['name']!r} failed: {row['error'].splitlines()[0]}", file=sys.stderr)
            bar.update(1)
            done = bar.n
            rate = done / max(time.perf_counter() - t0, 1e-9) * 60
            bar.set_postfix_str(f"{rate:.1f} classes/min, {len(state.failed)} failed, v{state.version}")
            if since >= args.commit_every or time.monotonic() - last_commit > COMMIT_SECONDS:
                if state.commit():
                    tqdm.write(f"build_bank: committed v{state.version} ({len(state.committed)} classes)")
                last_commit, since = time.monotonic(), 0
            if args.max_failures is not None and len(state.failed) >= args.max_failures:
                tqdm.write(f"build_bank: stopping after {len(state.failed)} failures (--max-failures)")
                break
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the commit
        bar.close()
        state.commit()
        signal.signal(signal.SIGINT, old)
        return True
    bar.close()
    state.commit()
    return False


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
