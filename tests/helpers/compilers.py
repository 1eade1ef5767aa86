"""A stand-in for a compiler that is not there: a runner without a working C++ compiler."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

NO_COMPILER = "no working C++ compiler found"


def missing_compiler(detail: str = "") -> Callable[..., Any]:
    """A ``torch.compile`` backend that fails as inductor's CPU backend does without a compiler."""
    def compile_(graph: Any, inputs: Any, **options: Any) -> Any:
        raise RuntimeError(NO_COMPILER + detail)

    return compile_
