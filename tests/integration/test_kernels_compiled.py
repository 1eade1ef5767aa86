"""The fast layers under torch.compile: the weight-only op reaches the compiler."""
import pytest
import torch

from quant import kernels
from quant.kernels import Int4Linear, Int8Linear
from tests.helpers.models import kernel_layer
from tests.helpers.rounding import assert_kernel_agrees

pytestmark = pytest.mark.float_sensitive  # it compares two kernels


@pytest.mark.parametrize("fast_layer", [Int4Linear, Int8Linear])
@torch.no_grad()
def test_a_compiled_forward_hands_the_weight_only_op_to_the_compiler(fast_layer):
    """Eager, many rows take the dense route; traced by torch.compile, the same call is the weight-only op, which
    inductor lowers to its own kernels (the AMX int4 and int8 templates when autotuning)."""
    layer = kernel_layer(64, 256, 64, True) if fast_layer is Int4Linear else kernel_layer(64, 256, 256, True, bits=8)
    fast = fast_layer(layer, route=kernels.PrefillRoute(torch.bfloat16, 4))
    graphs = []
    compiled = torch.compile(fast, backend=lambda graph, inputs: graphs.append(graph) or graph.forward, dynamic=False)
    x = torch.randn(1, 9, 256, generator=torch.Generator().manual_seed(1))
    assert_kernel_agrees(compiled(x).float(), fast(x).float())
    targets = {str(node.target) for node in graphs[0].graph.nodes}
    op = "_weight_int4pack_mm_for_cpu" if fast_layer is Int4Linear else "_weight_int8pack_mm"
    assert any(op in target for target in targets), targets
    assert not any("linear" in target for target in targets), targets
