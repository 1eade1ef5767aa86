"""Performance, measured the way a user would feel it: time to first token (prefill of a fixed prompt), per-token
decode time and tokens per second at batch 1 and at a larger batch, model bytes from the tensors, and peak memory
as the model's weights plus what inference allocates on top (not the process's peak, which counts whatever else it
holds, such as the baseline a quantized model is compared with).

On CUDA every timed region is bracketed by CUDA events and synchronised; on CPU the thread count is recorded
with the result. Each figure is the median of ``repeats`` runs after ``warmup`` runs.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from quant.compiled import CompiledDecoder
from quant.config import ConfigError
from quant.memory import PeakAboveHeld
from quant.qlinear import model_bytes


@dataclasses.dataclass(frozen=True)
class PerfSettings:
    """How long a measurement runs (matrix.yaml profiles.<profile>.<tier>.perf)."""

    prompt_tokens: int = 512       # the prefill whose time is the time to first token
    new_tokens: int = 32           # decode steps timed at batch 1
    batch: int = 8                 # the batch for throughput at load
    batch_prompt_tokens: int = 128
    batch_new_tokens: int = 16
    warmup: int = 1
    repeats: int = 3
    # rounds of time to first token and batch-1 decode timed interleaved across a model's variants (the report's and
    # quant perf's speed-ups come from these, paired by round)
    rounds: int = 5
    # a torch.compile backend ("inductor"): also time batch-1 decode on a static KV cache through a compiled step
    # (CompiledDecoder); its first calls compile, so the warm-up runs must carry that cost, not the timed ones
    compiled: str | None = None
    # with ``compiled``: compile the prompt's forward too, for its fixed shape, with frozen weights and inductor's
    # autotuned GEMM templates (CompiledDecoder), and time it in the interleaved rounds as the compiled time to
    # first token
    compiled_prefill: bool = False
    # inductor's C++ wrapper around the compiled step's kernels instead of Python (torch._inductor.config.cpp_wrapper):
    # on this CPU 10.2 against 12.0 ms per token for smollm2 rtn-w4g128-head8, at about 3 minutes of compiling per
    # variant against 10 s
    cpp_wrapper: bool = False

    def __post_init__(self) -> None:
        if self.compiled_prefill and not self.compiled:
            raise ConfigError("perf setting compiled_prefill compiles with the `compiled` backend: set compiled "
                              "(e.g. inductor) beside it")

    @classmethod
    def from_dict(cls, raw: dict[str, int] | None) -> PerfSettings:
        unknown = set(raw or {}) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown perf setting(s) {sorted(unknown)}")
        return cls(**(raw or {}))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def variant_label(quant_name: str | None, dtype: torch.dtype | None = None) -> str:
    """How reports and benchmarks name a timed model: the quantization config, or ``baseline`` in its own
    dtype, or ``baseline-bfloat16`` when recast."""
    return quant_name or "baseline" + (f"-{dtype_name(dtype)}" if dtype else "")


def machine_facts(device: str = "cpu", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Recorded beside every result: device, library versions, thread count, dtype."""
    facts = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if dtype is not None:
        facts["dtype"] = dtype_name(dtype)
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


class Timer:
    """Seconds taken by a callable: CUDA events around it on a GPU (asynchronous kernels), else the wall clock."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, work: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            work()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        started = time.perf_counter()
        work()
        return time.perf_counter() - started


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Run the prompt; return the KV cache and the first generated token (greedy). Only the last position's
    logits are computed, as in generation (the vocabulary projection of every prompt token is not needed)."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model: torch.nn.Module, cache: Any, token: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decode ``steps`` tokens one at a time on the KV cache (which grows in place)."""
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return token


def _median(timer: Timer, settings: PerfSettings, setup: Callable[[], Any], work: Callable[[Any], Any]) -> float:
    """Median seconds of ``work(setup())`` over the repeats, after the warm-up runs; setup is not timed."""
    times = []
    for round_number in range(settings.warmup + settings.repeats):
        state = setup()
        seconds = timer(lambda: work(state))
        if round_number >= settings.warmup:
            times.append(seconds)
    return statistics.median(times)


def memory_bandwidth(device: str, megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth in bytes/s, measured STREAM-copy style: the best of ``repeats`` copies of a
    ``megabytes`` float32 buffer into another, counting the bytes read and the bytes written."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    timer = Timer(device)
    best = min(timer(lambda: target.copy_(source)) for _ in range(repeats))
    return 2 * source.numel() * source.element_size() / best


def kv_cache_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Bytes of the KV cache after ``tokens`` tokens at batch 1: keys and values of every layer, in the model's
    activation dtype (what a decode step reads besides the weights)."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * tokens * element


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Weight bytes a batch-1 decode step reads: all of them, except an input embedding matrix that the output
    projection does not share, of which a step reads one row (an untied model, or an lm_head quantized apart)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    total = model_bytes(model)
    if getattr(head, "weight", None) is not embed.weight:
        total -= (embed.weight.shape[0] - 1) * embed.weight[0].numel() * embed.weight.element_size()
    return total


def roofline(row: dict[str, Any], bandwidth: float) -> dict[str, float]:
    """Decode at batch 1 against the memory roofline: every weight and the KV cache are read once per token, so
    ``bytes_per_token`` / bandwidth is the fastest a token can be; the achieved GB/s and its share of the measured
    bandwidth say how far the kernel is from it (for the compiled decode too, when it was timed)."""
    figures = {"roofline_ms_per_token": row["bytes_per_token"] / bandwidth * 1000}
    for prefix in ("", "compiled_"):
        if f"{prefix}decode_ms_per_token" in row:
            achieved = row["bytes_per_token"] / (row[f"{prefix}decode_ms_per_token"] / 1000)
            figures.update({f"{prefix}achieved_gb_per_s": achieved / 1e9, f"{prefix}bandwidth_share": achieved / bandwidth})
    return figures


def decode_figures(decode_seconds: float, new_tokens: int, prefix: str = "") -> dict[str, float]:
    """Batch-1 decode of ``new_tokens`` tokens in ``decode_seconds``, as the report names it (``prefix``
    "compiled_" for the compiled decode)."""
    return {f"{prefix}decode_ms_per_token": decode_seconds / new_tokens * 1000,
            f"{prefix}decode_tokens_per_s": new_tokens / decode_seconds}


def latency_figures(ttft_seconds: float, decode_seconds: float, new_tokens: int) -> dict[str, float]:
    """Time to first token and batch-1 decode, as the report names them."""
    return {
        "ttft_ms": ttft_seconds * 1000,
        **decode_figures(decode_seconds, new_tokens),
        # the reference study's throughput: output tokens over the whole request, prefill included
        "output_tokens_per_s": new_tokens / (ttft_seconds + decode_seconds),
    }


# The machine is busy when other processes (or, on a VM, other guests: steal time) used more than this share of the
# CPUs during a round, or, where that share cannot be read, when the memory-copy probe moved by more than
# BUSY_PROBE_SPREAD between rounds: a timing then measures the load as much as the model (docs/measurements.md).
BUSY_CPU_SHARE = 0.20
BUSY_PROBE_SPREAD = 0.35
PROC_STAT = Path("/proc/stat")


def cpu_seconds() -> tuple[float, float, float] | None:
    """(seconds the whole machine's CPUs were busy, steal included; seconds they were counted in all; seconds this
    process used), or None where /proc/stat does not exist."""
    if not PROC_STAT.exists():
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(value) for value in PROC_STAT.read_text().split("\n", 1)[0].split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    own = os.times()
    busy = user + nice + system + irq + softirq + steal
    return busy / tick, (busy + idle + iowait) / tick, own.user + own.system


def others_share(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float | None:
    """The share of the machine's CPU time that other processes (and steal) took between two ``cpu_seconds``."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, own = (a - b for a, b in zip(after, before))
    return max(busy - own, 0.0) / total


@dataclasses.dataclass
class Rounds:
    """Seconds per round of each model, timed interleaved, and the machine probe of each round."""

    ttft: dict[str, list[float]]
    decode: dict[str, list[float]]
    probe_bytes_per_s: list[float]
    others_cpu_share: list[float | None]  # per round: what other processes (and steal) took of the CPUs
    compiled_decode: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # with ``compiled``
    compiled_ttft: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # with ``compiled_prefill``
    compile_failures: dict[str, str] = dataclasses.field(default_factory=dict)  # model -> why it did not compile
    # model -> why its prompt did not compile (with ``compiled_prefill``; its decode may have)
    prompt_failures: dict[str, str] = dataclasses.field(default_factory=dict)
    # model -> the size of its prompt's package, its own copy of the weights (with ``compiled_prefill``)
    package_bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    def busy_reason(self) -> str | None:
        """Why this pass's timings measure the machine's load, or None when the machine stayed quiet. Where the
        kernel says what other processes took of the CPUs, that decides: the memory probe alone moved 42-51% between
        rounds of a quiet 2-core VM and 6% beside a CPU hog, so it is the judge only where no CPU share is known."""
        shares = [share for share in self.others_cpu_share if share is not None]
        if shares:
            busiest = max(shares)
            return (f"machine busy (other processes took {busiest:.0%} of the CPUs in a round)"
                    if busiest > BUSY_CPU_SHARE else None)
        if self.probe_spread > BUSY_PROBE_SPREAD:
            return f"machine busy (memory probe spread {self.probe_spread:.0%})"
        return None

    @property
    def probe_spread(self) -> float:
        return relative_spread(self.probe_bytes_per_s)


@torch.no_grad()
def interleaved_latency(models: dict[str, torch.nn.Module], prompt: torch.Tensor, device: str,
                        settings: PerfSettings, rounds: int) -> Rounds:
    """Time to first token and batch-1 decode of every model, round-robin: each round probes the machine (a memory
    copy) and then times each model once, starting one model later than the round before. Load that comes and goes
    during the pass then hits every model alike, and shows in the probe and in the baseline's rounds, instead of
    landing on whichever model happened to be timed at that moment. With ``settings.compiled`` each round also
    times the compiled decode (and with ``compiled_prefill`` the compiled prompt), so that its speed-up over the
    eager baseline is a ratio of timings taken moments apart."""
    timer, ids = Timer(device), prompt[:, : settings.prompt_tokens].to(device)
    names = list(models)
    for name in names:  # warm-up: allocator, kernels' first calls
        for _ in range(settings.warmup):
            decode(models[name], *prefill(models[name], ids), settings.new_tokens)
    decoders, failures, prompt_failures = (compiled_decoders(models, ids, device, settings) if settings.compiled
                                           else ({}, {}, {}))
    result = Rounds({name: [] for name in names}, {name: [] for name in names}, [], [],
                    {name: [] for name in decoders},
                    {name: [] for name, decoder in decoders.items() if decoder.compile_prefill}, failures,
                    prompt_failures, {name: decoder.package_bytes for name, decoder in decoders.items()
                                      if decoder.package_bytes is not None})
    for number in range(rounds):
        started = cpu_seconds()
        result.probe_bytes_per_s.append(memory_bandwidth(device, megabytes=64, repeats=3))
        for name in names[number % len(names):] + names[: number % len(names)]:
            model = models[name]
            result.ttft[name].append(timer(lambda: prefill(model, ids)))
            state = prefill(model, ids)
            result.decode[name].append(timer(lambda: decode(model, *state, settings.new_tokens)))
            if decoders:
                decoder = decoders[name]
                if decoder.compile_prefill:
                    result.compiled_ttft[name].append(timer(lambda: decoder.prefill(ids, settings.new_tokens)))
                state = decoder.prefill(ids, settings.new_tokens)
                result.compiled_decode[name].append(timer(lambda: decoder.decode(*state, settings.new_tokens)))
        result.others_cpu_share.append(others_share(started, cpu_seconds()))
    return result


def compiled_decoders(models: dict[str, torch.nn.Module], ids: torch.Tensor, device: str, settings: PerfSettings
                      ) -> tuple[dict[str, CompiledDecoder], dict[str, str], dict[str, str]]:
    """Each model's ``CompiledDecoder``, compiled by one prefill and decode (never inside a timed round), with its
    prompt compiled first under ``compiled_prefill``; and why each model that did not compile failed, and each
    prompt. A machine without a C++ compiler, or a graph the compiler or the exporter refuses, costs that model its
    compiled figures (a prompt's failure: only its compiled TTFT), not the eager ones or the other models'."""
    decoders, failures, prompt_failures = {}, {}, {}
    for name, model in models.items():
        try:
            decoder = CompiledDecoder(model, device, settings.compiled, settings.cpp_wrapper)
            if settings.compiled_prefill:
                try:
                    decoder.compile_prompt(ids)
                except Exception as error:
                    prompt_failures[name] = failure_reason(error)
            decoder.decode(*decoder.prefill(ids, settings.new_tokens), settings.new_tokens)
            decoders[name] = decoder
        except Exception as error:
            failures[name] = failure_reason(error)
    return decoders, failures, prompt_failures


def failure_reason(error: Exception) -> str:
    """What a compiler raised, as a report cell: its type and first line (torch.compile wraps what its backend
    raised: that is the one shown)."""
    cause = getattr(error, "inner_exception", error)
    return f"{type(cause).__name__}: {next(iter(str(cause).strip().splitlines()), '')}"


def relative_spread(values: list[float]) -> float:
    """(largest - smallest) / median."""
    return (max(values) - min(values)) / statistics.median(values)


def paired_speedup(baseline_seconds: list[float], seconds: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) of the per-round ratio baseline / model. Each ratio pairs two timings taken in the
    same round, moments apart; over R rounds the range holds the median ratio with confidence 1 - 2 / 2^R (a sign
    test: 94% for 5 rounds)."""
    ratios = [base / own for base, own in zip(baseline_seconds, seconds)]
    return statistics.median(ratios), min(ratios), max(ratios)


def unmeasurable_reason(speedup: tuple[float, float, float], busy: str | None) -> str | None:
    """Why a speed-up is not a measurement of this run, or None: the machine was busy (``Rounds.busy_reason``), or
    the rounds' range of ratios reaches 1, so that faster and slower cannot be told apart."""
    _, low, high = speedup
    if busy:
        return f"not measurable on this run: {busy}"
    if low <= 1 <= high:
        return f"not measurable on this run: the rounds' ratios [{low:.2f}, {high:.2f}] reach 1"
    return None


def measure(model: torch.nn.Module, prompt: torch.Tensor, device: str, settings: PerfSettings,
            latency: bool = True) -> dict[str, Any]:
    """Latency, throughput and memory of ``model`` on ``prompt`` (token ids, at least ``prompt_tokens`` long).
    ``latency`` False leaves out time to first token and batch-1 decode, eager and compiled, for a caller that
    times them interleaved with other models (``interleaved_latency``)."""
    timer = Timer(device)
    ids = prompt[:, : settings.prompt_tokens].to(device)
    batch_ids = prompt[:, : settings.batch_prompt_tokens].repeat(settings.batch, 1).to(device)
    above_held = PeakAboveHeld(device)
    if latency:
        ttft = _median(timer, settings, lambda: None, lambda _: prefill(model, ids))
        decode_seconds = _median(timer, settings, lambda: prefill(model, ids),
                                 lambda state: decode(model, *state, settings.new_tokens))
    batch_seconds = _median(timer, settings, lambda: prefill(model, batch_ids),
                            lambda state: decode(model, *state, settings.batch_new_tokens))
    # read before the compiled decode: compiling is not serving
    working, weights = above_held.read(), model_bytes(model)
    compiled = {}
    if settings.compiled and latency:  # without ``latency``, the interleaved rounds time it
        decoder = CompiledDecoder(model, device, settings.compiled, settings.cpp_wrapper)
        seconds = _median(timer, settings, lambda: decoder.prefill(ids, settings.new_tokens),
                          lambda state: decoder.decode(*state, settings.new_tokens))
        compiled = decode_figures(seconds, settings.new_tokens, prefix="compiled_")
    return {
        **(latency_figures(ttft, decode_seconds, settings.new_tokens) if latency else {}),
        "batch": settings.batch,
        "batch_decode_tokens_per_s": settings.batch * settings.batch_new_tokens / batch_seconds,
        # what serving this model takes: its weights, plus the most that inference allocated on top of what was in
        # use before (activations, KV caches; PeakAboveHeld)
        "working_memory_bytes": working,
        "peak_memory_bytes": None if working is None else weights + working,
        "model_bytes": weights,
        # read per decode step at batch 1: the weights, and the KV cache halfway through the generated tokens
        "bytes_per_token": weight_bytes_per_token(model) + kv_cache_bytes(model, ids.shape[1] + settings.new_tokens // 2),
        "threads": torch.get_num_threads(),
        "settings": dataclasses.asdict(settings),
        **compiled,
    }
