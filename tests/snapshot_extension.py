"""A syrupy extension for metric snapshots: one readable JSON file per test module, compared with tolerances.

The storage is a JSON object {snapshot name: record}, written sorted and atomically under a file lock. Matching
and the failure text come from quant.snapshots, so a run within tolerance passes and a real regression fails
with the old value, the new value and the tolerance, instead of a textual diff of two JSON documents.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from filelock import FileLock
from syrupy.data import Snapshot, SnapshotCollection
from syrupy.extensions.base import AbstractSyrupyExtension

from quant.snapshots import regressions


def _read(location: str) -> dict[str, Any]:
    path = Path(location)
    return json.loads(path.read_text()) if path.exists() else {}


def _lock(location: str) -> FileLock:
    """Serialises writers of one snapshot file (xdist workers); kept out of baselines/, which syrupy scans."""
    digest = hashlib.sha256(str(Path(location).resolve()).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"quant-snapshot-{digest}.lock")


def _dumps(records: dict[str, Any]) -> str:
    """JSON with one line per metric, so that a pull request's diff shows exactly which figures moved."""
    blocks = []
    for name, entry in sorted(records.items()):
        metrics = ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in entry["metrics"].items())
        blocks.append(f" {json.dumps(name)}: {{\n  \"exact\": {json.dumps(entry['exact'])},\n"
                      f"  \"metrics\": {{\n{metrics}\n  }}\n }}")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def _write(location: str, records: dict[str, Any]) -> None:
    path = Path(location)
    if not records:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(_dumps(records))
    partial.replace(path)


def record(location: str, name: str, entry: dict[str, Any]) -> None:
    """Add or replace one snapshot in the file at ``location``, under its lock."""
    with _lock(location):
        _write(location, {**_read(location), name: entry})


RECORDED = pytest.StashKey[list]()  # (file, snapshot name) recorded by FirstRecording in this session


class FirstRecording:
    """Stands in for the snapshot on hardware with no baselines yet: ``==`` records the case's figures and holds,
    and the session's summary lists what was recorded for review."""

    def __init__(self, location: Path, name: str, config: pytest.Config) -> None:
        self.location, self.name, self.config = location, name, config

    def __eq__(self, entry: object) -> bool:
        record(str(self.location), self.name, entry)
        self.config.stash.setdefault(RECORDED, []).append((self.location, self.name))
        return True

    __hash__ = None


class MetricsSnapshotExtension(AbstractSyrupyExtension):
    file_extension = "json"
    directory: ClassVar[Path]  # bound per run by the metrics_snapshot fixture (baselines/<hardware>/<profile>)

    @classmethod
    def dirname(cls, *, test_location: Any) -> str:
        return str(cls.directory)

    def serialize(self, data: Any, **_: Any) -> str:
        return json.dumps(data, indent=1)

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        return not regressions(json.loads(snapshot_data), json.loads(serialized_data))

    def diff_lines(self, serialized_data: Any, snapshot_data: Any) -> Iterator[str]:
        yield f"regression against the snapshot in {self.directory}:"
        for problem in regressions(json.loads(snapshot_data), json.loads(serialized_data)):
            yield f"  {problem}"

    def read_snapshot_collection(self, *, snapshot_location: str) -> SnapshotCollection:
        collection = SnapshotCollection(location=snapshot_location)
        for name, entry in _read(snapshot_location).items():
            collection.add(Snapshot(name=name, data=self.serialize(entry)))
        return collection

    def read_snapshot_data_from_location(self, *, snapshot_location: str, snapshot_name: str,
                                         session_id: str) -> str | None:
        entry = _read(snapshot_location).get(snapshot_name)
        return None if entry is None else self.serialize(entry)

    @classmethod
    def write_snapshot_collection(cls, *, snapshot_collection: SnapshotCollection,
                                  name_order: dict[str, int] | None = None) -> None:
        for snapshot in snapshot_collection:
            record(snapshot_collection.location, snapshot.name, json.loads(snapshot.data))

    def delete_snapshots(self, *, snapshot_location: str, snapshot_names: set[str]) -> None:
        with _lock(snapshot_location):
            records = _read(snapshot_location)
            _write(snapshot_location, {k: v for k, v in records.items() if k not in snapshot_names})
