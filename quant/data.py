"""Evaluation data: GSM8K, BoolQ, MS MARCO (TREC DL 2019/2020 passage ranking) and WikiText-2.

Each loader reads the files described in the shared data README from one folder (``QUANT_DATA_DIR`` or
``--data-dir``), or, with no folder set, the usual Hugging Face dataset id (needs ``pip install
datasets`` and a reachable hub). Every item is a dict with a stable string ``id``. A malformed row fails
with the file, line and field named.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


from quant.config import DATA_DIR_ENV, ConfigError, DataError

Item = dict[str, Any]

# Each loader's file under the data folder (the shared data README's layout)
LOCAL_FILES = {
    "gsm8k": Path("gsm8k/test.jsonl"),
    "boolq": Path("boolq/val.jsonl"),
    "msmarco": Path("msmarco/dl19_dl20_bm25top100_labeled.jsonl"),
    "wikitext": Path("wikitext2/wiki.test.raw"),
}


def _read_jsonl(path: Path, required: dict[str, type | tuple[type, ...]]) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (is {DATA_DIR_ENV} pointing at the shared data folder?)")
    rows = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_number}: not UTF-8 (byte {raw[error.start]:#04x} at column "
                                f"{error.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for field, kind in required.items():
                if field not in row:
                    raise DataError(f"{path}:{line_number}: missing field {field!r}")
                if not isinstance(row[field], kind):
                    raise DataError(f"{path}:{line_number}: field {field!r} has type {type(row[field]).__name__}")
            rows.append((line_number, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _hub(dataset_id: str, *args: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"no local data folder is set and the `datasets` package is missing: set {DATA_DIR_ENV}=/path/to/data "
            f"(or --data-dir), or `pip install datasets` to read {dataset_id} from the hub"
        ) from None
    try:
        return list(datasets.load_dataset(dataset_id, *args, split=split))
    except Exception as error:  # the hub's own errors vary: offline, gated, renamed
        raise ConfigError(f"cannot read {dataset_id} from the hub ({error}); set {DATA_DIR_ENV} to local data") from None


GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$")


def load_gsm8k(data_dir: Path | None) -> list[Item]:
    """GSM8K test split (1319 problems): question, worked answer, and the final number after ``####``."""
    if data_dir is None:
        rows = list(enumerate(_hub("openai/gsm8k", "main", split="test"), start=1))
        path = Path("openai/gsm8k")
    else:
        path = data_dir / LOCAL_FILES["gsm8k"]
        rows = _read_jsonl(path, {"question": str, "answer": str})
    items = []
    for line_number, row in rows:
        match = GSM8K_ANSWER.search(row["answer"])
        if not match:
            raise DataError(f"{path}:{line_number}: field 'answer' has no final '#### <number>' line")
        items.append({"id": f"gsm8k-{line_number - 1}", "question": row["question"], "answer": row["answer"],
                      "target": match.group(1)})
    return items


def load_boolq(data_dir: Path | None) -> list[Item]:
    """BoolQ dev split (3270 questions); labels normalised to bool from "true"/"false", true/false or 0/1."""
    if data_dir is None:
        rows = list(enumerate(_hub("google/boolq", split="validation"), start=1))
        path = Path("google/boolq")
    else:
        path = data_dir / LOCAL_FILES["boolq"]
        rows = _read_jsonl(path, {"question": str, "passage": str})
    items = []
    for line_number, row in rows:
        label = row.get("label", row.get("answer"))
        if isinstance(label, str) and label.lower() in ("true", "false"):
            label = label.lower() == "true"
        elif isinstance(label, (bool, int)) and label in (0, 1):
            label = bool(label)
        else:
            raise DataError(f"{path}:{line_number}: field 'label' must be true/false, got {label!r}")
        items.append({"id": f"boolq-{row.get('idx', line_number - 1)}", "question": row["question"],
                      "passage": row["passage"], "label": label})
    return _unique_ids(items, path, [line_number for line_number, _ in rows])


def _unique_ids(items: list[Item], path: Path, line_numbers: list[int]) -> list[Item]:
    """``items`` unchanged, or a DataError naming both lines of a repeated id (paired statistics pair items by id)."""
    first_line: dict[str, int] = {}
    for item, line_number in zip(items, line_numbers):
        if item["id"] in first_line:
            raise DataError(f"{path}:{line_number}: item id {item['id']!r} repeats line {first_line[item['id']]}")
        first_line[item["id"]] = line_number
    return items


def load_msmarco(data_dir: Path | None) -> list[Item]:
    """MS MARCO passage ranking, TREC DL 2019 + 2020 (97 queries, BM25 top-100 each, graded labels 0-3,
    None for unjudged), with ``judged``: the grades of every passage the qrels judge for the query (nDCG's ideal
    ranking). From the hub: MS MARCO v1.1 validation, where ``is_selected`` passages get label 3 and the judged
    passages are the query's own."""
    if data_dir is None:
        items = []
        for row in _hub("microsoft/ms_marco", "v1.1", split="validation"):
            passages = row["passages"]
            candidates = [
                {"docid": str(i), "bm25_rank": i + 1, "text": text, "label": 3 if selected else 0}
                for i, (text, selected) in enumerate(zip(passages["passage_text"], passages["is_selected"]))
            ]
            items.append({"id": f"msmarco-{row['query_id']}", "query": row["query"], "candidates": candidates,
                          "judged": [c["label"] for c in candidates]})
        return items
    path = data_dir / LOCAL_FILES["msmarco"]
    qrels: dict[str, dict[str, list[int]]] = {}
    items = []
    rows = _read_jsonl(path, {"set": str, "qid": (str, int), "query": str, "candidates": list})
    for line_number, row in rows:
        if not row["candidates"]:
            raise DataError(f"{path}:{line_number}: field 'candidates' is empty: query {row['qid']} has nothing to rank")
        candidates = []
        for position, candidate in enumerate(row["candidates"]):
            for field, kind in (("docid", (str, int)), ("bm25_rank", int), ("text", str)):
                if not isinstance(candidate.get(field), kind):
                    raise DataError(f"{path}:{line_number}: candidates[{position}].{field} missing or malformed")
            label = candidate.get("label")
            if label is not None and label not in (0, 1, 2, 3):
                raise DataError(f"{path}:{line_number}: candidates[{position}].label must be 0-3 or null, got {label!r}")
            candidates.append({"docid": str(candidate["docid"]), "bm25_rank": candidate["bm25_rank"],
                               "text": candidate["text"], "label": label})
        candidates.sort(key=lambda c: c["bm25_rank"])
        if row["set"] not in qrels:
            qrels[row["set"]] = _read_qrels(data_dir / "msmarco" / "source" / f"qrels.{row['set']}-passage.txt")
        judged = qrels[row["set"]].get(str(row["qid"]))
        if not judged:
            raise DataError(f"{path}:{line_number}: query {row['qid']} has no judgements in the {row['set']} qrels")
        items.append({"id": f"{row['set']}-{row['qid']}", "query": row["query"], "candidates": candidates,
                      "judged": judged})
    return _unique_ids(items, path, [line_number for line_number, _ in rows])


def _read_qrels(path: Path) -> dict[str, list[int]]:
    """TREC qrels (``qid 0 docid grade`` per line): the grades judged per query."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (the MS MARCO qrels, beside the candidates in the shared data)")
    grades: dict[str, list[int]] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4 or not fields[3].lstrip("-").isdigit():
            raise DataError(f"{path}:{line_number}: expected 'qid 0 docid grade', got {line!r}")
        grades.setdefault(fields[0], []).append(int(fields[3]))
    return grades


def load_wikitext(data_dir: Path | None) -> list[Item]:
    """WikiText-2 raw test text as one item. Locally the official ``wiki.test.raw`` file as is (the
    llama.cpp convention); from the hub the test rows joined with "" (the same text)."""
    if data_dir is None:
        text = "".join(row["text"] for row in _hub("Salesforce/wikitext", "wikitext-2-raw-v1", split="test"))
    else:
        path = data_dir / LOCAL_FILES["wikitext"]
        if not path.is_file():
            raise DataError(f"{path}: file not found (is {DATA_DIR_ENV} pointing at the shared data folder?)")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path}:1: the file is empty")
    return [{"id": "wikitext2-test", "text": text}]


def load_jsonl(path: Path, task_name: str) -> list[Item]:
    """A team's own task data: one item per JSON object of ``path``, its ``id`` the row's own or
    ``<task>-<line>``."""
    rows = _read_jsonl(path, {})
    items = [{**row, "id": str(row.get("id", f"{task_name}-{line_number}"))} for line_number, row in rows]
    return _unique_ids(items, path, [line_number for line_number, _ in rows])


FILE_LOADER = "jsonl"  # a task file's own data: the JSONL its data_files names (load_jsonl)
LOADERS: dict[str, Callable[[Path | None], list[Item]]] = {
    "gsm8k": load_gsm8k,
    "boolq": load_boolq,
    "msmarco": load_msmarco,
    "wikitext": load_wikitext,
}


def missing_files(loaders: list[str], data_dir: Path | None) -> list[str]:
    """What keeps ``loaders`` from reading their data, one line each (empty when every file is there): a local
    folder's missing files; with no folder, that the hub is the source (``HF_HUB_OFFLINE`` set: unreachable)."""
    if data_dir is None:
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        return [f"no data folder set ({DATA_DIR_ENV} or --data-dir): {', '.join(loaders)} would come from the hub"
                + (", which HF_HUB_OFFLINE=1 forbids" if offline else "")]
    return [f"{data_dir / LOCAL_FILES[name]}: not found (the {name} data; is {DATA_DIR_ENV} the shared data folder?)"
            for name in loaders if name in LOCAL_FILES and not (data_dir / LOCAL_FILES[name]).is_file()]


def load(name: str, data_dir: Path | None) -> list[Item]:
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ConfigError(f"unknown data loader {name!r}; known: {sorted(LOADERS)}") from None
    return loader(data_dir)


def subset(items: list[Item], limit: int | None, seed: int, exclude: set[str] = frozenset()) -> list[Item]:
    """A deterministic sample: a seeded permutation of the items, minus ``exclude``, cut to ``limit``.
    A larger limit with the same seed is a superset of a smaller one."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    chosen = [items[i] for i in order if items[i]["id"] not in exclude]
    return chosen if limit is None else chosen[:limit]
