"""Third-party import noise, filtered in one place: log lines that every ``quant`` command and pytest header would
otherwise start with, and that say nothing a user of this suite can act on. Only these exact messages are dropped;
anything else those libraries log still shows."""
from __future__ import annotations

import logging

# logger name -> fragments of the messages dropped, with why they say nothing here
NOISE: dict[str, tuple[str, ...]] = {
    # torchao (installed with GPTQModel, imported by transformers' quantizer registry) tries its CUDA-only
    # extensions (mxfp8, cutlass) on every import; a CPU build of torch cannot load them, and nothing here uses them
    "torchao": ("Failed to load",),
    # torchao registers its enums with torch.compile the deprecated way; torch 2.13 says so on every import
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_import_noise() -> None:
    """Install the filters (idempotent); must run before transformers is first imported."""
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
