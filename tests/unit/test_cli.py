"""The command line: `quant quantize` (one model, one config, its log) and `quant report --dry-run` (the plan)."""
import re

import torch
import yaml

from quant import plan
from tests.helpers.repo import BASELINES, REPO_ROOT
from quant.cli import main
from quant.matrix import load_matrix
from tests.helpers.matrices import edited_matrix, repo_matrix


def test_a_report_selection_that_matches_no_case_is_an_error(capsys, tmp_path):
    assert main(["report", "-k", "no-such-case", "--out", str(tmp_path)]) == 2
    assert "-k 'no-such-case' matches no case of" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no empty report written


def test_quantize_refuses_a_calibration_dtype_for_a_method_without_calibration(capsys):
    assert main(["quantize", "smollm2-135m", "rtn-w4g128", "--calib-dtype", "bfloat16"]) == 2
    assert "calib_dtype='bfloat16' applies to gptq only, not rtn" in capsys.readouterr().err


def test_the_gpu_dry_run_prints_the_plan_and_runs_nothing(capsys):
    assert main(["report", "--tier", "gpu", "--profile", "test", "--cadence", "all", "--dry-run", "-k", "gsm8k"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "CUDA is not available on this machine" in out
    for expected in ("llama-3.2-1b", "qwen2.5-0.5b", "phi-1.5", "gsm8k: 256 items x 6 variants", "64 x 512 calibration",
                     "tinygemm", "dequantizing reference (group size 16)", "baselines/h100/test", "estimated: "):
        assert expected in out, expected


def test_the_cpu_dry_run_plans_library_backends_and_checkpoints(capsys, tmp_path):
    """The plan reads calibration from each config's backend (it once asked the in-house methods for GPTQModel's
    'awq' and stopped), and a checkpoint is loaded, not built."""
    def backends_and_a_checkpoint(raw):
        raw["quant"]["handed-over"] = {"checkpoint": str(tmp_path)}
        raw.pop("measured_tolerances")  # measured for cases this matrix no longer has
        raw["cases"] = [{"models": ["smollm2-135m"], "quant": ["gptqmodel-awq-w4g64", "handed-over"],
                         "tasks": ["wikitext"]},
                        {"models": ["smollm2-135m"], "quant": ["rtn-w8"], "tasks": ["wikitext"], "cadence": "slow"}]

    matrix = edited_matrix(tmp_path, backends_and_a_checkpoint)
    assert main(["report", "--matrix", str(matrix), "--profile", "report", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for expected in ("quantize gptqmodel-awq-w4g64: 16 x 512 calibration tokens (backend gptqmodel)",
                     "the kernel gptqmodel picks", f"load checkpoint handed-over ({tmp_path})", "wikitext: "):
        assert expected in out, out
    assert "rtn-w8" not in out  # the slow cadence is left out unless asked for
    assert main(["report", "--matrix", str(matrix), "--profile", "report", "--cadence", "all", "--dry-run"]) == 0
    assert "quantize rtn-w8: no calibration" in capsys.readouterr().out


def _gpu_workflow_budget(step: str) -> int:
    """timeout-minutes of a step of .github/workflows/gpu.yml."""
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "gpu.yml").read_text())
    return next(s["timeout-minutes"] for s in workflow["jobs"]["gpu-tier"]["steps"] if s.get("name") == step)


def _h100_estimate(cases: list) -> tuple[float, str]:
    out = plan.render(plan.steps(load_matrix(), cases, "test", "gpu", "cuda", "h100", BASELINES), "")
    return float(re.search(r"estimated: ([0-9.]+) min", out).group(1)), out


def test_the_merge_gates_plan_fits_the_budget_of_the_gpu_workflow():
    """`pytest -m gpu -k gsm8k` (default cadence) on one H100, estimated from the measured costs in matrix.yaml."""
    cases = [c for c in load_matrix().cases if c.model.tier == "gpu" and c.cadence == "default" and c.task.name == "gsm8k"]
    estimate, out = _h100_estimate(cases)
    assert len(cases) == 9 and 0 < estimate <= 15 <= _gpu_workflow_budget("gsm8k gate"), out


def test_the_whole_gpu_test_profile_is_costed_and_fits_45_minutes():
    cases = [c for c in load_matrix().cases if c.model.tier == "gpu"]
    estimate, out = _h100_estimate(cases)
    assert "not measured  evaluate" not in out, out  # every task has a measured cost
    assert 0 < estimate <= 45, out
    merge_cadence, _ = _h100_estimate([c for c in cases if c.cadence == "default"])
    assert merge_cadence <= _gpu_workflow_budget("gpu tier") <= 45


def test_show_prints_a_case_resolved_from_defaults_entry_config_task_and_profile(capsys):
    assert main(["show", "smollm2-135m-gptq-w4g128-wikitext"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["quant"]["method"] == "gptq" and shown["quant"]["group_size"] == 128
    assert shown["task"]["kind"] == "perplexity" and shown["task"]["window"] == 512
    assert shown["profile"] == {"name": "test", "items": 6, "calib_samples": 16}
    assert shown["gate"]["retention_min"] == 0.90  # from defaults
    assert shown["gate"]["kld_max"] == 0.48
    # the perplexity tolerance `quant noise` measured replaces the case's hand-set one
    measured = repo_matrix()["measured_tolerances"]["cases"][shown["case"]]
    assert shown["gate"]["snapshot_tolerance"]["perplexity"] == measured["perplexity"]
    assert main(["show", "gptq-w4g128-wiki"]) == 2
    assert "did you mean smollm2-135m-gptq-w4g128-wikitext" in capsys.readouterr().err
