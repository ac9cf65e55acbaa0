"""`sdm-peer simulate` at a small scale (issue 9): every scenario finishes the study through the
real store, and the comparison comes out the way the design says it must."""

import json

from click.testing import CliRunner

from sdm_peer.cli import main
from sdm_peer.simulate import SCENARIOS, simulate


def simulated(tmp_path, *flags):
    """`sdm-peer simulate --scale 0.01 FLAGS`: what it printed, and the JSON it wrote."""
    out = tmp_path / "simulate.json"
    result = CliRunner().invoke(main, ["simulate", "--scale", "0.01", *flags, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


def test_small_simulation_finishes_every_scenario_with_sane_measures(tmp_path):
    output, outcome = simulated(tmp_path, "--seed", "1")
    assert "| sdm-peer+prewarm+shrink |" in output and "seed 1" in output
    assert outcome["parameters"]["seed"] == 1 and outcome["parameters"]["experiments"] == 844
    replaced, default, tuned = (next(r for r in outcome["results"] if r["scenario"] == s) for s in SCENARIOS)
    for run in (replaced, default, tuned):  # all done is checked inside: run() refuses otherwise
        assert 0 <= run["idle_vm_hours"] <= run["vm_hours_billed"]
        assert run["makespan_hours"] > 0 and run["rerun_hours"] >= 0
    assert replaced["preemptions"] > 0 and replaced["shutdown_script_misses"] > 0
    assert replaced["person_interventions"] > 0
    assert default["person_interventions"] == tuned["person_interventions"] == 0
    assert tuned["idle_vm_hours"] <= default["idle_vm_hours"] < replaced["idle_vm_hours"]
    assert tuned["makespan_hours"] <= default["makespan_hours"] < replaced["makespan_hours"]


def test_without_preemptions_nothing_is_re_run_and_nobody_intervenes():
    outcome = simulate(scale=0.005, seed=3, preemptions_per_vm_hour=0)
    for run in outcome["results"]:
        assert run["preemptions"] == run["person_interventions"] == 0 and run["rerun_hours"] == 0


def test_concurrent_configs_within_max_vcpus_beat_one_after_another_against_the_quota_bound(tmp_path):
    output, outcome = simulated(tmp_path, "--max-vcpus", "500")
    assert "| sdm-peer+max_vcpus |" in output and "no config refused" in output
    assert outcome["parameters"]["max_vcpus"] == 500 and outcome["parameters"]["experiments"] == 844
    tuned, concurrent = (next(r for r in outcome["results"] if r["scenario"] == s)
                         for s in ("sdm-peer+prewarm+shrink", "sdm-peer+max_vcpus"))
    for run in outcome["results"]:
        assert run["bound_hours"] == concurrent["bound_hours"] > 0 and run["cost_usd"] > 0
        assert abs(run["makespan_to_bound"] - run["makespan_hours"] / run["bound_hours"]) < 0.05
    assert concurrent["makespan_hours"] < tuned["makespan_hours"] / 3
    assert concurrent["idle_vm_hours"] <= tuned["idle_vm_hours"] and concurrent["person_interventions"] == 0


def test_a_free_trials_8_vcpus_run_every_shape_that_fits_and_refuse_the_rest_up_front():
    outcome = simulate(scale=0.01, seed=1, max_vcpus=8)
    parameters = outcome["parameters"]
    assert parameters["configs"] == 8 and parameters["refused_configs"] == 12  # shapes of 1..8 cores run
    assert parameters["experiments"] + parameters["refused_experiments"] == 844
    assert [r["scenario"] for r in outcome["results"]][-1] == "sdm-peer+max_vcpus"


def test_without_max_vcpus_there_is_no_bound_and_no_concurrent_scenario():
    outcome = simulate(scale=0.005, seed=2)
    assert outcome["parameters"]["max_vcpus"] is None and outcome["parameters"]["refused_configs"] == 0
    assert [r["scenario"] for r in outcome["results"]] == list(SCENARIOS)
    assert all("bound_hours" not in r and r["cost_usd"] > 0 for r in outcome["results"])
