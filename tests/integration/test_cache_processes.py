"""The cache under processes that race for one entry."""
import multiprocessing
import time
from pathlib import Path
from quant.cache import cached_dir


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
