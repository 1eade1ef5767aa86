"""quant: a regression suite for quantized LLMs."""
from quant.quiet import silence_import_noise

silence_import_noise()
