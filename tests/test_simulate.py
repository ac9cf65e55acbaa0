"""`sdm-peer simulate` at a small scale (issue 9): every scenario finishes the study through the
real store, and the comparison comes out the way the design says it must."""

import json

from click.testing import CliRunner

from sdm_peer.cli import main
from sdm_peer.simulate import SCENARIOS, simulate


def test_small_simulation_finishes_every_scenario_with_sane_measures(tmp_path):
    out = tmp_path / "simulate.json"
    result = CliRunner().invoke(main, ["simulate", "--scale", "0.01", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| sdm-peer+prewarm+shrink |" in result.output and "seed 1" in result.output
    outcome = json.loads(out.read_text())
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
