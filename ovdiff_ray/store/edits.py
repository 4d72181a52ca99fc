"""Edits of a bank's classes as new versions, and what changed between two versions.

A label value is a manifest position (+1; 0 is background) and never moves once a version is committed:

- **rebuild** (`build_bank --rebuild`): a class's new shard replaces its entry *in place* (same position, same id,
  same aliases); every other entry stays byte for byte;
- **remove**: the entry becomes a *tombstone* (`"removed": <version>`, no shard): its position stays reserved, it is
  never loaded, matched or predicted, and no other class moves. `build_bank --rebuild NAME` revives it in place;
  a plain build skips a vocabulary class that was removed;
- **rename**: the entry's `name` changes in place (the shard is not rewritten; its `class_name` column keeps the
  name it was drawn with, and the entry's `prompt` records the words it was drawn from); **alias**: an extra name (`"aliases": [...]`) that resolves to the class.

Names and aliases are unique over all entries, tombstones included; ids are unique and handed out at commit time
from the manifest the commit actually extends (`merge_built`), so concurrent writers never repeat one. A manifest
holding a tombstone is written as schema `ovdiff-bank/2`, which older readers refuse instead of loading a removed
class. Each edit is one conditional commit (`commit_edit`), retried on a conflict against the winner's manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .fs import CommitConflict, Location, StoreError
from .schema import ManifestError

MAX_EDIT_NAMES = 1024
SKIP_KEYS = ("schema", "bank_id", "version", "created", "package_version", "recipe", "classes", "failed", "change")


class EditError(ValueError):
    """An edit that cannot apply (unknown class, a name already taken); names the input. Nothing is written."""


def fold(name: str) -> str:
    from ..vocab import fold as _fold

    return _fold(name)


def is_removed(entry: dict) -> bool:
    return entry.get("removed") is not None


def effective_prompt(entry_or_prompt: dict | str, name: str | None = None) -> str:
    """The words a class was (or will be) drawn from: its `prompt`, else its name."""
    if isinstance(entry_or_prompt, dict):
        return (entry_or_prompt.get("prompt") or entry_or_prompt["name"]).strip()
    return (entry_or_prompt or name or "").strip()


def name_index(classes: list[dict]) -> dict[str, int]:
    """Folded name or alias -> position, over every entry (tombstones included)."""
    out: dict[str, int] = {}
    for i, c in enumerate(classes):
        out[fold(c["name"])] = i
        for a in c.get("aliases", []):
            out[fold(a)] = i
    return out


def next_id(classes: list[dict]) -> int:
    """The next free class id after every entry of `classes` (an entry without an id counts its position)."""
    return max((int(c.get("id", i)) for i, c in enumerate(classes)), default=-1) + 1


def check_classes(classes: list[dict], where: str = "manifest", ids: bool = False) -> None:
    """A class list that can be committed: names and aliases unique over all entries; with `ids`, ids unique too
    (not asked of every commit: a bank committed before ids were re-derived at commit may repeat one)."""
    seen: dict[str, str] = {}
    for c in classes:
        for n in [c["name"], *c.get("aliases", [])]:
            k = fold(n)
            if k in seen:
                raise ManifestError(f"{where}: refusing to commit a manifest that lists a class twice "
                                    f"({n!r} and {seen[k]!r})")
            seen[k] = n
    found = [int(c["id"]) for c in classes if "id" in c]
    if ids and len(set(found)) != len(found):
        dup = sorted({i for i in found if found.count(i) > 1})
        raise ManifestError(f"{where}: refusing to commit a manifest with repeated class ids {dup[:10]}")


def find(classes: list[dict], name: str, where: str, removed_ok: bool = False) -> int:
    """Position of the class called `name` (or with that alias); EditError naming `where` otherwise."""
    i = name_index(classes).get(fold(name))
    if i is None:
        raise EditError(f"{where} {name!r}: no such class in the bank")
    if is_removed(classes[i]) and not removed_ok:
        raise EditError(f"{where} {name!r}: the class was removed in v{classes[i]['removed']}")
    return i


# -- built classes (build_bank, live-bank jobs) ------------------------------------------------------------
@dataclass
class Merged:
    """The class list of the next version and what it changes."""

    classes: list[dict]
    added: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the base (another writer committed them)


def merge_built(base: list[dict], built: list[dict], rebuild_ids: set[int] | frozenset = frozenset()) -> Merged:
    """`base` (the manifest the commit extends) + newly built entries.

    An entry whose `id` is in `rebuild_ids` and names a class of `base` replaces it in place (keeping position, id
    and aliases; a tombstone is revived). Any other entry whose name is in `base` already (live or removed) is
    skipped: a class lands once. The rest are appended in the order of their proposed ids, with ids re-derived
    from `base`, so a writer that lost a race never reuses an id the winner handed out."""
    out = [dict(c) for c in base]
    by_id = {int(c.get("id", i)): i for i, c in enumerate(out)}
    names = name_index(out)
    nid = next_id(out)
    m = Merged(out)
    for e in sorted(built, key=lambda e: int(e.get("id", 0))):
        eid = int(e.get("id", -1))
        if eid in rebuild_ids and eid in by_id:
            i = by_id[eid]
            old = out[i]
            if not is_removed(old) and old.get("sha256") == e.get("sha256") and old["name"] == e["name"] \
                    and effective_prompt(old) == effective_prompt(e) and old["kind"] == e["kind"]:
                m.skipped.append(e["name"])  # the same shard again (a retried rebuild): nothing changes
                continue
            new = {**e, "id": eid}
            if old.get("aliases"):
                new["aliases"] = list(old["aliases"])
            new.pop("removed", None)
            out[i] = new
            m.rebuilt.append(new["name"])
            names = name_index(out)
            continue
        if fold(e["name"]) in names:
            m.skipped.append(e["name"])
            continue
        out.append({**e, "id": nid})
        names[fold(e["name"])] = len(out) - 1
        by_id[nid] = len(out) - 1
        nid += 1
        m.added.append(e["name"])
    return m


# -- edits without a build ---------------------------------------------------------------------------------
def remove(classes: list[dict], names: list[str], version: int) -> tuple[list[dict], str]:
    """Tombstone `names` (at `version`): their positions stay reserved, nothing else moves."""
    if not names:
        raise EditError("remove: name at least one class")
    if len(names) > MAX_EDIT_NAMES:
        raise EditError(f"remove: {len(names)} names, at most {MAX_EDIT_NAMES} in one edit")
    out = [dict(c) for c in classes]
    done = []
    for n in names:
        i = find(out, n, "remove")
        c = out[i]
        out[i] = {"name": c["name"], "kind": c["kind"], "id": int(c.get("id", i)), "removed": int(version),
                  "shard": "", "sha256": "", "rows": 0}
        done.append(c["name"])
    return out, f"removed {len(done)} class{'es' * (len(done) != 1)} ({', '.join(done)}); their label values " \
                f"stay reserved"


def _check_new_name(classes: list[dict], new: str, where: str) -> str:
    from ..vocab import VocabError, check_class

    try:
        new = check_class(new, "thing", "", where).name
    except VocabError as e:
        raise EditError(str(e)) from None
    i = name_index(classes).get(fold(new))
    if i is not None:
        what = "a removed class (its label value stays reserved)" if is_removed(classes[i]) else "a class"
        raise EditError(f"{where} {new!r}: already the name or an alias of {what} ({classes[i]['name']!r})")
    return new


def rename(classes: list[dict], old: str, new: str) -> tuple[list[dict], str]:
    """`old` is called `new` from now on: same position, id, shard and aliases."""
    out = [dict(c) for c in classes]
    i = find(out, old, "rename")
    new = _check_new_name(out, new, "rename to")
    was = out[i]["name"]
    out[i]["prompt"] = effective_prompt(out[i])  # the words its shard was drawn from (the old name, if no prompt)
    out[i]["name"] = new
    return out, f"renamed {was!r} to {new!r} (label value {i + 1}, shard unchanged)"


def alias(classes: list[dict], name: str, new_alias: str) -> tuple[list[dict], str]:
    """`new_alias` resolves to the class `name` (in requests, label jobs, vocabularies)."""
    out = [dict(c) for c in classes]
    i = find(out, name, "alias")
    new_alias = _check_new_name(out, new_alias, "alias")
    out[i]["aliases"] = [*out[i].get("aliases", []), new_alias]
    return out, f"{new_alias!r} is now an alias of {out[i]['name']!r} (label value {i + 1})"


def commit_edit(loc: Location, edit: Callable[[list[dict], int], tuple[list[dict], str]], change: dict,
                attempts: int = 10) -> tuple[dict, str]:
    """Apply `edit(classes, next_version) -> (classes, summary)` to the latest version and commit the result as the
    next one; on a conflict the edit is applied again to the winner's manifest. Returns (manifest, summary)."""
    from .retry import with_retries
    from .shards import commit_manifest, new_manifest, read_manifest

    for _ in range(attempts):
        latest = read_manifest(loc)
        if latest is None:
            raise EditError(f"{loc.uri}: no committed bank here (no manifests/)")
        v = int(latest["version"]) + 1
        classes, summary = edit(latest["classes"], v)
        extra = {k: val for k, val in latest.items() if k not in SKIP_KEYS}
        m = new_manifest(latest["bank_id"], v, latest["recipe"], classes, **extra, change=change)
        try:
            with_retries(lambda: commit_manifest(loc, m), f"{loc.uri}: commit of v{v}")
        except CommitConflict:
            continue
        return m, summary
    raise StoreError(f"{loc.uri}: could not commit the edit after {attempts} conflicting writers")


# -- diff --------------------------------------------------------------------------------------------------
def diff(a: dict, b: dict) -> dict[str, Any]:
    """What changed from manifest `a` to manifest `b`, position by position (label values never move):
    added, rebuilt, removed, revived, renamed, prompt_changed, kind_changed, aliases_added, aliases_removed."""
    out: dict[str, list] = {k: [] for k in ("added", "rebuilt", "removed", "revived", "renamed", "prompt_changed",
                                            "kind_changed", "aliases_added", "aliases_removed")}
    ca, cb = a["classes"], b["classes"]
    for i, y in enumerate(cb):
        value = i + 1
        if i >= len(ca):
            if not is_removed(y):
                out["added"].append({"value": value, "name": y["name"]})
            continue
        x = ca[i]
        if is_removed(y):
            if not is_removed(x):
                out["removed"].append({"value": value, "name": y["name"]})
            continue
        if is_removed(x):
            out["revived"].append({"value": value, "name": y["name"]})
            continue
        if x["name"] != y["name"]:
            out["renamed"].append({"value": value, "from": x["name"], "to": y["name"]})
        if x["shard"] != y["shard"] or x["sha256"] != y["sha256"]:
            out["rebuilt"].append({"value": value, "name": y["name"]})
        if effective_prompt(x) != effective_prompt(y):
            out["prompt_changed"].append({"value": value, "name": y["name"], "from": x.get("prompt", ""),
                                          "to": y.get("prompt", "")})
        if x["kind"] != y["kind"]:
            out["kind_changed"].append({"value": value, "name": y["name"], "from": x["kind"], "to": y["kind"]})
        xa, ya = set(x.get("aliases", [])), set(y.get("aliases", []))
        out["aliases_added"] += [{"value": value, "name": y["name"], "alias": s} for s in sorted(ya - xa)]
        out["aliases_removed"] += [{"value": value, "name": y["name"], "alias": s} for s in sorted(xa - ya)]
    return {"from": int(a["version"]), "to": int(b["version"]), **out}


def format_diff(d: dict) -> list[str]:
    """One line per change, then a summary line."""
    lines = []
    for k in ("added", "rebuilt", "removed", "revived"):
        lines += [f"{k:<15} {c['value']:>6}  {c['name']}" for c in d[k]]
    lines += [f"{'renamed':<15} {c['value']:>6}  {c['from']} -> {c['to']}" for c in d["renamed"]]
    lines += [f"{'prompt changed':<15} {c['value']:>6}  {c['name']}: {c['from'] or '(name)'!r} -> "
              f"{c['to'] or '(name)'!r}" for c in d["prompt_changed"]]
    lines += [f"{'kind changed':<15} {c['value']:>6}  {c['name']}: {c['from']} -> {c['to']}" for c in d["kind_changed"]]
    lines += [f"{'alias added':<15} {c['value']:>6}  {c['name']}: {c['alias']}" for c in d["aliases_added"]]
    lines += [f"{'alias removed':<15} {c['value']:>6}  {c['name']}: {c['alias']}" for c in d["aliases_removed"]]
    counts = ", ".join(f"{len(d[k])} {k.replace('_', ' ')}" for k in ("added", "rebuilt", "removed", "revived",
                                                                     "renamed", "prompt_changed"))
    lines.append(f"summary: v{d['from']} -> v{d['to']}: {counts}")
    return lines
