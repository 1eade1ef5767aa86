"""What a run will do (quant/plan.py): each case's detectable drop before anything runs, and the n a `detect:`
asks for."""
import dataclasses

from quant import gate, plan
from quant.matrix import load_matrix

MATRIX = load_matrix()


def _case(case_id: str, **gate_fields):
    case = next(c for c in MATRIX.cases if c.id == case_id)
    return dataclasses.replace(case, gate={**case.gate, **gate_fields})


def test_the_plan_states_each_gates_detectable_drop_from_a_measured_or_prior_spread():
    case = _case("smollm2-135m-rtn-w4g128-msmarco")
    measured = plan.power_line(case, 43, 0.026)
    assert f"detects a drop of {gate.detectable_drop(0.026, 43, 0.9):.3f} in ndcg@10 retention" in measured
    assert "measured on cached results" in measured
    prior = plan.power_line(case, 43, None)
    assert f"per-item spread {case.gate['spread_prior']['msmarco']:.3g}, spread_prior" in prior
    tiny = plan.power_line(_case("smollm2-135m-rtn-w4g128-gsm8k"), 4, None)
    assert "detects no drop in strict-match retention" in tiny  # 4 items: even retention 0 passes too often
    unknown = plan.power_line(_case("smollm2-135m-rtn-w4g128-msmarco", spread_prior={}), 43, None)
    assert "detectable drop unknown" in unknown


def test_a_case_with_detect_gets_the_items_that_reach_it():
    wanted = plan.power_line(_case("smollm2-135m-rtn-w4g128-msmarco", detect=0.12), 43, 0.026)
    needed = gate.items_to_detect(0.12, 0.026, 0.9)
    assert f"detect 0.12: needs n={needed}" in wanted and "more than the profile runs" not in wanted
    assert "more than the profile runs" in plan.power_line(_case("smollm2-135m-rtn-w4g128-msmarco", detect=0.105),
                                                            43, 0.026)
    within = plan.power_line(_case("smollm2-135m-rtn-w4g128-msmarco", detect=0.05), 43, 0.026)
    assert "no n reaches it (within the threshold's own margin)" in within


def test_the_plan_names_a_sequential_gates_looks():
    clear = plan.power_line(_case("smollm2-135m-rtn-w4g128-msmarco"), 43, 0.026)
    # nothing lost at that spread is 25 final standard errors above the threshold: decided at the first look
    assert "sequential: looks at n=16, 32, 43, about n=16 expected when nothing is lost" in clear
    noisy = plan.power_line(_case("smollm2-135m-rtn-w4g128-msmarco"), 43, 0.3)  # 2.2 standard errors: mostly the end
    assert "about n=16 expected" not in noisy and "about n=43 expected" not in noisy
    assert "sequential" not in plan.power_line(_case("smollm2-135m-rtn-w4g128-msmarco", sequential=False), 43, 0.026)
    assert "sequential" not in plan.power_line(_case("smollm2-135m-rtn-w4g128-msmarco"), 16, 0.026)  # one look
