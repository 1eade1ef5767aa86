"""Layer-wise sensitivity: starting each layer's forward at its own block gives the full forward's divergence; the
ranking, the stored figures and the mixed-precision budget."""
import copy

import pytest
import torch

from quant.config import ConfigError, QuantConfig
from quant.methods.base import quantizable_layers
from quant.qlinear import packed_bytes
from quant.sensitivity import (LayerSensitivity, _rtn_weight, heatmap, layer_sensitivity, measure_layers,
                               mixed_precision_overrides)
from quant.kinds.perplexity import full_kld

W4 = QuantConfig(method="rtn", bits=4, group_size=32)


@torch.no_grad()
def test_each_layer_is_measured_alone_as_a_full_forward_would(tiny_llama):
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(2))
    ranking = measure_layers(tiny_llama, ids, W4)
    assert [r.name for r in ranking] == [name for name, _, _ in quantizable_layers(tiny_llama, W4)]
    assert len(ranking) == 14 and {r.block for r in ranking} == {0, 1}
    base = torch.log_softmax(tiny_llama(ids).logits[:, :-1], -1)
    for row in (ranking[0], ranking[9]):  # a block-0 and a block-1 linear
        model = copy.deepcopy(tiny_llama)
        linear = model.get_submodule(row.name)
        linear.weight.data = _rtn_weight(linear, W4)
        logprobs = torch.log_softmax(model(ids).logits[:, :-1], -1)
        assert row.mean_kld == pytest.approx(float(full_kld(base, logprobs).mean()), rel=1e-4, abs=1e-7)
        assert row.mean_kld > 0
    # the baseline is left as it was
    assert torch.equal(torch.log_softmax(tiny_llama(ids).logits[:, :-1], -1), base)


def test_stored_figures_are_not_computed_again(tiny_llama):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    stored = {"model.layers.0.self_attn.q_proj": {"mean_kld": 0.5, "same_top_p": 0.25}}
    computed = []

    def store(name, compute):
        if name not in stored:
            computed.append(name)
            stored[name] = compute()
        return stored[name]

    ranking = measure_layers(tiny_llama, ids, W4, store)
    assert ranking[0].mean_kld == 0.5 and len(computed) == 13
    measure_layers(tiny_llama, ids, W4, store)
    assert len(computed) == 13


def _row(name, block, kld, shape=(96, 96)):
    return LayerSensitivity(f"model.layers.{block}.{name}", block, name, shape, kld, 0.5)


def test_mixed_precision_keeps_the_most_sensitive_linears_within_the_byte_budget():
    ranking = [_row("mlp.down_proj", 0, 0.3, (96, 192)), _row("self_attn.q_proj", 0, 0.1),
               _row("self_attn.k_proj", 1, 0.2), _row("mlp.up_proj", 1, 0.05, (192, 96))]
    # symmetric: codes and fp16 scales. A 96x96 linear at w4g32 stores 4608 + 576 bytes, at 8 bits per channel
    # 9216 + 192 (+4224); 96x192 (the down_proj) 9216 + 1152 and 18432 + 192 (+8256); 192x96 10368 at w4g32
    assert packed_bytes(96, 96, 4, 32, True) == 5184 and packed_bytes(96, 96, 8, 96, True) == 9408
    assert mixed_precision_overrides(ranking, W4, budget=0.0) == {}
    uniform = 10368 + 5184 + 5184 + 10368
    overrides = mixed_precision_overrides(ranking, W4, budget=(8256 + 4224) / uniform)
    assert overrides == {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": None},
                         "model.layers.1.self_attn.k_proj": {"bits": 8, "group_size": None}}
    config = QuantConfig.from_dict({"method": "rtn", "bits": 4, "group_size": 32, "layer_overrides": overrides})
    assert config.for_layer("model.layers.0.mlp.down_proj").bits == 8
    assert config.for_layer("model.layers.10.mlp.down_proj").bits == 4  # names are matched whole, from the root


def test_sensitivity_is_rtn_only_and_says_so(tmp_path):
    from quant.matrix import load_matrix
    from quant.pipeline import Workbench

    matrix = load_matrix()
    with pytest.raises(ConfigError, match="quant.gptq-w4g128: layer-wise sensitivity quantizes one linear at a time "
                                          "by RTN; name an rtn config"):
        layer_sensitivity(Workbench(matrix, "test", tmp_path), matrix.models["smollm2-135m"], "gptq-w4g128", 2)


def test_the_heatmap_is_written(tmp_path):
    ranking = [_row(name, block, 0.01 * (block + 1)) for block in range(3) for name in ("q_proj", "down_proj")]
    path = heatmap(ranking, "test", tmp_path / "heat.png")
    assert path.stat().st_size > 1000
