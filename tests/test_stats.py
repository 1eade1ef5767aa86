import copy
import math
import types

import pytest

import torch

from quant import stats
from quant.tasks import TaskSpec, evaluate_perplexity, full_kld


def test_mcnemar_exact_matches_the_binomial_test():
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


def test_ranking_metrics():
    assert stats.ndcg_at_k([3, 2, 0], [3, 2, 0], 10) == pytest.approx(1.0)
    assert stats.ndcg_at_k([0, 0, 3], [3, 0, 0], 10) == pytest.approx(1 / 2)  # log2(4) = 2
    # trec_eval: the grade is the gain (not 2^g - 1), and the ideal counts judged passages never ranked
    assert stats.ndcg_at_k([1, 3], [3, 1], 10) == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))
    assert stats.ndcg_at_k([2], [2, 2], 10) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert stats.mrr_at_k([False, True], 10) == 0.5
    assert stats.mrr_at_k([False] * 12, 10) == 0.0


def test_roc_auc_and_chance():
    assert stats.roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert stats.roc_auc([1, 1], [True, False]) == 0.5
    assert stats.chance_rate([{"label": True}] * 3 + [{"label": False}]) == 0.75


def _items(correct):
    return [{"id": str(i), "correct": c} for i, c in enumerate(correct)]


def test_retention_interval_contains_the_estimate_and_is_seeded():
    base = _items([True] * 60 + [False] * 40)
    quant = _items([True] * 50 + [False] * 10 + [True] * 5 + [False] * 35)
    value = stats.retention(0.60, 0.55, "accuracy")
    low, high = stats.retention_interval(base, quant, "accuracy")
    assert low < value < high
    assert (low, high) == stats.retention_interval(base, quant, "accuracy")
    assert stats.flips(base, quant) == {"correct_to_wrong": 10, "wrong_to_correct": 5}


def test_retention_of_a_zero_baseline_is_undefined():
    assert stats.retention(0.0, 0.1, "accuracy") is None
    verdict = stats.judge("accuracy", 0.0, 0.0, None, 40, 0.9, informative=True)
    assert verdict.status == "uninformative" and "undefined" in verdict.reason


@pytest.mark.parametrize("interval,strict,status", [
    ((0.70, 0.85), False, "fail"), ((0.92, 1.05), False, "pass"),
    ((0.85, 0.95), False, "inconclusive"), ((0.85, 0.95), True, "fail"),
])
def test_gate_rules(interval, strict, status):
    verdict = stats.judge("accuracy", 0.5, 0.46, interval, 100, 0.9, informative=True, strict=strict)
    assert verdict.status == status
    if status == "inconclusive":
        assert "n=100" in verdict.reason and "would settle it" in verdict.reason


def test_uninformative_rows_are_gated_on_the_fallback_signal():
    keep = stats.judge("accuracy", 0.5, 0.1, (0.1, 0.3), 50, 0.9, informative=False,
                       fallback=("score correlation", 0.8, 0.3))
    drop = stats.judge("accuracy", 0.5, 0.5, (0.9, 1.1), 50, 0.9, informative=False,
                       fallback=("score correlation", 0.1, 0.3))
    assert keep.status == "uninformative" and drop.status == "fail"


def test_perplexity_retention_is_inverted():
    assert stats.retention(10.0, 12.5, "perplexity") == pytest.approx(0.8)


def test_full_kld_is_torchs_kl_divergence_over_the_whole_vocabulary():
    generator = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 100, generator=generator), -1)
    q = torch.log_softmax(torch.randn(5, 100, generator=generator), -1)
    assert torch.allclose(full_kld(p, p), torch.zeros(5), atol=1e-6)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    torch.testing.assert_close(full_kld(p, q), expected)
    # what the earlier estimator missed: mass outside p's top 10 carries most of this divergence
    top = p.topk(10, dim=-1).indices
    p_top, q_top = p.gather(-1, top).exp(), q.gather(-1, top).exp()
    bucketed = (p_top * (p_top.log() - q_top.log())).sum(-1) + (1 - p_top.sum(-1)) * (
        (1 - p_top.sum(-1)).log() - (1 - q_top.sum(-1)).log())
    assert (bucketed < full_kld(p, q)).all()


def test_divergence_bounds_turn_a_pass_into_a_fail():
    passed = stats.Verdict("pass", "ok")
    metrics = {"mean_kld": 0.5, "same_top_p": 0.6}
    assert stats.judge_divergence(passed, metrics, 0.1, None).failed
    assert stats.judge_divergence(passed, metrics, None, 0.8).failed
    assert not stats.judge_divergence(passed, metrics, 1.0, 0.5).failed


@torch.no_grad()
def test_perplexity_reports_llama_cpps_kld_statistics_over_the_full_vocabulary(tiny_llama):
    class CharacterTokenizer:  # the text's characters as token ids: a tokenizer without a download
        def __call__(self, text, **_):
            return types.SimpleNamespace(input_ids=[ord(c) % 128 for c in text])

    task = TaskSpec("wikitext", "wikitext", "perplexity", "perplexity", {"window": 32, "batch_size": 2})
    items = [{"id": "wiki", "text": "The quick brown fox jumps over the lazy dog. " * 4}]
    same = evaluate_perplexity(tiny_llama, CharacterTokenizer(), task, items, reference_model=tiny_llama)
    assert same.metrics["mean_kld"] == pytest.approx(0, abs=1e-6) and same.metrics["same_top_p"] == 1.0
    assert same.metrics["ln_ppl_ratio"] == pytest.approx(0, abs=1e-6)

    noisy = copy.deepcopy(tiny_llama)
    noisy.lm_head.weight.add_(0.05 * torch.randn_like(noisy.lm_head.weight, generator=None))
    result = evaluate_perplexity(noisy, CharacterTokenizer(), task, items, reference_model=tiny_llama)
    ids = torch.tensor(CharacterTokenizer()(items[0]["text"]).input_ids[:5 * 32]).view(5, 32)
    per_token = full_kld(*(torch.log_softmax(m(ids).logits[:, :-1], -1) for m in (tiny_llama, noisy))).flatten()
    assert result.metrics["mean_kld"] == pytest.approx(float(per_token.mean()), rel=1e-4)
    assert result.metrics["median_kld"] == pytest.approx(float(per_token.median()), rel=1e-3)
    assert result.metrics["mean_kld_se"] == pytest.approx(float(per_token.std() / len(per_token) ** 0.5), rel=1e-3)
    base = evaluate_perplexity(tiny_llama, CharacterTokenizer(), task, items)
    expected = math.log(result.metrics["perplexity"] / base.metrics["perplexity"])
    assert result.metrics["ln_ppl_ratio"] == pytest.approx(expected, rel=1e-5)
