"""Loaders: the shared data as documented, malformed rows named by file and line, deterministic subsets."""
import json

import pytest

from quant import data
from quant.config import data_dir
from quant.tasks import load_tasks, select_items, stop_criteria

SHARED_COUNTS = {"gsm8k": 1319, "boolq": 3270, "msmarco": 97, "wikitext": 1}


@pytest.fixture(scope="module")
def shared():
    folder = data_dir()
    if folder is None:
        pytest.skip("QUANT_DATA_DIR is not set (make test sets it to ../shared/data)")
    return folder


@pytest.mark.parametrize("name", sorted(SHARED_COUNTS))
def test_shared_data_loads_with_documented_counts(shared, name):
    items = data.load(name, shared)
    assert len(items) == SHARED_COUNTS[name]
    assert len({item["id"] for item in items}) == len(items)


def test_boolq_labels_match_the_data_readme(shared):
    labels = [item["label"] for item in data.load("boolq", shared)]
    assert labels.count(True) == 2033 and labels.count(False) == 1237


def test_gsm8k_targets_are_the_numbers_after_the_hashes(shared):
    first = data.load("gsm8k", shared)[0]
    assert first["answer"].rstrip().endswith(f"#### {first['target']}")


def _write(tmp_path, relative, lines):
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {
    "gsm8k": ("gsm8k/test.jsonl", {"question": "1+1?", "answer": "2\n#### 2"}),
    "boolq": ("boolq/val.jsonl", {"question": "q", "passage": "p", "idx": 0, "label": "true"}),
    "msmarco": ("msmarco/dl19_dl20_bm25top100_labeled.jsonl",
                {"set": "dl19", "qid": "1", "query": "q", "candidates": [
                    {"docid": "7", "bm25_rank": 1, "bm25_score": 1.0, "text": "t", "label": 2}]}),
}
BAD = {
    "gsm8k": ({"question": "1+1?", "answer": "2 with no final line"}, "answer"),
    "boolq": ({"question": "q", "passage": "p", "idx": 1, "label": "maybe"}, "label"),
    "msmarco": ({"set": "dl19", "qid": "2", "query": "q", "candidates": [{"docid": "8", "text": "t"}]},
                "candidates[0].bm25_rank"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_row_names_file_line_and_field(tmp_path, name):
    relative, good = GOOD[name]
    bad, field = BAD[name]
    path = _write(tmp_path, relative, [json.dumps(good), json.dumps(bad)])
    with pytest.raises(data.DataError) as error:
        data.load(name, tmp_path)
    assert f"{path}:2" in str(error.value) and field in str(error.value)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_broken_json_and_missing_fields_are_named(tmp_path, name):
    relative, good = GOOD[name]
    path = _write(tmp_path, relative, [json.dumps(good), "{not json"])
    with pytest.raises(data.DataError, match=f"{path}:2: not valid JSON"):
        data.load(name, tmp_path)
    first_field = next(iter(good))
    path = _write(tmp_path, relative, [json.dumps({k: v for k, v in good.items() if k != first_field})])
    with pytest.raises(data.DataError, match=f"{path}:1: missing field '{first_field}'"):
        data.load(name, tmp_path)


def test_missing_file_says_which_setting_to_fix(tmp_path):
    with pytest.raises(data.DataError, match="QUANT_DATA_DIR"):
        data.load("wikitext", tmp_path)


def test_subsets_are_deterministic_nested_and_exclude_exemplars():
    items = [{"id": str(i)} for i in range(100)]
    small, again = data.subset(items, 10, seed=3), data.subset(items, 10, seed=3)
    assert small == again
    assert data.subset(items, 30, seed=3)[:10] == small
    assert data.subset(items, 10, seed=4) != small
    assert not {"0", "1"} & {i["id"] for i in data.subset(items, None, seed=3, exclude={"0", "1"})}


def test_gsm8k_fewshot_exemplars_are_never_scored(shared):
    task = load_tasks()["gsm8k"]
    items = select_items(task, shared, None, seed=0)
    assert not set(task["fewshot_ids"]) & {item["id"] for item in items}
    assert items[0]["fewshot"].count("Question:") == task["num_fewshot"]


def test_the_stop_string_criterion_is_built_once_per_tokenizer_and_stop_strings(small_tokenizer):
    first = stop_criteria(small_tokenizer, ["Question:", "\n\n\n"])
    assert stop_criteria(small_tokenizer, ["Question:", "\n\n\n"]) is first
    assert stop_criteria(small_tokenizer, ["Question:"]) is not first
    assert stop_criteria(small_tokenizer, []) is None
