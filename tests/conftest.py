"""Fixtures of every tier: a tiny random LLaMA that quantizes in a second, the shared data, and a small tokenizer
trained on the shared WikiText. (Imports that cost seconds are made by the fixtures that need them.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from quant.config import DATA_DIR_ENV, data_dir


@pytest.fixture
def tiny_llama():
    from tests.helpers.models import tiny_llama

    return tiny_llama()


@pytest.fixture
def calibration_ids():
    import torch

    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def shared_data(request) -> Path:
    folder = data_dir(request.config.getoption("--data-dir"))
    if folder is None:
        pytest.skip(f"needs the shared evaluation data: set {DATA_DIR_ENV} (make test sets ../shared/data)")
    return folder


@pytest.fixture(scope="session")
def small_tokenizer(shared_data):
    """A 512-token byte-level BPE trained in a second on the start of the shared WikiText-2 test text, with a
    BOS/EOS token: a real tokenizer that replicas can be saved and loaded with, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:200_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
