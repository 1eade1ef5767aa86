"""Loaders: the shared data as documented, malformed rows named by file and line, deterministic subsets."""
import dataclasses
import json
import types

import pytest
import torch

from quant import calibration, data
from quant.config import ConfigError, data_dir
from quant.kinds.generate import stop_criteria
from quant.kinds.lm import text_prefix
from quant.kinds.perplexity import perplexity_windows
from quant.kinds.rerank import rank_metrics
from quant.tasks import load_tasks, select_items

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


@pytest.mark.parametrize("trec_set,ndcg", [("dl19", 0.5058), ("dl20", 0.4796)])
def test_bm25_ndcg_at_10_is_anserinis_published_figure(shared, trec_set, ndcg):
    """BM25's own order of the shared candidates, scored as trec_eval's ndcg_cut.10 scores it, gives the BM25
    figures Anserini publishes for TREC DL 2019 / 2020 passage ranking (the rerank task's reference point)."""
    task = load_tasks()["msmarco"]
    items = [item for item in data.load("msmarco", shared) if item["id"].startswith(trec_set)]
    scores = [rank_metrics(item["candidates"], item["judged"], task["relevant_min"])[0] for item in items]
    assert round(sum(scores) / len(scores), 4) == ndcg


def test_msmarco_queries_without_judgements_are_refused(tmp_path):
    relative, good = GOOD["msmarco"]
    _write(tmp_path, relative, [json.dumps({**good, "qid": "9"})])
    with pytest.raises(data.DataError, match=r":1: query 9 has no judgements in the dl19 qrels"):
        data.load("msmarco", tmp_path)


def test_gsm8k_targets_are_the_numbers_after_the_hashes(shared):
    first = data.load("gsm8k", shared)[0]
    assert first["answer"].rstrip().endswith(f"#### {first['target']}")


# Files a loader reads beside its main one: the MS MARCO qrels (nDCG's judged passages).
BESIDE = {"msmarco/dl19_dl20_bm25top100_labeled.jsonl": ("msmarco/source/qrels.dl19-passage.txt", "1 0 7 2\n2 0 8 0\n")}


def _write(tmp_path, relative, lines):
    if relative in BESIDE:
        beside, text = BESIDE[relative]
        (tmp_path / beside).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / beside).write_text(text)
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


def test_a_byte_that_is_not_utf8_is_named_with_its_line(tmp_path):
    relative, good = GOOD["boolq"]
    path = _write(tmp_path, relative, [json.dumps(good)])
    path.write_bytes(path.read_bytes() + b'{"question": "caf\xe9", "passage": "p", "idx": 1, "label": "true"}\n')
    with pytest.raises(data.DataError, match=f"{path}:2: not UTF-8 \\(byte 0xe9 at column 18\\)"):
        data.load("boolq", tmp_path)


@pytest.mark.parametrize("name", ["boolq", "msmarco"])
def test_a_repeated_item_id_is_refused(tmp_path, name):
    relative, good = GOOD[name]
    path = _write(tmp_path, relative, [json.dumps(good), json.dumps(good)])
    with pytest.raises(data.DataError, match=f"{path}:2: item id .* repeats line 1"):
        data.load(name, tmp_path)


def test_a_query_with_no_candidates_is_refused(tmp_path):
    relative, good = GOOD["msmarco"]
    path = _write(tmp_path, relative, [json.dumps({**good, "candidates": []})])
    with pytest.raises(data.DataError, match=f"{path}:1: field 'candidates' is empty"):
        data.load("msmarco", tmp_path)


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


class _Characters:
    """A tokenizer stand-in: a character per token, and a BOS (id 1) before a text when ``bos`` is set."""

    def __init__(self, bos: bool) -> None:
        self.bos = bos

    def __call__(self, text, add_special_tokens=True):
        return types.SimpleNamespace(input_ids=[1] * (self.bos and add_special_tokens) + [ord(c) for c in text])


@pytest.mark.parametrize("bos", [True, False])
def test_perplexity_windows_open_with_the_tokenizers_own_prefix(bos):
    """A tokenizer that puts a BOS before a text (Llama-3) gets it at the start of every window, the text filling
    the rest without a gap; one that puts none (SmolLM2, Qwen2) gets plain windows of the text."""
    tokenizer, text = _Characters(bos), "abcdefghijklmnopqrstu"
    assert text_prefix(tokenizer) == ([1] if bos else [])
    windows = perplexity_windows(tokenizer, text, 8)
    body = [w[1:] if bos else w for w in windows]
    assert all(int(w[0]) == 1 for w in windows) == bos and all(len(w) == 8 for w in windows)
    assert "".join(chr(int(t)) for w in body for t in w) == text[: len(windows) * (7 if bos else 8)]


# ---- the hub path, on what is local: a stand-in `datasets` serves rows shaped as the hub's --------------------

HUB_ROWS = {
    ("openai/gsm8k", "main", "test"): [{"question": "q0", "answer": "2 + 2 = 4\n#### 4"},
                                       {"question": "q1", "answer": "so\n#### 1,000"}],
    ("google/boolq", "validation"): [{"question": "is it", "passage": "p", "answer": True},
                                     {"question": "is not", "passage": "p", "answer": False}],
    ("microsoft/ms_marco", "v1.1", "validation"): [
        {"query_id": 7, "query": "what", "passages": {"passage_text": ["a", "b"], "is_selected": [0, 1]}}],
    ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"): [{"text": " = A = \n"}, {"text": " b c \n"}],
}


@pytest.fixture
def hub(monkeypatch):
    requested = []

    def load_dataset(dataset_id, *args, split):
        requested.append((dataset_id, *args, split))
        return HUB_ROWS[(dataset_id, *args, split)]

    monkeypatch.setitem(__import__("sys").modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return requested


def test_without_a_data_folder_each_loader_reads_its_hub_dataset(hub):
    gsm8k, boolq = data.load("gsm8k", None), data.load("boolq", None)
    msmarco, wikitext = data.load("msmarco", None), data.load("wikitext", None)
    assert hub == [("openai/gsm8k", "main", "test"), ("google/boolq", "validation"),
                   ("microsoft/ms_marco", "v1.1", "validation"), ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert [(i["id"], i["target"]) for i in gsm8k] == [("gsm8k-0", "4"), ("gsm8k-1", "1,000")]
    assert [(i["id"], i["question"], i["passage"], i["label"]) for i in boolq] == [
        ("boolq-0", "is it", "p", True), ("boolq-1", "is not", "p", False)]
    assert msmarco == [{"id": "msmarco-7", "query": "what", "judged": [0, 3], "candidates": [
        {"docid": "0", "bm25_rank": 1, "text": "a", "label": 0}, {"docid": "1", "bm25_rank": 2, "text": "b", "label": 3}]}]
    assert wikitext == [{"id": "wikitext2-test", "text": " = A = \n b c \n"}]


@pytest.mark.parametrize("label,expected", [("true", True), ("False", False), (1, True), (0, False), (True, True)])
def test_boolq_labels_in_each_spelling(tmp_path, label, expected):
    _write(tmp_path, "boolq/val.jsonl", [json.dumps({"question": "q", "passage": "p", "label": label})])
    assert data.load("boolq", tmp_path)[0]["label"] is expected


@pytest.mark.parametrize("label", [2, -1, "yes", None])
def test_boolq_labels_outside_true_false_are_refused(tmp_path, label):
    _write(tmp_path, "boolq/val.jsonl", [json.dumps({"question": "q", "passage": "p", "label": label})])
    with pytest.raises(data.DataError, match=r"val.jsonl:1: field 'label' must be true/false"):
        data.load("boolq", tmp_path)


def test_calibration_windows_come_from_the_second_half_seeded():
    ids = torch.arange(1000)
    windows = calibration.calibration_windows(ids, samples=64, tokens=100, seed=3)
    assert windows.shape == (64, 100)
    assert bool((windows[:, 0] >= 500).all()) and bool((windows[:, -1] <= 999).all())
    assert bool((windows[:, 1:] - windows[:, :-1] == 1).all())  # contiguous text, not scattered tokens
    assert torch.equal(windows, calibration.calibration_windows(ids, 64, 100, seed=3))
    assert not torch.equal(windows, calibration.calibration_windows(ids, 64, 100, seed=4))
    assert len(set(windows[:, 0].tolist())) > 32  # drawn across the half, not one start repeated
    assert calibration.calibration_windows(torch.arange(202), 4, 100, seed=0).shape == (4, 100)  # 101 tokens in the half
    with pytest.raises(data.DataError, match="calibration text too short: 200 tokens for 100-token windows"):
        calibration.calibration_windows(torch.arange(200), 4, 100, seed=0)


def test_an_unknown_loader_is_named():
    with pytest.raises(ConfigError, match=r"unknown data loader 'squad'; known: \['boolq', 'gsm8k', 'msmarco', 'wikitext'\]"):
        data.load("squad", None)


def test_subset_without_a_limit_keeps_every_item():
    items = [{"id": str(i)} for i in range(10)]
    assert sorted(i["id"] for i in data.subset(items, None, seed=0)) == [str(i) for i in range(10)]


def test_msmarco_items_hold_what_the_reranker_reads(shared):
    item = data.load("msmarco", shared)[0]
    assert sorted(item) == ["candidates", "id", "judged", "query"] and item["query"]
    assert sorted(item["candidates"][0]) == ["bm25_rank", "docid", "label", "text"]
    assert [c["bm25_rank"] for c in item["candidates"]] == list(range(1, len(item["candidates"]) + 1))
    assert all(isinstance(c["docid"], str) and c["text"] for c in item["candidates"])


def test_the_report_profile_ranks_the_43_trec_dl_2019_queries_alone(shared):
    """``id_prefix: dl19-`` (matrix.yaml profiles.report.cpu.options.msmarco) keeps TREC DL 2019's queries: all 43
    of them at the report's limit, none of DL 2020's; a prefix no id has is refused by name."""
    msmarco = load_tasks()["msmarco"]
    dl19 = dataclasses.replace(msmarco, options={**msmarco.options, "id_prefix": "dl19-"})
    chosen = select_items(dl19, shared, 43, seed=1234)
    assert len(chosen) == len({item["id"] for item in chosen}) == 43
    assert all(item["id"].startswith("dl19-") for item in chosen)
    assert len(select_items(dl19, shared, None, seed=1234)) == 43
    nowhere = dataclasses.replace(msmarco, options={**msmarco.options, "id_prefix": "dl21-"})
    with pytest.raises(ConfigError, match="task 'msmarco': no item id starts with id_prefix 'dl21-'"):
        select_items(nowhere, shared, 10, seed=1234)
