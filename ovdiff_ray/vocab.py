"""Vocabulary files: `.tsv` with header `name<TAB>kind` (kind = thing | stuff) or `name<TAB>kind<TAB>prompt`, or
`.txt`, one name a line (things).

The optional `prompt` column is the text used wherever a class name becomes text (the support-set prompt, the
pre-filter's text), for names that are ambiguous alone (`keyboard` -> `computer keyboard`); empty means the name.

Every problem stops the job before any work, with the file name and line number.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

MAX_NAME_CHARS = 200
MAX_VOCAB_BYTES = 8 << 20
MAX_CLASSES = 100_000
KINDS = ("thing", "stuff")


class VocabError(ValueError):
    """A vocabulary that does not validate; the message names file and line."""


@dataclass(frozen=True)
class VocabClass:
    name: str
    kind: str  # thing | stuff
    prompt: str = ""  # text for prompts; "" = the name

    @property
    def text(self) -> str:
        """The words used for this class in prompts: the prompt column, else the name."""
        return self.prompt or self.name


@dataclass(frozen=True)
class Vocabulary:
    classes: tuple[VocabClass, ...]
    source: str
    sha256: str

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def prompts(self) -> list[str]:
        """Per class, the text for prompts (the prompt column, else the name)."""
        return [c.text for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def kind(self, name: str) -> str:
        return {c.name: c.kind for c in self.classes}[name]


def fold(name: str) -> str:
    """Case/space folding used for duplicate detection and lookups."""
    return re.sub(r"\s+", " ", name.strip()).casefold()


def _check_name(name: str, where: str) -> str:
    name = name.strip()
    if not name:
        raise VocabError(f"{where}: empty class name")
    if len(name) > MAX_NAME_CHARS:
        raise VocabError(f"{where}: class name longer than {MAX_NAME_CHARS} characters ({len(name)})")
    bad = [c for c in name if unicodedata.category(c).startswith("C")]
    if bad:
        raise VocabError(f"{where}: control character {bad[0]!r} in class name {name!r}")
    return name


def parse_vocab(data: bytes, source: str) -> Vocabulary:
    if len(data) > MAX_VOCAB_BYTES:
        raise VocabError(f"{source}: larger than {MAX_VOCAB_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise VocabError(f"{source}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    tsv = source.endswith(".tsv")
    start = 0
    ncols = 2
    if tsv:
        header = [h.strip() for h in lines[0].rstrip("\r").split("\t")] if lines else []
        if header not in (["name", "kind"], ["name", "kind", "prompt"]):
            raise VocabError(f"{source}:1: expected the header 'name<TAB>kind' or 'name<TAB>kind<TAB>prompt'")
        ncols = len(header)
        start = 1
    classes: list[VocabClass] = []
    seen: dict[str, int] = {}
    for i in range(start, len(lines)):
        where = f"{source}:{i + 1}"
        raw = lines[i].rstrip("\r")
        if tsv:
            parts = raw.split("\t")
            if ncols == 3 and len(parts) == 2:
                parts.append("")  # the prompt column may be left off a line
            if len(parts) != ncols:
                cols = "name, kind" + (", prompt" if ncols == 3 else "")
                raise VocabError(f"{where}: expected {ncols} tab-separated columns ({cols}), got {len(parts)}")
            name, kind = parts[0], parts[1].strip()
            prompt = _check_name(parts[2], where + " (prompt)") if ncols == 3 and parts[2].strip() else ""
            if kind not in KINDS:
                raise VocabError(f"{where}: unknown kind {kind!r} (expected thing or stuff)")
        else:
            name, kind, prompt = raw, "thing", ""
        name = _check_name(name, where)
        key = fold(name)
        if key in seen:
            raise VocabError(f"{where}: duplicate class {name!r} (first on line {seen[key]})")
        seen[key] = i + 1
        classes.append(VocabClass(name, kind, "" if prompt == name else prompt))
        if len(classes) > MAX_CLASSES:
            raise VocabError(f"{source}: more than {MAX_CLASSES} classes")
    if not classes:
        raise VocabError(f"{source}: no classes")
    return Vocabulary(tuple(classes), source, hashlib.sha256(data).hexdigest())


def load_vocab(path: str | Path) -> Vocabulary:
    """Load and validate a `.tsv` or `.txt` vocabulary file."""
    p = Path(path)
    if not p.is_file():
        raise VocabError(f"{p}: vocabulary file does not exist")
    if p.suffix not in (".tsv", ".txt"):
        raise VocabError(f"{p}: expected a .tsv or .txt vocabulary file")
    if p.stat().st_size > MAX_VOCAB_BYTES:
        raise VocabError(f"{p}: larger than {MAX_VOCAB_BYTES} bytes")
    return parse_vocab(p.read_bytes(), str(p))


def from_names(names: list[str], kinds: list[str] | None = None, source: str = "<list>",
               prompts: list[str] | None = None) -> Vocabulary:
    kinds = kinds or ["thing"] * len(names)
    prompts = prompts or [""] * len(names)
    body = "name\tkind\tprompt\n" + "".join(f"{n}\t{k}\t{p}\n" for n, k, p in zip(names, kinds, prompts))
    return parse_vocab(body.encode(), source if source.endswith(".tsv") else source + ".tsv")


def check_class(name: str, kind: str = "thing", prompt: str = "", where: str = "<class>") -> VocabClass:
    """One class checked as a vocabulary line is (name, kind, optional prompt), e.g. a class sent over HTTP."""
    if not isinstance(name, str) or not isinstance(kind, str) or not isinstance(prompt, str):
        raise VocabError(f"{where}: name, kind and prompt must be strings")
    for label, text in (("name", name), ("prompt", prompt)):
        if "\t" in text or "\n" in text or "\r" in text:
            raise VocabError(f"{where}: tab or line break in the class {label} {text[:60]!r}")
    name = _check_name(name, where)
    kind = kind.strip()
    if kind not in KINDS:
        raise VocabError(f"{where}: unknown kind {kind!r} (expected thing or stuff)")
    prompt = _check_name(prompt, where + " (prompt)") if prompt.strip() else ""
    return VocabClass(name, kind, "" if prompt == name else prompt)
