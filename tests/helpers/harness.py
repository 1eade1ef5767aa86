"""A team's lm-eval task file as the tests write it: lm-eval's own BoolQ pointed at a local JSONL."""
from __future__ import annotations

import json
from pathlib import Path

ENTRY = """\
mine:
  lm_eval: boolq
  data_files: {data}
  overrides: {{doc_to_target: "{{{{ 1 if label == 'true' else 0 }}}}"}}
  metrics: [{metrics}]
"""


def task_file(folder: Path, rows: int = 10, metrics: str = "acc", data: str = "items.jsonl") -> Path:
    """``folder/tasks.yaml`` naming ``rows`` BoolQ-shaped documents in ``folder/items.jsonl`` (even numbers: yes)."""
    with (folder / "items.jsonl").open("w") as out:
        for index in range(rows):
            out.write(json.dumps({"idx": index, "question": f"is {index} even", "passage": f"{index} is a number.",
                                  "label": "true" if index % 2 == 0 else "false"}) + "\n")
    path = folder / "tasks.yaml"
    path.write_text(ENTRY.format(data=data, metrics=metrics))
    return path
