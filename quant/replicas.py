"""Random-weight replicas of the reference study's models, built from each model's own configuration class.

A replica has the architecture the study's numbers depend on (Llama-3.2's rope scaling and grouped-query
attention; Qwen2's q/k/v biases and tied embeddings; Phi's partial rotary, parallel attention/MLP block and
untied ``lm_head`` with a bias) without downloading weights: at full size it is what a GPU machine with no hub
access runs the GPU tier on (``python -m quant replica``), and small (two blocks, narrow widths) it is what the
CPU tests quantize, save, restore and evaluate. The vocabulary is the given tokenizer's, so any tokenizer fits.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded when a replica is built: the study models' names are needed without them
    import torch
    import transformers

# Small sizes: hidden 192 and intermediate 512 make group size 64 divide every input width and 128 divide only
# some (192 falls back to g64), and every width tiles for the int4 kernels (multiples of 32).
_SMALL = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 6,
          "max_position_embeddings": 4096}


@dataclasses.dataclass(frozen=True)
class Replica:
    """A study model's configuration class and published architecture fields, and the overrides of its small
    version (which keep every architectural feature, only narrower and shallower)."""

    config_class: str
    full: dict[str, Any]
    small: dict[str, Any]

    def config(self, vocab_size: int, small: bool) -> transformers.PretrainedConfig:
        import transformers

        fields = {**self.full, **(self.small if small else {}), "vocab_size": vocab_size}
        return getattr(transformers, self.config_class)(**fields)


REPLICAS: dict[str, Replica] = {
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": Replica(
        "LlamaConfig",
        {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": True,
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        {**_SMALL, "num_key_value_heads": 2, "head_dim": 32,
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 256}},
    ),
    # Qwen/Qwen2.5-0.5B config.json (q/k/v carry biases in every Qwen2 model)
    "qwen2.5-0.5b": Replica(
        "Qwen2Config",
        {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
         "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
        {**_SMALL, "num_key_value_heads": 2},
    ),
    # microsoft/phi-1_5 config.json (lm_head has a bias in every Phi model)
    "phi-1.5": Replica(
        "PhiConfig",
        {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
         "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "hidden_act": "gelu_new",
         "tie_word_embeddings": False,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
        _SMALL,
    ),
}


def build_replica(name: str, vocab_size: int, small: bool = False, seed: int = 0,
                  dtype: torch.dtype | None = None) -> transformers.PreTrainedModel:
    """A randomly initialised replica of the study model ``name`` (a key of REPLICAS), in eval mode (float32 unless
    ``dtype`` says otherwise)."""
    import torch
    import transformers

    if name not in REPLICAS:
        raise ValueError(f"no replica of {name!r}; known: {sorted(REPLICAS)}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(REPLICAS[name].config(vocab_size, small),
                                                          dtype=dtype or torch.float32)
    return model.eval()


def save_replica(name: str, tokenizer: Any, folder: Path, small: bool = False, seed: int = 0,
                 dtype: torch.dtype | None = None) -> Path:
    """Save a replica with its tokenizer the way a hub checkpoint is laid out, so that ``QUANT_MODEL_<NAME>``
    loads it exactly as it would load the real model's local copy."""
    model = build_replica(name, len(tokenizer), small, seed, dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
