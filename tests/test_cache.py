"""The cache under concurrent writers and interrupted builds."""
import multiprocessing
import time
from pathlib import Path

import pytest

from quant.cache import cached_dir, cached_json


def _slow_build(root: str, counter: str) -> str:
    def build(folder: Path) -> None:
        with open(counter, "a") as handle:
            handle.write("built\n")
        time.sleep(1.0)  # long enough that the other process arrives mid-build
        (folder / "payload").write_text("complete")

    path = cached_dir("race", {"entry": 1}, build, root=Path(root))
    return (path / "payload").read_text()


def test_racing_processes_build_once_and_never_read_half_written(tmp_path):
    counter = tmp_path / "builds.txt"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_slow_build, [(str(tmp_path), str(counter))] * 3)
    assert results == ["complete"] * 3
    assert counter.read_text().count("built") == 1


def test_interrupted_build_leaves_no_entry(tmp_path):
    def failing(folder: Path) -> None:
        (folder / "partial").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_dir("broken", {"entry": 2}, failing, root=tmp_path)
    assert not [p for p in (tmp_path / "broken").iterdir() if not p.name.endswith(".lock")]
    assert cached_json("broken", {"entry": 2}, lambda: {"ok": True}, root=tmp_path) == {"ok": True}


def test_keys_separate_different_inputs(tmp_path):
    first = cached_json("values", {"x": 1}, lambda: 1, root=tmp_path)
    second = cached_json("values", {"x": 2}, lambda: 2, root=tmp_path)
    again = cached_json("values", {"x": 1}, lambda: pytest.fail("recomputed a cached entry"), root=tmp_path)
    assert (first, second, again) == (1, 2, 1)
