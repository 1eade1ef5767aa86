"""A model's forward compiled for fixed shapes: greedy decode on a preallocated (static) KV cache through a
``torch.compile``d step, optionally with the prompt's forward compiled too, the attention that step runs on the
CPU, and where inductor keeps what it compiled."""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from quant.config import cache_dir


KV_HEAD_ATTENTION = "quant_sdpa_on_kv_heads"


def sdpa_on_kv_heads(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except for one query token under a mask (a decode step on a static cache):
    there its traced path repeats every key/value head once per query head sharing it, a copy of the whole cache
    per layer per token (1.5 of 14 ms per token for smollm2 on this CPU), where SDPA's ``enable_gqa`` reads the
    shared heads in place."""
    if query.shape[2] > 1 or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling"), enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(KV_HEAD_ATTENTION, sdpa_on_kv_heads)
AttentionMaskInterface.register(KV_HEAD_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """The model's attention through ``name`` (a transformers AttentionInterface entry) for the duration."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


# The prompt's compile: inductor's C++ GEMM templates beside ATen's kernels, each GEMM shape timed once (the
# autotuning is cached on disk). They include weight-only int4 and int8 micro-kernels on AMX, which run a 4-bit
# prefill as fast as a bf16 one where ATen's int4 kernel is several times slower (docs/measurements.md). No
# captured graph: a prompt runs once per request, and the next replay would overwrite its output.
PREFILL_INDUCTOR_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "triton.cudagraphs": False}


class CompiledDecoder:
    """Greedy batch-1 decode on a preallocated (static) KV cache through a ``torch.compile``d step. The eager loop
    pays a kernel launch per op per token, which bounds a small model's decode far above its bandwidth floor;
    fixed shapes let the compiler fuse the step, and on CUDA replay it as one captured graph
    (``triton.cudagraphs``, what ``mode="reduce-overhead"`` sets). ``backend="eager"`` runs the same static-cache
    path without compiling (tests).

    The model must not change once the decoder is made: the step keeps no guards on its modules (checking every
    parameter before each step cost about 1 ms per token on this CPU), and its compiled entries are its own
    (``isolate_recompiles``), so another decoder's model never runs through them. On the CPU the step attends
    on the shared key/value heads (``sdpa_on_kv_heads``); on CUDA it stays on transformers' SDPA path, whose
    masked GQA would fall back to the math kernel there. ``compile_prefill`` compiles the prompt's forward as well
    (``PREFILL_INDUCTOR_OPTIONS``, weights frozen into its graph), for the fixed prompt shape it is first called with."""

    def __init__(self, model: torch.nn.Module, device: str, backend: str = "inductor", cpp_wrapper: bool = False,
                 compile_prefill: bool = False) -> None:
        self.model = model
        self.attention = KV_HEAD_ATTENTION if device == "cpu" else model.config._attn_implementation
        options: dict[str, Any] = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if backend == "inductor":
            options.update({"triton.cudagraphs": device.startswith("cuda"), "cpp_wrapper": cpp_wrapper})
        elif cpp_wrapper:
            raise ValueError(f"cpp_wrapper is an inductor option; the {backend!r} backend has no wrapper to replace")
        self.step = torch.compile(self._step, backend=backend, options=options, fullgraph=True, dynamic=False,
                                  isolate_recompiles=True)
        self.prompt = self._prompt
        self.frozen = contextlib.nullcontext
        if compile_prefill:
            self.prompt = torch.compile(self._prompt, backend=backend, options={**options, **(
                PREFILL_INDUCTOR_OPTIONS if backend == "inductor" else {})}, fullgraph=True, dynamic=False,
                isolate_recompiles=True)
            if backend == "inductor":
                # inductor reads freezing before a call's own options apply; the weights become constants of the
                # prompt's graph, which the GEMM templates require of the weight they take
                self.frozen = functools.partial(torch._inductor.config.patch, freezing=True)

    def _step(self, token: torch.Tensor, cache: transformers.StaticCache) -> torch.Tensor:
        # the cache counts its own length (positions and the slots to write follow from it)
        return self.model(token, past_key_values=cache, use_cache=True).logits.argmax(-1)

    def _prompt(self, ids: torch.Tensor, cache: transformers.StaticCache) -> torch.Tensor:
        return self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, new_tokens: int) -> tuple[transformers.StaticCache, torch.Tensor]:
        """The prompt into a static cache with room for ``new_tokens`` more: (cache, first token). Eager unless the
        decoder was made with ``compile_prefill``."""
        cache = transformers.StaticCache(config=self.model.config, max_cache_len=ids.shape[1] + new_tokens)
        with self.frozen():
            return cache, self.prompt(ids, cache)

    @torch.no_grad()
    def decode(self, cache: transformers.StaticCache, token: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` greedy tokens after those in the cache; returns them, [batch, steps]."""
        tokens = []
        with attention_implementation(self.model, self.attention):
            for _ in range(steps):
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's output is consumed: reuse its memory
                token = self.step(token, cache).clone()
                tokens.append(token)
        return torch.cat(tokens, dim=1)


def use_compile_cache(root: Path | None = None) -> Path:
    """Keep inductor's compiled code under ``root`` (default: the result cache's ``inductor`` folder), in a folder per
    ATen CPU capability, unless the environment
    names another folder than torch's default (TORCHINDUCTOR_CACHE_DIR, which importing torch's compiler sets to
    that default): compiled steps then live as long as the result cache, not /tmp, and code built for one ISA never
    serves another (torch 2.13's cache key leaves the capability out; under ATEN_CPU_CAPABILITY=avx2 a warm shared
    cache decoded wrong tokens). Returns the folder in use."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # a second of importing: only here

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or Path(chosen) == Path(default_cache_dir()):
        root = root or cache_dir() / "inductor"
        chosen = os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(
            (root / torch.backends.cpu.get_cpu_capability().lower()).absolute())
    return Path(chosen)
