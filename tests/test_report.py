"""`sdm-peer report` on a database built with Store calls and fixed results: the tables carry
the right numbers, the plots are written beside report.html, and an empty study or a missing
database gets a clear answer."""

import html.parser
import math

import pytest
from click.testing import CliRunner

from sdm_peer.cli import main
from sdm_peer.confine import cpu_list
from sdm_peer.report import fit_scaling

from .conftest import T0, grid

A, B = (1, 2), (2, 4)  # (cores, memory_gb): configs c1-m2 and c2-m4


class Tables(html.parser.HTMLParser):
    """Every <table id=...> of a page as a list of rows of cell texts."""

    def __init__(self, page):
        super().__init__()
        self.tables, self._table, self._row, self._cell = {}, None, None, None
        self.images = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def run_one(store, shape, worker, *, at, wall=None, result=None, outcome="complete", lease=60.0):
    """Claim the next experiment of `shape` at `at` and end it as told; returns its key."""
    claimed = store.claim(worker, *shape, now=at, lease_seconds=lease)["experiment"]
    token = claimed["lease_token"]
    if outcome == "complete":
        store.complete(token, result, wall, now=at + wall)
    elif outcome == "fail":
        store.fail(token, "boom", 1, wall, now=at + wall)
    elif outcome == "release":
        store.release(now=at + wall, reason="preempted", lease_token=token)
    return claimed["key"]


def known_study(make_store):
    """c1-m2: a failure (0.5 s), then 4 DONE (1..4 s). c2-m4: an attempt whose lease expires
    (claimed at T0, taken back at T0+30), one released after 7 s, then 2 DONE (10, 20 s)."""
    store = make_store(grid([A], 4) + grid([B], 2))
    run_one(store, A, "wa", at=T0, wall=0.5, outcome="fail")
    for second, wall in enumerate((1, 2, 3, 4)):
        run_one(store, A, "wa", at=T0 + 10 * (second + 1), wall=wall,
                result={"fit_seconds": wall / 10, "auc": 0.9, "note_seconds": "n/a", "flag_seconds": True})
    run_one(store, B, "wb", at=T0, outcome=None, lease=5)  # never reported: its lease lapses
    run_one(store, B, "wb", at=T0 + 30, wall=10, result={"fit_seconds": 1.0})  # takes it back first
    run_one(store, B, "wb", at=T0 + 30, wall=7, outcome="release")
    run_one(store, B, "wb", at=T0 + 40, wall=20, result={"fit_seconds": 3.0})
    return store


def test_report_tables_hold_the_right_numbers_for_a_known_database(make_store, tmp_path):
    store = known_study(make_store)
    out = tmp_path / "report"
    result = invoke("report", "--db", store.path, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"{out / 'report.html'}: 6 results, 4 plots" in result.output
    page = Tables((out / "report.html").read_text())
    header = ["shape", "cores", "memory GB", "n", "mean s", "median s", "p95 s"]
    # p95 interpolates between the closest ranks: 3 + 0.85 * (4 - 3) and 10 + 0.95 * (20 - 10).
    assert page.tables["wall_seconds"] == [header, ["c1-m2", "1", "2", "4", "2.50", "2.50", "3.85"],
                                           ["c2-m4", "2", "4", "2", "15.0", "15.0", "19.5"]]
    # Only numeric *_seconds result fields are timing fields (not auc, not a string, not a bool).
    assert page.tables["fit_seconds"] == [header, ["c1-m2", "1", "2", "4", "0.250", "0.250", "0.385"],
                                          ["c2-m4", "2", "4", "2", "2.00", "2.00", "2.90"]]
    assert set(page.tables) == {"wall_seconds", "fit_seconds", "fit-wall_seconds", "fit-fit_seconds", "attempts",
                                "idle"}
    # Both c2-m4 runs were interrupted first (an expiry, a release): flagged, not fitted. What is
    # left has one shape: the curve is its geometric mean, with nothing to say of cores or memory.
    assert page.tables["fit-wall_seconds"][1] == ["all runs", "4", "2", f"{24 ** 0.25:.3g}", "–", "–", "0"]
    history = page.tables["attempts"]
    assert history[0] == ["shape", "cores", "memory GB", "attempts", "DONE", "errors", "interrupted", "expired",
                          "late reports", "experiments FAILED", "re-run compute s", "share of compute"]
    # Re-run compute: the failure's 0.5 s; the expired attempt's claim-to-take-back 30 s plus
    # the released one's 7 s. Shares: 0.5 of 10.5 s, 37 of 67 s.
    assert history[1:] == [["c1-m2", "1", "2", "5", "4", "1", "0", "0", "0", "0", "0.500", "4.8%"],
                           ["c2-m4", "2", "4", "4", "2", "0", "1", "1", "0", "0", "37.0", "55.2%"],
                           ["all", "", "", "9", "6", "1", "1", "1", "0", "0", "37.5", "48.4%"]]
    assert page.images == ["wall-time.png", "wall-time-heatmap.png", "result-fit-seconds.png",
                           "result-fit-seconds-heatmap.png"]
    for image in page.images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / image).stat().st_size > 10_000


def test_report_of_a_study_without_results_still_writes_the_page_and_says_so(make_store, tmp_path):
    store = make_store(grid([A], 3))
    run_one(store, A, "w", at=T0, wall=2.0, outcome="fail")
    out = tmp_path / "empty"
    result = invoke("report", "--db", store.path, "--out", out)
    assert result.exit_code == 0, result.output
    assert "0 results, 0 plots (no results yet)" in result.output
    text = (out / "report.html").read_text()
    assert "No results yet" in text and "none of the 3 experiments is DONE" in text
    assert sorted(path.name for path in out.iterdir()) == ["report.html"]
    history = Tables(text).tables["attempts"]
    assert history[1] == ["c1-m2", "1", "2", "1", "0", "1", "0", "0", "0", "0", "2.00", "100.0%"]


def test_report_of_a_missing_database_is_a_clear_error_and_writes_nothing(tmp_path):
    result = invoke("report", "--db", tmp_path / "nothing.db", "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert "nothing.db: no such database" in result.output
    assert not (tmp_path / "nothing.db").exists() and not (tmp_path / "out").exists()
    assert invoke("report", "--out", tmp_path / "out").exit_code == 2  # neither --db nor --dir


def test_report_into_a_path_that_is_a_file_is_refused(make_store, tmp_path):
    store = make_store(grid([A], 1))
    (tmp_path / "taken").write_text("")
    result = invoke("report", "--db", store.path, "--out", tmp_path / "taken")
    assert result.exit_code == 2 and "not a directory" in result.output


# ---------------------------------------------------------------- the scaling fit, facets, flags

CURVE = {"a": 100.0, "b": -0.8, "c": 3.0}  # time = 100 s · cores^-0.8 · (1 + 3 GB / memory)
SHAPES = [(cores, memory) for cores in (1, 2, 4, 8) for memory in (2, 4, 8, 16)]


def curve_time(cores, memory_gb, curve=CURVE):
    return curve["a"] * cores ** curve["b"] * (1 + curve["c"] / memory_gb)


def test_the_fitted_curve_recovers_known_exponents_and_leaves_flagged_runs_out():
    runs = [{"cores": c, "memory_gb": m, "value": curve_time(c, m) * math.exp(0.02 * math.sin(7 * i)), "flag": None}
            for i, (c, m) in enumerate(SHAPES * 3)]
    runs.append({"cores": 1, "memory_gb": 2, "value": 5000.0, "flag": "steal 40%"})  # would ruin the fit
    fit = fit_scaling(runs)
    assert (fit["n"], fit["flagged"]) == (48, 1)
    assert fit["b"] == pytest.approx(CURVE["b"], abs=0.02)
    assert fit["c"] == pytest.approx(CURVE["c"], rel=0.05)
    assert fit["a"] == pytest.approx(CURVE["a"], rel=0.05)
    assert fit["r2"] > 0.99


def test_a_fit_with_one_memory_value_says_nothing_of_memory():
    fit = fit_scaling([{"cores": c, "memory_gb": 4, "value": curve_time(c, 4), "flag": None} for c in (1, 2, 4)])
    assert fit["c"] is None and fit["b"] == pytest.approx(-0.8) and fit["r2"] == pytest.approx(1.0)


def test_report_by_a_parameter_plots_and_fits_each_value_and_flags_stolen_time(make_store, tmp_path):
    sizes = {500: -0.5, 2000: -0.9}  # the larger training set scales better with cores
    shapes = [(1, 2), (2, 2), (2, 8), (4, 8)]
    store = make_store([{"cores": c, "memory_gb": m, "size": size, "i": i}
                        for c, m in shapes for size in sizes for i in range(2)])
    at = T0
    for cores, memory in shapes:
        for _ in range(4):
            claimed = store.claim("w", cores, memory, now=at, lease_seconds=60)["experiment"]
            curve = {**CURVE, "b": sizes[claimed["params"]["size"]]}
            wall = curve_time(cores, memory, curve)
            stolen = claimed["params"]["i"] == 1 and (cores, memory) == (4, 8)
            host = {"cpus": cpu_list(range(cores)), "confinement": "cgroup", "cpu_model": "Test CPU",
                    "steal_seconds": 0.5 * wall * cores if stolen else 0.0, "max_rss_mb": 42.0}
            store.complete(claimed["lease_token"], {}, wall, now=at + wall, host=host)
            at += wall
    out = tmp_path / "by"
    result = invoke("report", "--db", store.path, "--out", out, "--by", "size")
    assert result.exit_code == 0, result.output
    page = Tables((out / "report.html").read_text())
    fits = {row[0]: row for row in page.tables["fit-wall_seconds"][1:]}
    assert page.tables["fit-wall_seconds"][0][0] == "size"
    assert list(fits) == ["size=500", "size=2000"]  # in the order of the values
    for size, b in sizes.items():
        n, flagged, _, fitted_b, fitted_c, r2 = fits[f"size={size}"][1:]
        assert (n, flagged) == ("7", "1")  # the run with half its CPU time stolen is left out
        assert float(fitted_b) == pytest.approx(b, abs=0.01) and float(fitted_c) == pytest.approx(3.0, rel=0.02)
    hosts = page.tables["hosts"]
    assert hosts[1][:6] == ["c1-m2", "1", "2", "4", "cgroup", "0"] and hosts[1][6] == "Test CPU"
    assert hosts[-1][5] == "0-3" and hosts[-1][9] == "42"
    refused = invoke("report", "--db", store.path, "--out", tmp_path / "x", "--by", "species")
    assert refused.exit_code == 2 and "--by species" in refused.output and "size" in refused.output
