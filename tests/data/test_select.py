import numpy as np
import pytest

from quant.errors import CalqError
from quant.data import SelectConfig, select_samples
from quant.data import Document

SOURCES = ("wiki", "news", "reviews")


def _docs(n_per_source: int = 30) -> list[Document]:
    """Documents whose words come from a per-source vocabulary of made-up words, of varied length."""
    rng = np.random.default_rng(0)
    syllables = ["ka", "lo", "mi", "ter", "sun", "vel", "dra", "po", "zen", "qui", "ro", "ba"]
    docs = []
    for source in SOURCES:
        vocab = ["".join(rng.choice(syllables, 3)) for _ in range(300)]
        for i in range(n_per_source):
            text = " ".join(rng.choice(vocab, int(rng.integers(20, 160))))
            docs.append(Document(source, f"{source}-{i}", text))
    docs.append(Document("wiki", "dup", docs[0].text))  # an exact duplicate
    return docs


def test_selection_is_deterministic_covers_sources_and_beats_random(tokenizer):
    cfg = SelectConfig(num_samples=24, seq_len=64, min_len=16, sources=("wiki", "news", "reviews"))
    docs = _docs()
    a = select_samples(tokenizer, cfg, documents=docs)
    b = select_samples(tokenizer, cfg, documents=docs)
    assert [s.sha256 for s in a.samples] == [s.sha256 for s in b.samples]
    assert len(a.samples) == 24 and len({s.sha256 for s in a.samples}) == 24
    assert a.per_source == {"news": 8, "reviews": 8, "wiki": 8}
    assert a.duplicates_removed >= 1
    assert all(16 <= len(t) <= 64 for t in a.token_ids)
    assert all(s.end - s.start == len(t) for s, t in zip(a.samples, a.token_ids))
    d = a.diversity
    assert d["coverage_radius"] < d["random_coverage_radius"]
    assert d["mean_pairwise_distance"] > d["random_mean_pairwise_distance"]
    lengths = [len(t) for t in a.token_ids]
    assert max(lengths) - min(lengths) > 20  # a mix of lengths, not only the longest windows


def test_strategies_differ(tokenizer):
    docs = _docs()
    picks = {s: [x.doc_id for x in select_samples(tokenizer, SelectConfig(num_samples=12, seq_len=64, min_len=16,
                                                                             strategy=s), documents=docs).samples]
             for s in ("diverse", "random", "first")}
    # "first": the pool's first windows, in document order (the wiki documents come first)
    indices = [int(d.split("-")[1]) for d in picks["first"]]
    assert picks["first"][0] == "wiki-0" and all(d.startswith("wiki-") for d in picks["first"])
    assert indices == sorted(indices) and picks["first"] != picks["diverse"]
    assert picks["random"] != picks["diverse"]


def test_too_few_texts_is_a_clear_error(tokenizer):
    with pytest.raises(CalqError, match="only .* distinct windows but 500 samples were requested"):
        select_samples(tokenizer, SelectConfig(num_samples=500, seq_len=64, min_len=16), documents=_docs(10))


def test_calibration_windows_start_with_the_bos_and_keep_their_length(bos_tokenizer):
    bos = bos_tokenizer.convert_tokens_to_ids("<|im_start|>")
    cfg = SelectConfig(num_samples=12, seq_len=64, min_len=16)
    sel = select_samples(bos_tokenizer, cfg, documents=_docs())
    assert all(t[0] == bos and (t[1:] != bos).all() and len(t) <= 64 for t in sel.token_ids)
    assert all(s.end - s.start == len(t) - 1 for s, t in zip(sel.samples, sel.token_ids))  # offsets count text only


def test_calibration_samples_can_be_wrapped_in_the_chat_template(tokenizer):
    import copy

    start, end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    docs = _docs()
    cfg = SelectConfig(num_samples=12, seq_len=512, min_len=16, chat_template=True)
    sel = select_samples(tokenizer, cfg, documents=docs)
    by_id = {d.doc_id: d for d in docs}
    for s, t in zip(sel.samples, sel.token_ids):  # windows of the document's templated user turn
        want = tokenizer(f"<|im_start|>user\n{by_id[s.doc_id].text}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert t.tolist() == want[s.start:s.end]
    firsts = [t for s, t in zip(sel.samples, sel.token_ids) if s.start == 0]
    assert firsts and all(t[0] == start for t in firsts) and any(end in t.tolist() for t in sel.token_ids)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(CalqError, match="the tokenizer has no chat template; set it to false"):
        select_samples(plain, cfg, documents=docs)
