"""The user's own evaluation tasks: multiple-choice and free-text task files, read and checked before any model loads.

A task file is a local .jsonl/.json/.csv/.parquet read through `datasets` (`sources.read_table`), with configurable
field names. Every problem a file can have (missing file or field, an empty file, duplicate ids, an answer out of
range, a choice list of one) is one CalqError line naming the file, the line (row for .json/.parquet) and the fix,
raised when the recipe loads.

Items are split like MMLU's: `fit` when int(sha1("<task>:<id>")) % 4 == 3 (kept apart for fitting, never
reported), else `report`. Optional k-shot examples come from a separate split of the same file (a split column),
drawn once per task with the task's seed, so every item sees the same examples.

Built-in tasks (`path: builtin:<name>`): `wiki_next_sentence`, built offline from held-out Wikipedia (see
`next_sentence_rows`), and `facts`, a shipped file of simple factual questions (quant/data/task_files/facts.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from quant.data.sources import load_documents, read_table
from quant.errors import CalqError
from quant.schema import StrictModel

TASK_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TASK_NAME = r"[A-Za-z0-9_-]+"
BUILTIN = "builtin:"
TASK_FILES = Path(__file__).parent / "task_files"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TaskFields(StrictModel):
    """Column names in the task file."""

    id: str | None = None
    """Item ids (must be unique); absent: the row number."""
    question: str = "question"
    choices: str | tuple[str, ...] = "choices"
    """Multiple choice: one column holding a list (a JSON list in .csv), or several columns, one per choice."""
    answer: str = "answer"
    """Multiple choice: a 0-based index, a choice's text or its letter; free text: one accepted answer or a list."""
    split: str | None = None
    """A column naming each row's split (needed for k-shot examples)."""


class TaskConfig(StrictModel):
    name: str = Field(pattern=TASK_NAME)
    """Names the task in the report and in gates: task.<name>.<metric>."""
    path: str
    """A task file, or builtin:wiki_next_sentence / builtin:facts."""
    kind: Literal["multiple_choice", "free_text"]
    fields: TaskFields = TaskFields()
    scoring: Literal["loglikelihood", "letters"] = "loglikelihood"
    """Multiple choice: each choice's log-likelihood as a continuation (lm-eval's multiple_choice), or the
    probabilities of the answer letters after a lettered prompt (as MMLU)."""
    normalization: Literal["sum", "per_char"] = "sum"
    """loglikelihood: the choice score the prediction and its confidence use: the summed log-likelihood (lm-eval's
    acc) or the log-likelihood per character of the choice (acc_norm). Both accuracies are reported."""
    split: str = "test"
    """With fields.split: the rows evaluated."""
    shots: int = Field(0, ge=0)
    shot_split: str = "dev"
    """With fields.split: the rows k-shot examples are drawn from."""
    seed: int = 0
    chat_template: bool = False
    prompt: str = "Question: {question}\nAnswer:"
    """How a question is asked (plain prompts; with the chat template the question alone is the user turn)."""
    max_items: int | None = Field(None, ge=1)
    """Evaluate at most this many report items (the first ones in file order); null: all."""
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    """Free text: greedy generation stops at the end-of-sequence token or after this many tokens."""
    match: Literal["exact", "normalized", "contains"] = "contains"
    """Free text: an answer is right when it equals an accepted one (exact, after stripping), equals it after
    normalisation (lower case, no punctuation, articles or extra spaces), or contains it (normalised, whole words)."""

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        if "{question}" not in self.prompt:
            raise ValueError(f"task {self.name}: prompt must contain {{question}}")
        if self.kind == "free_text" and self.scoring == "letters":
            raise ValueError(f"task {self.name}: letter scoring is for multiple_choice tasks")
        if self.shots and self.fields.split is None:
            raise ValueError(f"task {self.name}: shots need a split column (fields.split) holding "
                             f"{self.shot_split!r} rows to draw them from")
        return self


@dataclass(frozen=True)
class TaskItem:
    item_id: str
    where: str
    """file:line (or file row N): what an error or a report names."""
    question: str
    choices: tuple[str, ...] = ()
    answer: int = -1
    """Multiple choice: 0-based index of the right choice."""
    answers: tuple[str, ...] = ()
    """Free text: every accepted answer."""


@dataclass(frozen=True)
class Task:
    config: TaskConfig
    items: list[TaskItem]
    """The report split (what is scored and reported)."""
    shots: list[TaskItem]
    fit: list[TaskItem]
    """Items of the fit split, never reported (what a confidence probe is fitted on)."""
    dropped: int
    """Report items beyond max_items, not evaluated (shown in the report)."""

    @property
    def held_out(self) -> int:
        return len(self.fit)


def _hash_mod4(key: str) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 4


def _resolve(cfg: TaskConfig) -> Path | str:
    if cfg.path.startswith(BUILTIN):
        name = cfg.path[len(BUILTIN):]
        if name == "wiki_next_sentence":
            return name
        shipped = TASK_FILES / f"{name}.jsonl"
        if not shipped.is_file():
            known = ["wiki_next_sentence", *sorted(p.stem for p in TASK_FILES.glob("*.jsonl"))]
            raise CalqError(f"task {cfg.name}: unknown built-in task {cfg.path!r}; choose from "
                            + ", ".join(BUILTIN + k for k in known))
        return shipped
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise CalqError(f"task {cfg.name}: task file {path} does not exist; fix evaluation.tasks path "
                        f"(a {'/'.join(TASK_SUFFIXES)} file, or builtin:wiki_next_sentence)")
    if path.suffix.lower() not in TASK_SUFFIXES:
        raise CalqError(f"task {cfg.name}: {path} is not a {'/'.join(TASK_SUFFIXES)} file; convert it or rename it")
    return path


def _locations(path: Path, n: int) -> list[str]:
    """Where each row sits, as a person finds it: a line of .jsonl/.csv, a row of .json/.parquet."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        lines = [i for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
                 if line.strip()]
        if len(lines) == n:
            return [f"{path}:{i}" for i in lines]
    if suffix == ".csv":
        return [f"{path}:{i + 2}" for i in range(n)]  # line 1 is the header
    return [f"{path} row {i}" for i in range(n)]


def _rows(cfg: TaskConfig) -> tuple[list[dict[str, Any]], list[str], str]:
    """(rows, where each row is, what to call the source)."""
    source = _resolve(cfg)
    if source == "wiki_next_sentence":
        rows = next_sentence_rows()
        return rows, [f"{BUILTIN}wiki_next_sentence item {i}" for i in range(len(rows))], cfg.path
    if source.stat().st_size == 0:
        raise CalqError(f"{source}:1: the task file is empty; add one item per line (fields "
                        f"{cfg.fields.question!r}, {cfg.fields.answer!r})")
    ds = read_table(source)
    if len(ds) == 0:
        raise CalqError(f"{source}:1: the task file has no items; add one item per line")
    return ds.to_list(), _locations(source, len(ds)), str(source)


def _field(row: dict, key: str, where: str, columns: list[str], cfg: TaskConfig) -> Any:
    if key not in row:
        raise CalqError(f"{where}: no field {key!r} (fields present: {', '.join(columns)}); rename the column "
                        f"or set evaluation.tasks[{cfg.name}].fields")
    value = row[key]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise CalqError(f"{where}: field {key!r} is missing or empty; fill it in or remove the item")
    return value


def _choices(row: dict, where: str, columns: list[str], cfg: TaskConfig) -> tuple[str, ...]:
    keys = cfg.fields.choices
    if isinstance(keys, tuple):
        choices = [_field(row, k, where, columns, cfg) for k in keys]
    else:
        choices = _field(row, keys, where, columns, cfg)
        if isinstance(choices, str) and choices.lstrip().startswith("["):
            try:
                choices = json.loads(choices)
            except ValueError:
                pass
        if not isinstance(choices, list):
            raise CalqError(f"{where}: field {keys!r} is not a list of choices; write a list (a JSON list in .csv) "
                            "or name one column per choice in fields.choices")
    choices = tuple(str(c) for c in choices)
    if len(choices) < 2:
        raise CalqError(f"{where}: only {len(choices)} choice; multiple choice needs 2 or more (add choices, "
                        "or use kind: free_text)")
    return choices


def _answer_index(value: Any, choices: tuple[str, ...], where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CalqError(f"{where}: answer {value!r} is neither an index nor a choice; give a 0-based index, "
                        "the choice's text or its letter")
    if isinstance(value, (int, float)):
        if value != int(value) or not 0 <= value < len(choices):
            raise CalqError(f"{where}: answer {value!r} is out of range for {len(choices)} choices; give a 0-based "
                            f"index 0..{len(choices) - 1} in field {key!r}")
        return int(value)
    text = value.strip()
    if text in choices:
        return choices.index(text)
    if len(text) == 1 and text.upper() in LETTERS:
        k = LETTERS.index(text.upper())
        if k < len(choices):
            return k
        raise CalqError(f"{where}: answer letter {text!r} is out of range for {len(choices)} choices; use "
                        f"{LETTERS[0]}..{LETTERS[len(choices) - 1]}")
    raise CalqError(f"{where}: answer {value!r} is not one of the choices; give its 0-based index, its letter or "
                    "the exact text of a choice")


def _item(row: dict, i: int, where: str, columns: list[str], cfg: TaskConfig) -> TaskItem:
    f = cfg.fields
    item_id = str(_field(row, f.id, where, columns, cfg)) if f.id else f"row:{i}"
    question = str(_field(row, f.question, where, columns, cfg))
    answer = _field(row, f.answer, where, columns, cfg)
    if cfg.kind == "multiple_choice":
        choices = _choices(row, where, columns, cfg)
        return TaskItem(item_id, where, question, choices, _answer_index(answer, choices, where, f.answer))
    answers = tuple(str(a).strip() for a in (answer if isinstance(answer, list) else [answer]) if str(a).strip())
    if not answers:
        raise CalqError(f"{where}: no accepted answer in field {f.answer!r}; give a string or a list of strings")
    return TaskItem(item_id, where, question, answers=answers)


def load_task(cfg: TaskConfig) -> Task:
    """Read and check a task: every item, its split, its shots. Seconds, no model involved."""
    rows, where, _ = _rows(cfg)
    columns = list(rows[0])
    f = cfg.fields
    if f.split is not None and f.split not in columns:
        raise CalqError(f"{where[0]}: no split field {f.split!r} (fields present: {', '.join(columns)}); rename "
                        f"the column or set evaluation.tasks[{cfg.name}].fields.split")
    evaluated, shot_pool, seen = [], [], {}
    for i, (row, loc) in enumerate(zip(rows, where)):
        item = _item(row, i, loc, columns, cfg)
        if item.item_id in seen:
            raise CalqError(f"{loc}: duplicate id {item.item_id!r} (first at {seen[item.item_id]}); give every "
                            "item its own id")
        seen[item.item_id] = loc
        split = None if f.split is None else str(row.get(f.split))
        if split is None or split == cfg.split:
            evaluated.append(item)
        elif split == cfg.shot_split:
            shot_pool.append(item)
    if not evaluated:
        raise CalqError(f"{where[0]}: no item has {f.split} == {cfg.split!r}; set evaluation.tasks[{cfg.name}].split")
    if len(shot_pool) < cfg.shots:
        raise CalqError(f"{where[0]}: {cfg.shots} shots asked for but only {len(shot_pool)} rows have {f.split} == "
                        f"{cfg.shot_split!r}; lower shots or add {cfg.shot_split!r} rows")
    shots = random.Random(cfg.seed).sample(shot_pool, cfg.shots) if cfg.shots else []
    report = [it for it in evaluated if _hash_mod4(f"{cfg.name}:{it.item_id}") != 3]
    fit = [it for it in evaluated if _hash_mod4(f"{cfg.name}:{it.item_id}") == 3]
    if not report:
        raise CalqError(f"{where[0]}: all {len(evaluated)} items fall in the fit split; add items")
    kept = report[:cfg.max_items] if cfg.max_items else report
    return Task(cfg, kept, shots, fit, len(report) - len(kept))


# ----------------------------------------------------------------------------------------------------
# the built-in next-sentence task

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(text: str) -> list[str]:
    out = []
    for para in text.split("\n"):
        out += [s.strip() for s in _SENTENCE.split(para) if 40 <= len(s.strip()) <= 200]
    return out


def next_sentence_rows(items: int = 120, context: int = 2, distractors: int = 3, seed: int = 0) -> list[dict]:
    """Pick the true next sentence of a held-out Wikipedia passage among sentences of other articles.

    From the evaluation split only (calibration samples never come from it), deterministic: articles in title order,
    passages of `context` consecutive sentences followed by the true one, spread over the articles round-robin;
    distractors are drawn by a seeded generator from other articles. The answer's position is seeded too."""
    sents = {d.doc_id: _sentences(d.text) for d in load_documents("wikipedia", "evaluation")}
    passages: dict[str, list[int]] = {k: list(range(context, len(v), context + 1)) for k, v in sents.items()}
    rng = random.Random(seed)
    rows = []
    titles = [t for t in sorted(passages) if passages[t]]
    while len(rows) < items and any(passages[t] for t in titles):
        for title in titles:
            if not passages[title] or len(rows) >= items:
                continue
            j = passages[title].pop(0)
            others = [t for t in titles if t != title]
            wrong = [rng.choice(sents[t]) for t in rng.sample(others, distractors)]
            choices = wrong[:]
            answer = rng.randrange(distractors + 1)
            choices.insert(answer, sents[title][j])
            rows.append({"id": f"{title}#{j}", "question": " ".join(sents[title][j - context:j]),
                         "choices": choices, "answer": answer})
    return rows
