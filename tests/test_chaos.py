"""The short chaos run (tests/chaos.py) in `make test`: a fixed seed, 30 s of faults of every
kind against 6 configs × 20 experiments on up to 12 workers; `make chaos` runs the long one."""

from . import chaos

SEED = 20261125
DURATION = 30


def test_short_chaos_run_loses_no_result_and_recovers_from_every_kind_of_fault(tmp_path):
    figures = chaos.run(SEED, DURATION, tmp_path)  # raises, listing them, if an invariant broke
    print(chaos.format_figures(figures))
    assert figures["experiments"] >= 6 * 20
    assert all(figures["faults"][kind] >= 1 for kind in chaos.KINDS), figures["faults"]
    for kind in ("kill9", "sigterm", "server", "drop", "stall"):
        assert figures["recovery"][kind]["n"] >= 1, (kind, figures["recovery"])
    assert chaos.leftovers(tmp_path) == []
