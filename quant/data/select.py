"""Choose calibration samples for diversity, not by taking the first or random rows.

Documents are tokenized and cut into windows of at most `seq_len` tokens; exact and near duplicates
are dropped; each window gets a TF-IDF (LSA) embedding plus its log-length, and a greedy k-center
pass picks windows far from everything already chosen, under per-source quotas so every domain is
covered. The manifest records where every sample came from, so a run can be audited and reproduced.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quant.errors import CalqError
from quant.files import write_text_atomic
from quant.data.sources import Document, load_documents
from quant.schema import StrictModel

TOKENS = "samples.safetensors"


class SelectConfig(StrictModel):
    sources: tuple[str, ...] = ("wikipedia", "news", "reviews")
    num_samples: int = Field(256, ge=1, le=4096)
    seq_len: int = Field(512, ge=16)
    min_len: int = Field(64, ge=8)
    """Windows shorter than this are dropped (too little context to be representative)."""
    strategy: Literal["diverse", "random", "first"] = "diverse"
    near_duplicate: float = Field(0.9, gt=0, le=1)
    """Cosine similarity of TF-IDF vectors above which two windows count as the same text."""
    seed: int = 0
    chat_template: bool = False
    """Wrap every document in the tokenizer's chat template (as one user turn) before cutting windows, so an
    instruct model is calibrated on text shaped as it is served (what llm-compressor users do); the template writes
    its own special tokens."""


@dataclass(frozen=True)
class Sample:
    source: str
    doc_id: str
    start: int  # token offsets within the tokenized document
    end: int
    sha256: str  # of the token ids, to detect a tokenizer or data change on replay


@dataclass
class Selection:
    samples: list[Sample]
    token_ids: list[torch.Tensor]
    diversity: dict[str, float]
    per_source: dict[str, int]
    pool_size: int
    duplicates_removed: int

    def manifest(self) -> dict:
        return {"samples": [asdict(s) for s in self.samples], "diversity": self.diversity,
                "per_source": self.per_source, "pool_size": self.pool_size,
                "duplicates_removed": self.duplicates_removed}

    def save(self, directory: Path) -> None:
        """manifest.json (where every sample came from) and samples.safetensors (their token ids), into `directory`
        (an existing, e.g. temporary, directory)."""
        write_text_atomic(Path(directory) / "manifest.json", json.dumps(self.manifest(), indent=1))
        save_file({f"{i:05d}": t.contiguous() for i, t in enumerate(self.token_ids)}, Path(directory) / TOKENS)

    @classmethod
    def load(cls, directory: Path) -> Selection:
        """A selection saved by `save` (a rerun replays exactly these samples)."""
        manifest = json.loads((Path(directory) / "manifest.json").read_text())
        tensors = load_file(Path(directory) / TOKENS)
        samples = [Sample(**s) for s in manifest["samples"]]
        return cls(samples, [tensors[f"{i:05d}"] for i in range(len(samples))], manifest["diversity"],
                   manifest["per_source"], manifest["pool_size"], manifest["duplicates_removed"])


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the tokenizer puts before any text with add_special_tokens=True: a BOS for Llama-3 and Gemma
    (Llama-3 keeps its attention sink there), none for SmolLM2. Every calibration and evaluation window starts
    with them, as the model sees text in deployment; being first, they are never a prediction target."""
    text = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(text) + 1) if full[i:i + len(text)] == text), 0)
    return list(full[:start])


def _windows(docs: list[Document], tokenizer: PreTrainedTokenizerBase, cfg: SelectConfig, prefix: list[int]):
    """(doc, start, window): the documents' tokens cut into windows of at most seq_len tokens, each starting with
    the special prefix; `start` is the text's token offset in its document."""
    step = cfg.seq_len - len(prefix)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": d.text}], tokenize=False)
             for d in docs] if cfg.chat_template else [d.text for d in docs]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for doc, ids in zip(docs, encoded):
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            if len(chunk) >= cfg.min_len:
                yield doc, start, prefix + chunk


def _embed(texts: list[str], lengths: np.ndarray, seed: int) -> np.ndarray:
    """LSA embedding (unit norm) with a log-length coordinate, so length is part of diversity."""
    tfidf = TfidfVectorizer(sublinear_tf=True, min_df=2, max_features=50_000, stop_words="english").fit_transform(texts)
    dims = min(64, tfidf.shape[1] - 1, len(texts) - 1)
    lsa = normalize(TruncatedSVD(dims, random_state=seed).fit_transform(tfidf))
    loglen = np.log(lengths)
    loglen = (loglen - loglen.mean()) / (loglen.std() + 1e-8) * 0.25
    return np.hstack([lsa, loglen[:, None]]).astype(np.float64), normalize(tfidf)


def _k_center(x: np.ndarray, groups: np.ndarray, quotas: dict[int, int], start: int) -> list[int]:
    """Greedy farthest-point selection; a group whose quota is filled stops being eligible."""
    chosen = [start]
    left = dict(quotas)
    left[groups[start]] -= 1
    dist = np.linalg.norm(x - x[start], axis=1)
    dist[start] = -1
    for _ in range(sum(quotas.values()) - 1):
        eligible = np.isin(groups, [g for g, n in left.items() if n > 0])
        i = int(np.argmax(np.where(eligible, dist, -1)))
        chosen.append(i)
        left[groups[i]] -= 1
        dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1))
        dist[i] = -1
    return chosen


def _quotas(counts: dict[int, int], total: int) -> dict[int, int]:
    """Equal shares per source, capped by what a source has; leftovers go to the larger sources."""
    quotas = {g: 0 for g in counts}
    remaining = total
    while remaining > 0:
        open_groups = [g for g in counts if quotas[g] < counts[g]]
        share = max(remaining // len(open_groups), 1)
        for g in sorted(open_groups, key=lambda g: -counts[g]):
            take = min(share, counts[g] - quotas[g], remaining)
            quotas[g] += take
            remaining -= take
    return quotas


def diversity_score(emb: np.ndarray, idx: list[int]) -> dict[str, float]:
    """Mean pairwise distance of the chosen set and the pool's coverage radius (max distance of any
    pool window to its nearest chosen one; smaller = better covered)."""
    sel = emb[idx]
    pair = np.linalg.norm(sel[:, None] - sel[None], axis=-1)
    n = len(idx)
    mean_pair = float(pair.sum() / max(n * (n - 1), 1))
    nearest = np.full(len(emb), np.inf)
    for j in idx:
        nearest = np.minimum(nearest, np.linalg.norm(emb - emb[j], axis=1))
    return {"mean_pairwise_distance": mean_pair, "coverage_radius": float(nearest.max()),
            "mean_nearest_distance": float(nearest.mean())}


def select_samples(tokenizer: PreTrainedTokenizerBase, cfg: SelectConfig,
                   documents: list[Document] | None = None) -> Selection:
    """Pick `cfg.num_samples` diverse, deduplicated windows from the calibration split of `cfg.sources`."""
    docs = documents if documents is not None else [d for s in cfg.sources for d in load_documents(s, "calibration")]
    if cfg.chat_template and not tokenizer.chat_template:
        raise CalqError("calibration.chat_template is on but the tokenizer has no chat template; set it to false")
    prefix = [] if cfg.chat_template else special_prefix(tokenizer)
    pool = list(tqdm(_windows(docs, tokenizer, cfg, prefix), desc="tokenize pool", unit="window", leave=False))
    # exact duplicates (same tokens) first, then near duplicates by TF-IDF cosine.
    seen, unique = set(), []
    for doc, start, chunk in pool:
        key = hashlib.sha256(np.asarray(chunk, dtype=np.int64).tobytes()).hexdigest()
        if key not in seen:
            seen.add(key)
            unique.append((doc, start, chunk, key))
    texts = [tokenizer.decode(c[len(prefix):]) for _, _, c, _ in unique]
    if len(unique) < 3:
        raise CalqError(f"the calibration pool has {len(unique)} windows of >= {cfg.min_len} tokens; "
                        f"add sources or lower calibration.min_len")
    emb, tfidf = _embed(texts, np.array([len(c) for _, _, c, _ in unique], dtype=np.float64), cfg.seed)
    keep = np.ones(len(unique), dtype=bool)
    for i in range(len(unique)):
        if keep[i]:
            sims = (tfidf[i + 1:] @ tfidf[i].T).toarray().ravel()
            keep[i + 1:] &= sims <= cfg.near_duplicate
    idx_pool = np.flatnonzero(keep)
    duplicates = len(pool) - len(idx_pool)
    if len(idx_pool) < cfg.num_samples:
        raise CalqError(f"the calibration pool has only {len(idx_pool)} distinct windows but {cfg.num_samples} "
                        f"samples were requested; lower calibration.num_samples or add sources")
    sources = sorted({unique[i][0].source for i in idx_pool})
    groups = np.array([sources.index(unique[i][0].source) for i in idx_pool])
    emb_pool = emb[idx_pool]
    rng = np.random.default_rng(cfg.seed)
    if cfg.strategy == "first":
        chosen = list(range(cfg.num_samples))
    elif cfg.strategy == "random":
        chosen = sorted(rng.choice(len(idx_pool), cfg.num_samples, replace=False).tolist())
    else:
        quotas = _quotas({g: int((groups == g).sum()) for g in range(len(sources))}, cfg.num_samples)
        centroid = emb_pool.mean(0)
        start = int(np.argmin(np.linalg.norm(emb_pool - centroid, axis=1)))  # the most typical window
        chosen = _k_center(emb_pool, groups, quotas, start)
    diversity = diversity_score(emb_pool, chosen)
    randoms = [diversity_score(emb_pool, rng.choice(len(idx_pool), cfg.num_samples, replace=False).tolist())
               for _ in range(3)]
    for key in list(diversity):
        diversity[f"random_{key}"] = float(np.mean([r[key] for r in randoms]))
    samples, token_ids = [], []
    for j in chosen:
        doc, start, chunk, key = unique[idx_pool[j]]
        samples.append(Sample(doc.source, doc.doc_id, start, start + len(chunk) - len(prefix), key))
        token_ids.append(torch.tensor(chunk, dtype=torch.long, device="cpu"))
    per_source = {s: int(sum(1 for x in samples if x.source == s)) for s in sources}
    return Selection(samples, token_ids, diversity, per_source, len(pool), duplicates)
