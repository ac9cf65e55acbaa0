"""`sdm-peer report` on a database built with Store calls and fixed results: the tables carry
the right numbers, the plots are written beside report.html, and an empty study or a missing
database gets a clear answer."""

import html.parser

from click.testing import CliRunner

from sdm_peer.cli import main

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
    assert f"{out / 'report.html'}: 6 results, 2 plots" in result.output
    page = Tables((out / "report.html").read_text())
    header = ["shape", "cores", "memory GB", "n", "mean s", "median s", "p95 s"]
    # p95 interpolates between the closest ranks: 3 + 0.85 * (4 - 3) and 10 + 0.95 * (20 - 10).
    assert page.tables["wall_seconds"] == [header, ["c1-m2", "1", "2", "4", "2.50", "2.50", "3.85"],
                                           ["c2-m4", "2", "4", "2", "15.0", "15.0", "19.5"]]
    # Only numeric *_seconds result fields are timing fields (not auc, not a string, not a bool).
    assert page.tables["fit_seconds"] == [header, ["c1-m2", "1", "2", "4", "0.250", "0.250", "0.385"],
                                          ["c2-m4", "2", "4", "2", "2.00", "2.00", "2.90"]]
    assert set(page.tables) == {"wall_seconds", "fit_seconds", "attempts", "idle"}
    history = page.tables["attempts"]
    assert history[0] == ["shape", "cores", "memory GB", "attempts", "DONE", "errors", "interrupted", "expired",
                          "late reports", "experiments FAILED", "re-run compute s", "share of compute"]
    # Re-run compute: the failure's 0.5 s; the expired attempt's claim-to-take-back 30 s plus
    # the released one's 7 s. Shares: 0.5 of 10.5 s, 37 of 67 s.
    assert history[1:] == [["c1-m2", "1", "2", "5", "4", "1", "0", "0", "0", "0", "0.500", "4.8%"],
                           ["c2-m4", "2", "4", "4", "2", "0", "1", "1", "0", "0", "37.0", "55.2%"],
                           ["all", "", "", "9", "6", "1", "1", "1", "0", "0", "37.5", "48.4%"]]
    assert page.images == ["wall-time.png", "result-fit-seconds.png"]
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
