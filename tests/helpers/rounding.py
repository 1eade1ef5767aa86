"""What two builds of one quantized model share when only the order of float operations differed between them
(another chunking of the calibration set, another thread count, another CPU's matmul kernels).

A bf16 or fp32 matmul over another number of rows may take another summation order on some kernels (AMX, oneDNN's
blockings), so a block's outputs, and the next block's calibration inputs, can differ in their last bits. A code
at a rounding tie then flips, and GPTQ pushes that flip's error onto the columns after it, so one flip moves
others. What holds on every kernel is closeness, not bit-identity: most codes equal, and the two models much
closer to each other than either is to the float baseline. Measured across code paths on the small replicas
(default against `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` and against one thread, 2026-12-02): GPTQ
changed up to 12.3% of the codes (29.5% in the worst layer) and its KLD to the other build was up to 0.61x its
KLD to the baseline; GSQ up to 1.6% of the codes and 0.04x.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from quant.compiled import CompiledDecoder
from quant.methods.gptq import GPTQ
from quant.qlinear import QuantLinear

# The bounds every build must keep to its reference build, with headroom over the measured worst cases above.
MIN_SHARE_OF_EQUAL_CODES = 0.75
MAX_KLD_TO_REFERENCE_OVER_KLD_TO_BASELINE = 1.0
# GPTQ's H / tokens, relative Frobenius distance. Measured as above: up to 0.10 across code paths (the first block,
# whose inputs no quantized layer has touched, within 1e-5); a chunk fed another chunk's samples moved it by 0.6-1.2.
MAX_HESSIAN_DISTANCE = 0.25


# Stated tolerance of the fast kernels: they take bf16 activations (8-bit mantissa, relative rounding 2^-9) and
# accumulate in another order than the fp32 reference, so outputs differ by rounding, never by a quantization step:
# |fast - ref| <= 1e-2 x max|ref| (measured: 3e-3 on the kernels' test layers).
KERNEL_RELATIVE_TOLERANCE = 1e-2


def share_of_equal_codes(reference: torch.nn.Module, other: torch.nn.Module) -> float:
    """Of every packed layer's integer codes, the share that are equal in both models (same layer names)."""
    equal = total = 0
    others = dict(other.named_modules())
    for name, layer in reference.named_modules():
        if isinstance(layer, QuantLinear):
            codes, their_codes = layer.codes(), others[name].codes()
            equal += int((codes == their_codes).sum())
            total += codes.numel()
    if not total:
        raise AssertionError("the reference model has no packed layers to compare")
    return equal / total


@torch.no_grad()
def mean_kld(reference: torch.nn.Module, other: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(reference || other) of the next-token distributions over every position of ``ids``."""
    p = torch.log_softmax(reference(ids).logits.float(), -1)
    q = torch.log_softmax(other(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def assert_same_up_to_rounding(baseline: torch.nn.Module, reference: torch.nn.Module, other: torch.nn.Module,
                               ids: torch.Tensor, what: str) -> None:
    """``other`` is ``reference`` rebuilt with another float-operation order: most codes equal, and its KLD to
    ``reference`` within the stated share of the reference's KLD to ``baseline`` (what quantizing cost)."""
    share = share_of_equal_codes(reference, other)
    assert share >= MIN_SHARE_OF_EQUAL_CODES, f"{what}: only {share:.1%} of the codes equal"
    cost, apart = mean_kld(baseline, reference, ids), mean_kld(reference, other, ids)
    assert apart <= MAX_KLD_TO_REFERENCE_OVER_KLD_TO_BASELINE * cost, (
        f"{what}: KLD {apart:.3g} to the reference build, against {cost:.3g} from quantizing")


@contextlib.contextmanager
def gptq_hessians() -> Iterator[list[tuple[int, torch.Tensor]]]:
    """(tokens, H / tokens) of each GPTQ layer, in the order the layers are quantized."""
    hessians: list[tuple[int, torch.Tensor]] = []
    fasterquant = GPTQ.fasterquant

    def recording(self: GPTQ, *args, **kwargs):
        hessians.append((self.nsamples, self.H / self.nsamples))
        return fasterquant(self, *args, **kwargs)

    GPTQ.fasterquant = recording
    try:
        yield hessians
    finally:
        GPTQ.fasterquant = fasterquant


def assert_same_hessians(reference: list[tuple[int, torch.Tensor]], other: list[tuple[int, torch.Tensor]],
                         what: str) -> None:
    """The same layers averaged the same number of tokens (counted, not rounded: exact), into close Hessians."""
    assert [tokens for tokens, _ in other] == [tokens for tokens, _ in reference], f"{what}: other token counts"
    for number, ((_, theirs), (_, ours)) in enumerate(zip(other, reference)):
        distance = float((theirs - ours).norm() / ours.norm())
        assert distance <= MAX_HESSIAN_DISTANCE, f"{what}: Hessian {number} is {distance:.3g} away (relative)"


@torch.no_grad()
def eager_greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The eager loop's greedy decode on a dynamic cache: the ``steps`` tokens after the prefill's."""
    out = model(ids, use_cache=True)
    cache, token, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


# How far another summation order may move two logits apart: the bf16 kernels' stated 1e-2 of the largest |logit|
# (tests/unit/test_kernels.py). Tokens from one kernel judged by a model on another (inductor's weight-only GEMM template
# against ATen's int4 kernel) may be apart by both kernels' distance to the reference: twice that.
GREEDY_TIE = 1e-2
GREEDY_TIE_ACROSS_KERNELS = 2 * GREEDY_TIE


@torch.no_grad()
def assert_greedy_choices(model: torch.nn.Module, ids: torch.Tensor, tokens: torch.Tensor,
                          tie: float = GREEDY_TIE) -> None:
    """Each of ``tokens`` (another decode path's greedy continuation of ``ids``, the prefill's token first) is the
    model's greedy choice after the tokens before it, or ties with it within rounding. Bit-identical tokens would
    hold only until the first near-tie, where another summation order may pick the runner-up; teacher-forcing the
    model on the path's own tokens checks every step whatever it picked."""
    logits = model(torch.cat([ids, tokens[:, :-1]], dim=1)).logits[:, ids.shape[1] - 1:].float()
    lead = logits.amax(-1) - logits.gather(-1, tokens[..., None])[..., 0]
    allowed = tie * logits.abs().amax(-1)
    assert (lead <= allowed).all(), f"steps {(lead > allowed).nonzero()[:, 1].tolist()} chose a token that is not greedy"


def decoded(decoder: CompiledDecoder, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The decoder's greedy continuation: the prefill's token, then ``steps`` decoded ones."""
    cache, first = decoder.prefill(ids, steps)
    return torch.cat([first, decoder.decode(cache, first, steps)], dim=1)


def varied(model):
    """A tiny random model whose greedy continuation changes from token to token (at initialisation it repeats one
    token, which would hide a wrong cache position)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3) if param.dim() > 1 else None
    return model


def assert_kernel_agrees(fast: torch.Tensor, reference: torch.Tensor) -> None:
    """A fast kernel's output within KERNEL_RELATIVE_TOLERANCE of the reference's largest magnitude."""
    scale = reference.abs().max()
    assert (fast - reference).abs().max() <= KERNEL_RELATIVE_TOLERANCE * scale, float((fast - reference).abs().max() / scale)
