"""Fixtures of the integration tier: small replicas of the study's three models saved as hub checkpoints."""
from __future__ import annotations

import pytest

from quant.replicas import REPLICAS, save_replica


@pytest.fixture(scope="session", params=sorted(REPLICAS))
def replica_folder(request, small_tokenizer, tmp_path_factory):
    """(study model name, folder): a small random-weight replica saved with save_pretrained and its tokenizer."""
    name = request.param
    return name, save_replica(name, small_tokenizer, tmp_path_factory.mktemp(name), small=True)
