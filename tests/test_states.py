"""The transition tables of states.py are the enforcement: the schema's CHECK lists name the
same words, every move statement's guard is its event's sources, a move the tables do not allow
is refused, and what the database really did (seen by TEMP triggers) is in the tables."""

import re
import sqlite3
from pathlib import Path

import pytest

import sdm_peer
from sdm_peer import states as st
from sdm_peer.plan import read_plan
from sdm_peer.store import MOVES, SQL, TRANSITION_TABLES, Store, schema_sql

from .conftest import LEASE, T0, grid, write_plan
from .moves import illegal, take_moves, watch_moves

WORDS = sorted({*st.STATUSES, *st.CONFIG_STATES, *st.OUTCOMES})


def schema_object(name):
    """The CREATE statement SQLite keeps for a table or index of schema.sql."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema_sql())
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    return sql


def in_list(sql, column):
    """The quoted words of the one `column IN (...)` in `sql`."""
    (values,) = re.findall(rf"\b{column} IN \(([^)]*)\)", sql)
    return re.findall(r"'([^']*)'", values)


@pytest.mark.parametrize("table, column, names", [
    ("experiments", "status", st.STATUSES),
    ("configs", "state", st.CONFIG_STATES),
    ("attempts", "outcome", st.OUTCOMES),
    ("events", "kind", st.EVENT_KINDS),
])
def test_check_lists_in_the_schema_equal_the_names_in_states(table, column, names):
    allowed = in_list(schema_object(table), column)
    assert sorted(allowed) == sorted(names) and len(set(allowed)) == len(allowed)


def test_new_rows_start_where_the_tables_say_a_plan_adds_them():
    assert re.search(rf"\bstatus\s+TEXT NOT NULL DEFAULT '{st.NOT_STARTED}'", schema_object("experiments"))
    assert re.search(rf"\bstate\s+TEXT NOT NULL DEFAULT '{st.WAITING}'", schema_object("configs"))


def test_the_claimable_index_is_the_claim_events_sources():
    assert in_list(schema_object("experiments_claimable"), "status") == \
        list(st.leaving(st.EXPERIMENT_TRANSITIONS, "claim"))


@pytest.mark.parametrize("table", TRANSITION_TABLES)
def test_every_event_has_a_statement_whose_guard_is_its_sources(table):
    column, transitions = TRANSITION_TABLES[table]
    names = st.STATUSES if table == "experiments" else st.CONFIG_STATES
    for event, (sources, targets) in transitions.items():
        assert set(sources) <= set(names) and set(targets) <= set(names), event
    events = {event for moved, event, _ in MOVES.values() if moved == table}
    assert events == set(transitions), "an event without a statement, or a statement without an event"
    for name, (moved, event, _) in MOVES.items():
        if moved != table:
            continue
        sources = transitions[event][0]
        guard = re.findall(rf"\b{column} (?:= ('[^']*')|IN (\([^)]*\)))", SQL[name])
        assert len(guard) == 1, (name, guard)
        assert re.findall(r"'([^']*)'", "".join(guard[0])) == list(sources), name
        # The status it writes is the one _move checked, never a literal of its own.
        assert not [word for word in names if f"'{word}'" in SQL[name].split("WHERE")[0]], name


@pytest.fixture
def started(make_store):
    store = make_store(grid([(2, 4)], 2))
    experiment = store.claim("w1", 2, 4, now=T0, lease_seconds=LEASE)["experiment"]
    return store, experiment["lease_token"]


def rows(store):
    return [tuple(row) for row in store.conn.execute("SELECT * FROM experiments ORDER BY id")] + \
        [tuple(row) for row in store.conn.execute("SELECT * FROM configs ORDER BY id")]


@pytest.mark.parametrize("name, to, gave_up", [
    ("complete", st.ERROR, None),  # complete leads to DONE only
    ("fail", st.ERROR, st.DONE),  # a budget that runs out gives FAILED, never DONE
    ("release", st.NOT_STARTED, st.FAILED),  # NOT STARTED is where an expiry leads, not a release
    ("config_first_claim", st.CONFIG_DONE, None),
])
def test_a_target_not_in_the_table_is_refused_before_anything_runs(started, name, to, gave_up):
    store, token = started
    before = rows(store)
    params = {"token": token, "result": "{}", "wall": 1.0, "now": T0, "max": 3, "error": "", "id": 1}
    with pytest.raises(st.IllegalTransition, match="may not lead to"), store._write() as db:
        store._move(db, name, params, to=to, gave_up=gave_up)
    assert rows(store) == before


def test_an_event_not_in_the_table_is_refused():
    with pytest.raises(st.IllegalTransition, match="no event 'teleport'"):
        st.leaving(st.EXPERIMENT_TRANSITIONS, "teleport", st.DONE)


def test_a_row_outside_the_events_sources_is_a_refusal_not_a_no_op(started):
    store, _ = started  # the claim moved the config to RUNNING: a first claim may not move it again
    before = rows(store)
    with pytest.raises(st.IllegalTransition, match="not a source"), store._write() as db:
        store._move(db, "config_first_claim", {"id": 1}, to=st.RUNNING,
                    refusal=st.IllegalTransition("RUNNING is not a source of first_claim"))
    assert rows(store) == before


def test_an_attempt_outcome_not_in_outcomes_is_refused(started):
    store, token = started
    with pytest.raises(st.IllegalTransition, match="no attempt outcome"), store._write() as db:
        store._end_attempt(db, token, st.NOT_STARTED, T0)
    assert store.attempts()[0]["outcome"] is None


def test_the_observer_sees_a_move_the_tables_do_not_allow(make_store):
    store = make_store(grid([(2, 4)], 1))
    watch_moves(store.conn)
    store.conn.execute("UPDATE experiments SET status = ?", (st.DONE,))
    assert illegal(take_moves(store.conn)) == [("experiments", st.NOT_STARTED, st.DONE)]


def test_a_plan_that_adds_to_a_finished_config_reopens_it(make_store, tmp_path):
    store = make_store([{"cores": 2, "memory_gb": 4, "key": "first"}])
    watch_moves(store.conn)

    def run_one(at):
        experiment = store.claim("w1", 2, 4, now=at, lease_seconds=LEASE)["experiment"]
        return store.complete(experiment["lease_token"], {}, 1.0, now=at + 1)["config_done"]

    assert run_one(T0)
    more = read_plan(write_plan(tmp_path / "more.json", [{"cores": 2, "memory_gb": 4, "key": "second"}]))
    assert store.import_plan(more, now=T0 + 10)["configs_reopened"] == 1
    assert store.config_state("c2-m4") == st.WAITING
    assert run_one(T0 + 20)
    once = [("experiments", st.NOT_STARTED, st.STARTED), ("configs", st.WAITING, st.RUNNING),
            ("experiments", st.STARTED, st.DONE), ("configs", st.RUNNING, st.CONFIG_DONE)]
    assert take_moves(store.conn) == [*once, ("configs", st.CONFIG_DONE, st.WAITING), *once]


def test_no_status_literal_outside_states():
    """Statuses are named constants of states.py; a quoted status word anywhere else in the
    package (SQL included: it is built from the constants) is a second, drifting copy."""
    package = Path(sdm_peer.__file__).parent
    literal = re.compile(r"""(['"])(%s)\1""" % "|".join(map(re.escape, WORDS)))
    found = [f"{path.relative_to(package)}:{number}: {line.strip()}"
             for path in sorted(package.rglob("*.py")) if path.name != "states.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert found == []
