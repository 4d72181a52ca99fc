"""Vocabularies as published: COCO/LVIS JSON `categories` and LVIS-style names -> names + derived prompts.

Names are kept exactly as published (they are the class names of the bank); the prompt (the words put in the
support-set prompt and the pre-filter text, `VocabClass.text`) is derived by one rule, `derive_prompt`:

1. the name as a phrase: `_` -> space, runs of spaces collapsed (`aerosol_can` -> "aerosol can");
2. if that phrase has a parenthesised sense (`mat_(gym_equipment)`, `bow_(weapon)`), the first synonym that
   reads as a phrase naming the same thing: no parentheses, longer than the ambiguous head word and containing
   it as a word (`mat_(gym_equipment)` with synonyms `[mat_(gym_equipment), gym_mat]` -> "gym mat",
   `truffle_(chocolate)` -> "chocolate truffle"). Synonyms without the head word are not taken: LVIS lists
   `autobus` and `charabanc` for `bus_(vehicle)`, words a text encoder knows worse than "bus (vehicle)";
3. otherwise the sense is kept as words: `bow_(weapon)` -> "bow (weapon)", `bus_(vehicle)` -> "bus (vehicle)".

A plain `.txt` of names has no synonyms, so it gets rules 1 and 3. A COCO category with `isthing: 0` (panoptic
files) is `stuff`, everything else `thing`. `ovdiff vocab import FILE --out FILE.tsv` writes the result as
`name<TAB>kind<TAB>prompt` for a person to review.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

from .vocab import MAX_CLASSES, VocabError, Vocabulary, from_names, load_vocab
from .cli_help import Parser

MAX_JSON_BYTES = 256 << 20  # lvis_v1_val.json is 192 MB (annotations included); the categories alone are ~0.5 MB
_SENSE = re.compile(r"^(?P<head>.*?)\s*\((?P<sense>[^()]*)\)")


def phrase(name: str) -> str:
    """`bow_(decorative_ribbons)` -> "bow (decorative ribbons)": underscores to spaces, spaces collapsed."""
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip()


def derive_prompt(name: str, synonyms: list[str] | tuple[str, ...] = ()) -> str:
    """The prompt words for a published class name (rules in the module docstring)."""
    words = phrase(name)
    m = _SENSE.match(words)
    if not m:
        return words
    head = m.group("head").casefold()
    for s in synonyms:
        q = phrase(str(s))
        if "(" in q or ")" in q or q.casefold() == head:
            continue
        if head and re.search(rf"(?<![\w-]){re.escape(head)}(?![\w-])", q.casefold()):
            return q
    return words


def _categories(data, source: str) -> list[dict]:
    cats = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(cats, list):
        raise VocabError(f"{source}: expected a JSON object with a 'categories' list (COCO/LVIS) or a list of "
                         "categories")
    if len(cats) > MAX_CLASSES:
        raise VocabError(f"{source}: more than {MAX_CLASSES} categories")
    out = []
    for i, c in enumerate(cats):
        where = f"{source}: categories[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise VocabError(f"{where}: expected an object with a string 'name'")
        syn = c.get("synonyms", [])
        if not isinstance(syn, list) or not all(isinstance(s, str) for s in syn):
            raise VocabError(f"{where} ({c['name']!r}): 'synonyms' must be a list of strings")
        if "id" in c and (not isinstance(c["id"], int) or isinstance(c["id"], bool)):
            raise VocabError(f"{where} ({c['name']!r}): 'id' must be an integer")
        out.append(c)
    if all("id" in c for c in out):
        out.sort(key=lambda c: c["id"])  # the published label order
    return out


def _with_prompts(names: list[str], kinds: list[str], prompts: list[str], source: str,
                  where: list[str]) -> Vocabulary:
    """Validate through vocab.parse_vocab (one rule set), reporting problems at `where[i]`, not synthetic lines."""
    try:
        v = from_names(names, kinds, source=source + ".tsv", prompts=prompts)
    except VocabError as e:
        m = re.match(rf"{re.escape(source)}\.tsv:(\d+)(.*)", str(e), re.S)
        if m:
            raise VocabError(f"{where[int(m.group(1)) - 2]}{m.group(2)}") from None
        raise VocabError(str(e).replace(source + ".tsv", source)) from None
    return dataclasses.replace(v, source=source)


def parse_json_vocab(data: bytes, source: str) -> Vocabulary:
    """COCO/LVIS-style JSON -> Vocabulary (names as published, prompts derived)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise VocabError(f"{source}: not valid JSON: {e}") from None
    cats = _categories(doc, source)
    names = [c["name"].strip() for c in cats]
    for i, n in enumerate(names):
        if "\t" in n or "\n" in n:
            raise VocabError(f"{source}: categories[{i}]: tab or newline in class name {n!r}")
    kinds = ["stuff" if c.get("isthing", 1) in (0, False) else "thing" for c in cats]
    prompts = [derive_prompt(c["name"], c.get("synonyms", [])) for c in cats]
    where = [f"{source}: categories[{i}] ({n!r})" for i, n in enumerate(names)]
    return _with_prompts(names, kinds, prompts, source, where)


def read_vocabulary(path: str | Path) -> Vocabulary:
    """Any vocabulary a job takes: `.tsv` as written, `.txt` names with derived prompts, COCO/LVIS `.json`."""
    p = Path(path)
    if p.suffix == ".json":
        if not p.is_file():
            raise VocabError(f"{p}: vocabulary file does not exist")
        if p.stat().st_size > MAX_JSON_BYTES:
            raise VocabError(f"{p}: larger than {MAX_JSON_BYTES} bytes; keep only its categories, e.g. "
                             f"`jq '{{categories}}' {p.name} > categories.json`")
        return parse_json_vocab(p.read_bytes(), str(p))
    v = load_vocab(p)
    if p.suffix != ".txt":
        return v
    prompts = [derive_prompt(c.name) for c in v.classes]
    if all(pr == c.name for pr, c in zip(prompts, v.classes)):
        return v
    where = [f"{p}:{i + 1}" for i in range(len(v))]
    return _with_prompts(v.names, [c.kind for c in v.classes], prompts, str(p), where)


def to_tsv(vocab: Vocabulary) -> str:
    """`name<TAB>kind<TAB>prompt`, every prompt written out (the name when it needs no other words)."""
    return "name\tkind\tprompt\n" + "".join(f"{c.name}\t{c.kind}\t{c.text}\n" for c in vocab.classes)


def import_main(argv: list[str] | None = None) -> int:
    """`ovdiff vocab import FILE --out FILE.tsv`."""
    ap = Parser(prog="ovdiff vocab", description="Vocabulary tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="COCO/LVIS JSON or a .txt of names -> name<TAB>kind<TAB>prompt TSV",
                         description=__doc__.split("\n\n", 1)[1])
    imp.add_argument("file", help="COCO/LVIS annotation or categories JSON, .txt (one name a line) or .tsv")
    imp.add_argument("--out", required=True, help="TSV to write (name<TAB>kind<TAB>prompt)")
    imp.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    a = ap.parse_args(argv)
    try:
        v = read_vocabulary(a.file)
    except VocabError as e:
        print(f"ovdiff vocab import: error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    if out.suffix != ".tsv":
        print(f"ovdiff vocab import: error: --out {out}: expected a .tsv file name", file=sys.stderr)
        return 2
    if out.exists() and not a.force:
        print(f"ovdiff vocab import: error: --out {out} exists (pass --force to overwrite)", file=sys.stderr)
        return 2
    body = to_tsv(v)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    changed = sum(c.text != c.name for c in v.classes)
    for c in [c for c in v.classes if c.text != c.name][:5]:
        print(f"  {c.name}  ->  {c.text}")
    print(f"summary: {len(v)} classes from {a.file} -> {out}; {changed} prompts differ from the name "
          "(review them, then pass the TSV as --vocab)")
    return 0
