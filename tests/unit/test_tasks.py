"""Task evaluators' figures against their definitions (quant/tasks.py): KLD over the full vocabulary as torch and
llama.cpp's --kl-divergence compute it."""
import copy
import math
import types

import pytest
import torch

from quant.kinds.perplexity import KIND as PERPLEXITY, full_kld
from quant.tasks import TaskSpec


def test_full_kld_is_torchs_kl_divergence_over_the_whole_vocabulary():
    generator = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 100, generator=generator), -1)
    q = torch.log_softmax(torch.randn(5, 100, generator=generator), -1)
    assert torch.allclose(full_kld(p, p), torch.zeros(5), atol=1e-6)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    torch.testing.assert_close(full_kld(p, q), expected)


@torch.no_grad()
def test_perplexity_reports_llama_cpps_kld_statistics_over_the_full_vocabulary(tiny_llama):
    class CharacterTokenizer:  # the text's characters as token ids: a tokenizer without a download
        def __call__(self, text, **_):
            return types.SimpleNamespace(input_ids=[ord(c) % 128 for c in text])

    task = TaskSpec("wikitext", "wikitext", "perplexity", {"window": 32, "batch_size": 2, "metrics": ["perplexity"]})
    items = [{"id": "wiki", "text": "The quick brown fox jumps over the lazy dog. " * 4}]
    same = PERPLEXITY.evaluate(tiny_llama, CharacterTokenizer(), task, items, None, "", reference_model=tiny_llama)
    assert same.metrics["mean_kld"] == pytest.approx(0, abs=1e-6) and same.metrics["same_top_p"] == 1.0
    assert same.metrics["ln_ppl_ratio"] == pytest.approx(0, abs=1e-6)

    noisy = copy.deepcopy(tiny_llama)
    noisy.lm_head.weight.add_(0.05 * torch.randn_like(noisy.lm_head.weight, generator=None))
    result = PERPLEXITY.evaluate(noisy, CharacterTokenizer(), task, items, None, "", reference_model=tiny_llama)
    ids = torch.tensor(CharacterTokenizer()(items[0]["text"]).input_ids[:5 * 32]).view(5, 32)
    per_token = full_kld(*(torch.log_softmax(m(ids).logits[:, :-1], -1) for m in (tiny_llama, noisy))).flatten()
    assert result.metrics["mean_kld"] == pytest.approx(float(per_token.mean()), rel=1e-4)
    assert result.metrics["median_kld"] == pytest.approx(float(per_token.median()), rel=1e-3)
    assert result.metrics["mean_kld_se"] == pytest.approx(float(per_token.std() / len(per_token) ** 0.5), rel=1e-3)
    base = PERPLEXITY.evaluate(tiny_llama, CharacterTokenizer(), task, items, None, "", None)
    expected = math.log(result.metrics["perplexity"] / base.metrics["perplexity"])
    assert result.metrics["ln_ppl_ratio"] == pytest.approx(expected, rel=1e-5)
