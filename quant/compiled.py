"""A model's forward compiled for fixed shapes: greedy decode on a preallocated (static) KV cache through a
``torch.compile``d step, optionally with the prompt's forward compiled too, the attention that step runs on the
CPU, and where inductor keeps what it compiled."""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from quant.cache import cached_dir, code_of, definition_code
from quant.project import cache_dir


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


# The prompt's compile: inductor's C++ GEMM templates beside ATen's kernels, each GEMM shape timed once, on weights
# frozen into the graph (the templates take only a constant weight). They include weight-only int4 and int8
# micro-kernels on AMX, which run a 4-bit prefill as fast as a bf16 one where ATen's int4 kernel is several times
# slower (docs/measurements.md). No captured graph: a prompt runs once per request, and the next replay would
# overwrite its output.
PREFILL_INDUCTOR_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "triton.cudagraphs": False,
                            "freezing": True}
PROMPT_PACKAGE = "prompt.pt2"


class PromptForward(torch.nn.Module):
    """The prompt's forward as it is exported: the first greedy token and every layer's keys and values, the cache a
    decode continues from, as plain tensors (what an exported program returns)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        states = [tensor for layer in out.past_key_values.layers for tensor in (layer.keys, layer.values)]
        return out.logits[:, -1:].argmax(-1), *states


def prompt_code() -> dict[str, str]:
    """The code a packaged prompt is compiled from besides the model's tensors and classes: what is exported
    (``PromptForward``) and the forwards of the layers the model may hold (the fast layers, ``quant.kernels``, and
    the reference ``quant.qlinear`` they build on). The rest of this module is not in it: editing the decoder must
    not throw away minutes of compiling per variant."""
    return {"PromptForward": definition_code(PromptForward), "layers": code_of("quant.kernels", "quant.qlinear")}


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model as it runs: its modules (classes, shapes, options, as printed), its config, and every
    parameter's and buffer's name, dtype, shape and bytes."""
    digest = hashlib.sha256(repr(model).encode())
    digest.update(model.config.to_json_string().encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def cpu_fingerprint() -> str:
    """The CPU's model and instruction-set flags (/proc/cpuinfo; the platform elsewhere) and the code paths torch is
    held to (ATen's CPU capability, oneDNN's ISA limit): code compiled and autotuned for one CPU's kernels is not
    reused on another, nor served to a process held to another code path."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else [platform.processor()]
    facts = [line for line in lines if line.startswith(("model name", "flags"))][:2] or lines[:1]
    facts += [torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA", "")]
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:16]


def packaged_prompt(model: torch.nn.Module, ids: torch.Tensor
                    ) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, ...]], int]:
    """The model's prompt forward (``PromptForward``) for ``ids``' shape, exported and compiled ahead of time by
    inductor (``PREFILL_INDUCTOR_OPTIONS``) into a package kept in the result cache (``prompts/``), and loaded
    from there: compiling takes minutes, loading a fraction of a second. The key holds the model's fingerprint,
    the prompt's shape and device, the CPU, and the code it is compiled from.

    Also returns the package's size in bytes: it carries its own copy of the weights, folded and repacked for its
    GEMMs, beside the model's, so a compiled prompt can hold more than the model it was compiled from. (The size,
    not the memory loading it adds: resident growth reads 0 where the allocator reuses pages freed earlier.)"""
    parts = {"model": model_fingerprint(model), "prompt": list(ids.shape), "device": str(ids.device),
             "cpu": cpu_fingerprint(), "options": PREFILL_INDUCTOR_OPTIONS,
             "code": prompt_code()}

    def build(folder: Path) -> None:
        exported = torch.export.export(PromptForward(model), (ids,), strict=False)
        # a copy: AOTInductor adds its own entries to the options it is given, which would change the next key
        torch._inductor.aoti_compile_and_package(exported, package_path=str(folder / PROMPT_PACKAGE),
                                                 inductor_configs=dict(PREFILL_INDUCTOR_OPTIONS))

    package = cached_dir("prompts", parts, build) / PROMPT_PACKAGE
    return torch._inductor.aoti_load_package(str(package)), package.stat().st_size


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
    masked GQA would fall back to the math kernel there.

    ``compile_prefill`` runs the prompt through an exported program of its forward, for the fixed prompt shape it is
    first called with: with inductor, compiled ahead of time and cached (``packaged_prompt``; torch.compile does not
    cache a graph with frozen weights, so a run would recompile it for minutes); with another backend, the exported
    graph run as it is (tests)."""

    def __init__(self, model: torch.nn.Module, device: str, backend: str = "inductor", cpp_wrapper: bool = False,
                 compile_prefill: bool = False) -> None:
        self.model, self.backend, self.compile_prefill = model, backend, compile_prefill
        self.attention = KV_HEAD_ATTENTION if device == "cpu" else model.config._attn_implementation
        options: dict[str, Any] = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if backend == "inductor":
            options.update({"triton.cudagraphs": device.startswith("cuda"), "cpp_wrapper": cpp_wrapper})
        elif cpp_wrapper:
            raise ValueError(f"cpp_wrapper is an inductor option; the {backend!r} backend has no wrapper to replace")
        self.step = torch.compile(self._step, backend=backend, options=options, fullgraph=True, dynamic=False,
                                  isolate_recompiles=True)
        self.prompts: dict[tuple[int, ...], Callable[[torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        self.package_bytes: int | None = None  # the size of its prompts' packages (``packaged_prompt``)

    def _step(self, token: torch.Tensor, cache: transformers.StaticCache) -> torch.Tensor:
        # the cache counts its own length (positions and the slots to write follow from it)
        return self.model(token, past_key_values=cache, use_cache=True).logits.argmax(-1)

    def compile_prompt(self, ids: torch.Tensor) -> None:
        """Export (and with inductor, compile or load) the prompt's forward for ``ids``' shape now, and prefill
        through it from then on; a prompt that cannot be exported or compiled raises here and changes nothing."""
        self._prompt(ids)
        self.compile_prefill = True

    def _prompt(self, ids: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        """The exported prompt forward for ``ids``' shape, made once per shape."""
        shape = tuple(ids.shape)
        if shape not in self.prompts:
            if self.backend == "inductor":
                self.prompts[shape], size = packaged_prompt(self.model, ids)
                self.package_bytes = (self.package_bytes or 0) + size
            else:
                self.prompts[shape] = torch.export.export(PromptForward(self.model), (ids,), strict=False).module()
        return self.prompts[shape]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, new_tokens: int) -> tuple[transformers.StaticCache, torch.Tensor]:
        """The prompt into a static cache with room for ``new_tokens`` more: (cache, first token). Eager unless the
        decoder was made with ``compile_prefill``; then the exported prompt's keys and values are written into it."""
        cache = transformers.StaticCache(config=self.model.config, max_cache_len=ids.shape[1] + new_tokens)
        if not self.compile_prefill:
            out = self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return cache, out.logits[:, -1:].argmax(-1)
        token, *states = self._prompt(ids)(ids)
        for layer, (keys, values) in enumerate(zip(states[::2], states[1::2])):
            cache.update(keys, values, layer)
        return cache, token

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
    ATen CPU capability, unless the environment names another folder than torch's default (TORCHINDUCTOR_CACHE_DIR,
    which importing torch's compiler sets to that default): compiled steps then live as long as the result cache,
    not /tmp, and code built for one ISA never serves another (torch 2.13's cache key leaves the capability out;
    under ATEN_CPU_CAPABILITY=avx2 a warm shared cache decoded wrong tokens). Returns the folder in use."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # a second of importing: only here

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or Path(chosen) == Path(default_cache_dir()):
        root = root or cache_dir() / "inductor"
        chosen = os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(
            (root / torch.backends.cpu.get_cpu_capability().lower()).absolute())
    return Path(chosen)
