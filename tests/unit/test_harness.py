"""lm-evaluation-harness tasks as matrix tasks (quant/kinds/harness.py): lm-eval's own definition on local data,
only the documents asked for evaluated, metrics and their direction from lm-eval's registry, and errors that name
the task."""
import re

import pytest
import yaml

from quant.config import ConfigError
from quant.kinds import kind_of, lower_is_better
from quant.kinds.harness import INSTALL, offline_problem
from quant.tasks import read_task_file
from tests.helpers.harness import task_file
from tests.helpers.matrices import repo_matrix

pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is not installed: {INSTALL}")


def test_the_direction_and_the_aggregation_are_lm_evals(tmp_path):
    read_task_file(task_file(tmp_path))
    assert not lower_is_better("acc")
    with pytest.raises(ConfigError, match="metric 'word_perplexity' is not one lm-eval averages over documents"):
        read_task_file(task_file(tmp_path, metrics="word_perplexity"))


def test_an_unknown_task_names_the_closest_and_hub_data_is_named_offline(tmp_path, monkeypatch):
    path = task_file(tmp_path)
    path.write_text(path.read_text().replace("lm_eval: boolq", "lm_eval: boolqq"))
    task = read_task_file(path)["mine"]
    with pytest.raises(ConfigError, match="task 'mine': lm-eval has no task 'boolqq'; closest: boolq"):
        kind_of(task).load(task, None)
    path.write_text("arc:\n  lm_eval: arc_easy\n  metrics: [acc]\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline_problem(read_task_file(path)["arc"]) == (
        "task arc: lm-eval's arc_easy reads allenai/ai2_arc from the hub, which HF_HUB_OFFLINE=1 forbids; give "
        "data_files to run it offline")
    with pytest.raises(ConfigError, match=r"task 'mine': data_files: .*gone.jsonl not found"):
        read_task_file(task_file(tmp_path, data="gone.jsonl"))


def test_a_gpu_case_on_a_hub_task_is_planned_and_its_data_named_offline(tmp_path, capsys, monkeypatch):
    """A team's GPU case on lm-eval's ARC-Easy (its data on the hub): costed in the GPU plan from the matrix's
    measured costs, and named in one line by the dry run offline."""
    from quant.cli import main

    raw = repo_matrix()
    (tmp_path / "tasks.yaml").write_text("arc_easy:\n  lm_eval: arc_easy\n  metrics: [acc_norm]\n  batch_size: 32\n")
    matrix = {"seed": 1, "task_files": ["tasks.yaml"], "costs": raw["costs"],
              "profiles": {"test": {"gpu": {"arc_easy": 500, "calib_samples": 64}}},
              "models": {"llama-3.2-1b": raw["models"]["llama-3.2-1b"]},
              "quant": {"gptq-w4g128": raw["quant"]["gptq-w4g128"]},
              "cases": [{"models": ["llama-3.2-1b"], "quant": ["gptq-w4g128"], "tasks": ["arc_easy"]}]}
    (tmp_path / "quant.yaml").write_text(yaml.safe_dump(matrix))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["report", "--matrix", str(tmp_path / "quant.yaml"), "--tier", "gpu", "--profile", "test",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"~\d+\.\d min  evaluate arc_easy: 500 items x 2 variants \(baseline \+ quantized\), batch 32", out)
    assert ("task arc_easy: lm-eval's arc_easy reads allenai/ai2_arc from the hub, which HF_HUB_OFFLINE=1 forbids; "
            "give data_files to run it offline") in out
