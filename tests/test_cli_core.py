"""`init`, `status` and `export` as a user drives them (DESIGN §5): through click's runner, and
as the installed `sdm-peer` command in a real process.

A bad plan or a bad setting must give exit code 2, one error line naming the file (and the row
where there is one), and leave the database exactly as it was, or absent if there was none."""

import csv
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdm_peer import states as st
from sdm_peer.cli import main
from sdm_peer.store import Store

SDM_PEER = shutil.which("sdm-peer", path=str(Path(sys.executable).parent)) or "sdm-peer"
REQUIRED_COUNTS = ["total", "not_started", "started", "done", "error", "interrupted", "failed", "legacy"]
REQUIRED_CONFIG = ["name", "cores", "memory_gb", "state", *REQUIRED_COUNTS]

# A 4-core shape: with provider=local these runs go unconfined (confine=none), whatever this machine's size.
CSV_PLAN = """cores,memory_gb,species,alpha,n
2,4,oak,0.5,3
2,4,pine,1e-3,4
2,4,fir,0.25,5
4,8.0,oak,2,-6
"""


def invoke(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def dump(db):
    """Every table's schema and rows, as SQL text: equal dumps mean nothing changed."""
    conn = sqlite3.connect(db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def rows(db, sql):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(sql)]
    finally:
        conn.close()


def experiments(db):
    store = Store(db, create=False)
    try:
        return {exp["key"]: exp for exp in store.experiments()}
    finally:
        store.close()


def error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture
def csv_plan(cli_env):
    path = cli_env / "plan.csv"
    path.write_text(CSV_PLAN)
    return path


@pytest.fixture
def db(cli_env, csv_plan):
    """A run initialised from the CSV plan, with one experiment done, one running, one in error."""
    path = cli_env / "run.db"
    assert invoke("init", path, "--plan", csv_plan, "--set", "provider=local", "--set", "confine=none").exit_code == 0
    store = Store(path)
    try:
        now = time.time()
        done, failed, _running = (store.claim(worker, 2, 4, now=now, lease_seconds=60)["experiment"]
                                  for worker in ("w1", "w2", "w3"))
        store.complete(done["lease_token"], {"auc": 0.91, "presences": 120, "curve": [1, 2]}, 12.5, now=now)
        store.fail(failed["lease_token"], "Traceback: boom", 1, 0.5, now=now)
    finally:
        store.close()
    return path


# ---------------------------------------------------------------- init


def test_init_from_csv_types_numbers_and_names_configs(cli_env, csv_plan):
    result = invoke("init", "run.db", "--plan", csv_plan)
    assert result.exit_code == 0, result.output
    assert "4 experiments added in 2 new configs" in result.stdout
    exps = experiments(cli_env / "run.db")
    assert sorted(exp["params"]["species"] for exp in exps.values()) == ["fir", "oak", "oak", "pine"]
    params = {exp["params"]["species"] + exp["config"]: exp["params"] for exp in exps.values()}
    assert params["oakc2-m4"] == {"species": "oak", "alpha": 0.5, "n": 3}
    assert params["pinec2-m4"]["alpha"] == 0.001 and isinstance(params["pinec2-m4"]["n"], int)
    assert params["oakc4-m8"] == {"species": "oak", "alpha": 2, "n": -6}
    configs = rows(cli_env / "run.db", "SELECT name, cores, memory_gb, sequence, state FROM configs ORDER BY id")
    assert configs == [{"name": "c2-m4", "cores": 2, "memory_gb": 4.0, "sequence": 1, "state": "WAITING"},
                       {"name": "c4-m8", "cores": 4, "memory_gb": 8.0, "sequence": 2, "state": "WAITING"}]
    assert all(exp["status"] == st.NOT_STARTED for exp in exps.values())


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_init_from_json_and_jsonl_keeps_keys_group_sizes_and_nested_params(cli_env, suffix):
    plan_rows = [
        {"key": "oak-1", "cores": 8, "memory_gb": 30.5, "group_size": 3, "species": "oak",
         "grid": {"res": 0.5, "bands": [1, 2]}, "flag": True},
        {"key": "oak-2", "cores": 8, "memory_gb": 30.5, "species": "oak", "grid": None, "flag": False},
        {"cores": 1, "memory_gb": 2, "species": "fir"},
    ]
    plan = cli_env / ("plan" + suffix)
    plan.write_text(json.dumps(plan_rows) if suffix == ".json" else "\n".join(map(json.dumps, plan_rows)) + "\n")
    result = invoke("init", "run.db", "--plan", plan, "--group-size", 2)
    assert result.exit_code == 0, result.output
    exps = experiments(cli_env / "run.db")
    assert exps["oak-1"]["params"] == {"species": "oak", "grid": {"res": 0.5, "bands": [1, 2]}, "flag": True}
    assert exps["oak-2"]["params"] == {"species": "oak", "grid": None, "flag": False}
    assert exps["oak-1"]["config"] == "c8-m30.5" and exps["oak-1"]["memory_gb"] == 30.5
    made = [key for key in exps if key not in ("oak-1", "oak-2")]
    assert len(made) == 1 and made[0].startswith("c1-m2")
    sizes = {row["name"]: row["group_size"] for row in rows(cli_env / "run.db", "SELECT * FROM configs")}
    assert sizes == {"c8-m30.5": 3, "c1-m2": 2}  # the plan's group_size, else --group-size


def test_token_file_is_private_and_kept_when_init_runs_again(cli_env, csv_plan):
    assert invoke("init", "run.db", "--plan", csv_plan).exit_code == 0
    token = cli_env / "run.db.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    secret, stamp = token.read_text(), token.stat().st_mtime_ns
    assert len(secret.strip()) >= 32
    assert invoke("init", "run.db", "--plan", csv_plan).exit_code == 0
    assert token.read_text() == secret and token.stat().st_mtime_ns == stamp


def test_token_file_option_writes_the_token_there_only(cli_env, csv_plan):
    (cli_env / "secrets").mkdir()
    result = invoke("init", "run.db", "--plan", csv_plan, "--token-file", "secrets/tok")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((cli_env / "secrets" / "tok").stat().st_mode) == 0o600
    assert not (cli_env / "run.db.token").exists()


def test_token_file_in_a_missing_directory_is_refused_before_anything_is_written(cli_env, csv_plan):
    result = invoke("init", "run.db", "--plan", csv_plan, "--token-file", "nowhere/tok")
    assert result.exit_code == 2
    assert "nowhere" in error_line(result)
    assert sorted(p.name for p in cli_env.iterdir()) == ["plan.csv"]


def test_init_into_a_missing_directory_is_a_clear_error(cli_env, csv_plan):
    result = invoke("init", "nowhere/run.db", "--plan", csv_plan)
    assert result.exit_code == 2 and "nowhere" in error_line(result)


def test_init_over_a_file_that_is_not_a_database_is_a_clear_error(cli_env, csv_plan):
    (cli_env / "notes.db").write_text("not a database\n")
    result = invoke("init", "notes.db", "--plan", csv_plan)
    assert result.exit_code != 0 and "notes.db" in error_line(result)
    assert (cli_env / "notes.db").read_text() == "not a database\n"


def test_init_again_with_the_same_plan_adds_nothing_and_changes_nothing(cli_env, csv_plan, db):
    before = dump(db)
    for extra in ([], ["--set", "provider=local", "--set", "confine=none"]):
        result = invoke("init", db, "--plan", csv_plan, *extra)
        assert result.exit_code == 0, result.output
        assert "0 experiments added in 0 new configs" in result.stdout
        assert dump(db) == before


def test_init_with_a_longer_plan_adds_only_the_new_rows(cli_env, csv_plan, db):
    old = experiments(db)
    old_configs = rows(db, "SELECT * FROM configs ORDER BY id")
    longer = cli_env / "longer.csv"
    longer.write_text(CSV_PLAN + "2,4,elm,0.5,7\n16,64,oak,0.5,3\n")
    result = invoke("init", db, "--plan", longer)
    assert result.exit_code == 0, result.output
    assert "2 experiments added in 1 new configs" in result.stdout
    new = experiments(db)
    assert {key: new[key] for key in old} == old  # progress, results, leases: all untouched
    added = [new[key] for key in new.keys() - old.keys()]
    assert sorted((exp["config"], exp["params"]["species"], exp["status"]) for exp in added) == \
        [("c16-m64", "oak", st.NOT_STARTED), ("c2-m4", "elm", st.NOT_STARTED)]
    configs = rows(db, "SELECT * FROM configs ORDER BY id")
    assert configs[:2] == old_configs
    assert (configs[2]["name"], configs[2]["sequence"], configs[2]["state"]) == ("c16-m64", 3, "WAITING")


# ---------------------------------------------------------------- bad plans

BAD_PLANS = {
    # name: (file name, content, text the error must contain, row named in the error or None)
    "missing cores": ("p.csv", "memory_gb,x\n4,1\n", "missing column 'cores'", "row 1"),
    "missing memory_gb in a later row": ("p.csv", "cores,memory_gb\n2,4\n2,4\n4,\n", "'memory_gb'", "row 3"),
    "non-numeric cores": ("p.json", '[{"cores": "two", "memory_gb": 4}]', "cores must be", "row 1"),
    "fractional cores": ("p.csv", "cores,memory_gb\n2,4\n2.5,4\n", "whole number", "row 2"),
    "zero cores": ("p.csv", "cores,memory_gb\n0,4\n", "cores must be positive", "row 1"),
    "negative memory": ("p.jsonl", '{"cores": 2, "memory_gb": 4}\n{"cores": 2, "memory_gb": -1}\n',
                        "memory_gb must be positive", "row 2"),
    "non-finite memory (JSON)": ("p.json", '[{"cores": 2, "memory_gb": Infinity}]', "Infinity", None),
    "non-finite memory (CSV)": ("p.csv", "cores,memory_gb\n2,1e400\n", "memory_gb must be a number", "row 1"),
    "NaN parameter": ("p.jsonl", '{"cores": 2, "memory_gb": 4, "x": NaN}\n', "NaN", "row 1"),
    "duplicate keys": ("p.csv", "key,cores,memory_gb\na,2,4\nb,2,4\na,4,8\n", "duplicate key 'a'", "row 3"),
    "a JSON row that is not an object": ("p.json", '[{"cores": 2, "memory_gb": 4}, [2, 4]]',
                                         "expected an object", "row 2"),
    "a JSON file that is not an array": ("p.json", '{"cores": 2, "memory_gb": 4}', "array of objects", None),
    "invalid JSON": ("p.json", '[{"cores": 2, "memory_gb": 4},', "not valid JSON", None),
    "invalid JSONL line": ("p.jsonl", '{"cores": 2, "memory_gb": 4}\n\n{"cores": 2 "memory_gb": 4}\n',
                           "not valid JSON", "row 2 (line 3)"),
    "empty file": ("p.csv", "", "empty", None),
    "header only": ("p.csv", "cores,memory_gb\n", "no rows", None),
    "empty JSON array": ("p.json", "[]", "no rows", None),
    "not UTF-8": ("p.csv", b"cores,memory_gb\n2,4\xff\n", "cannot read", None),
    "nonexistent file": (None, None, "no such plan file", None),
    "a directory": ("p.csv", "DIRECTORY", "cannot read", None),
}


def make_bad_plan(directory, case):
    name, content, _, _ = BAD_PLANS[case]
    path = directory / (name or "missing.csv")
    if content == "DIRECTORY":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return path


def check_refusal(result, plan, case):
    _, _, text, where = BAD_PLANS[case]
    assert result.exit_code == 2, (result.exit_code, result.output)
    line = error_line(result)
    assert str(plan) in line and text in line, line
    if where is not None:
        assert f": {where}" in line, line


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_leaves_an_existing_database_exactly_as_it_was(cli_env, db, case):
    (cli_env / "bad").mkdir()
    plan = make_bad_plan(cli_env / "bad", case)
    token = (cli_env / "run.db.token").read_text()
    files, raw, tables = sorted(os.listdir(cli_env)), db.read_bytes(), dump(db)
    result = invoke("init", db, "--plan", plan)
    check_refusal(result, plan, case)
    assert sorted(os.listdir(cli_env)) == files
    assert db.read_bytes() == raw
    assert dump(db) == tables
    assert (cli_env / "run.db.token").read_text() == token


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_creates_no_database(cli_env, case):
    (cli_env / "bad").mkdir()
    plan = make_bad_plan(cli_env / "bad", case)
    result = invoke("init", "run.db", "--plan", plan)
    check_refusal(result, plan, case)
    assert sorted(os.listdir(cli_env)) == ["bad"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_plan_is_refused(cli_env):
    plan = cli_env / "secret.csv"
    plan.write_text("cores,memory_gb\n2,4\n")
    plan.chmod(0)
    result = invoke("init", "run.db", "--plan", plan)
    assert result.exit_code == 2 and "cannot read" in error_line(result)
    assert not (cli_env / "run.db").exists()


# ---------------------------------------------------------------- settings


def test_unknown_setting_is_refused_with_the_valid_keys(cli_env, csv_plan, db):
    raw, tables = db.read_bytes(), dump(db)
    result = invoke("init", db, "--plan", csv_plan, "--set", "provider=local", "--set", "confine=none",
                    "--set", "lease_secs=30")
    assert result.exit_code == 2
    line = error_line(result)
    assert "'lease_secs'" in line
    for key in ("provider", "command", "lease_seconds", "group_size", "max_failures", "max_interruptions"):
        assert key in line.split("valid keys", 1)[1], line
    assert db.read_bytes() == raw and dump(db) == tables
    fresh = invoke("init", "fresh.db", "--plan", csv_plan, "--set", "nope=1")
    assert fresh.exit_code == 2 and not (cli_env / "fresh.db").exists()


@pytest.mark.parametrize("assignment", ["provider=aws", "max_failures=0", "lease_seconds=-5", "group_size=1.5",
                                        "novalue"])
def test_bad_setting_value_is_refused_and_writes_nothing(cli_env, csv_plan, assignment):
    result = invoke("init", "run.db", "--plan", csv_plan, "--set", assignment)
    assert result.exit_code == 2
    assert assignment.split("=")[0] in error_line(result)
    assert not (cli_env / "run.db").exists()


def test_settings_are_stored_typed(cli_env, csv_plan):
    settings_file = cli_env / "run.toml"
    settings_file.write_text('provider = "local"\nconfine = "none"\nlease_seconds = 30\n')
    result = invoke("init", "run.db", "--plan", csv_plan, "--settings", settings_file, "--set", "max_failures=5",
                    "--max-interruptions", 7, "--set", "command=python sim.py --fast")
    assert result.exit_code == 0, result.output
    stored = {row["key"]: json.loads(row["value"]) for row in rows(cli_env / "run.db", "SELECT * FROM settings")}
    # The local provider's default max_vcpus: this machine's cores, at least the plan's biggest shape.
    assert stored.pop("max_vcpus") >= 4  # the CSV plan's biggest shape
    assert stored == {"provider": "local", "confine": "none", "lease_seconds": 30, "max_failures": 5,
                      "max_interruptions": 7,
                      "command": ["python", "sim.py", "--fast"]}


# ---------------------------------------------------------------- status


def test_status_table_names_every_config(cli_env, db):
    result = invoke("status", "--db", db)
    assert result.exit_code == 0, result.output
    assert "c2-m4" in result.stdout and "c4-m8" in result.stdout and "RUNNING" in result.stdout


def test_status_json_has_the_contract_fields_and_right_counts(cli_env, db):
    result = invoke("status", "--db", db, "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert set(status) >= {"configs", "totals"}
    first, second = status["configs"]
    for config in status["configs"]:
        assert set(config) >= set(REQUIRED_CONFIG)
    assert set(status["totals"]) >= set(REQUIRED_COUNTS)
    assert {k: first[k] for k in REQUIRED_CONFIG} == {
        "name": "c2-m4", "cores": 2, "memory_gb": 4, "state": "RUNNING", "total": 3, "not_started": 0,
        "started": 1, "done": 1, "error": 1, "interrupted": 0, "failed": 0, "legacy": 0}
    assert {k: second[k] for k in REQUIRED_CONFIG} == {
        "name": "c4-m8", "cores": 4, "memory_gb": 8, "state": "WAITING", "total": 1, "not_started": 1,
        "started": 0, "done": 0, "error": 0, "interrupted": 0, "failed": 0, "legacy": 0}
    assert {k: status["totals"][k] for k in REQUIRED_COUNTS} == {
        "total": 4, "not_started": 1, "started": 1, "done": 1, "error": 1, "interrupted": 0, "failed": 0,
        "legacy": 0}


def test_status_of_a_missing_database_is_a_clear_error_and_creates_nothing(cli_env):
    result = invoke("status", "--db", "nothing.db")
    assert result.exit_code != 0
    assert "nothing.db" in result.stderr and "no such database" in result.stderr
    assert not (cli_env / "nothing.db").exists()
    assert invoke("status", "--db", "nothing.db", "--json").exit_code != 0


def test_status_needs_exactly_one_target(cli_env, db):
    assert invoke("status").exit_code == 2
    assert invoke("status", "--db", db, "--dir", cli_env).exit_code == 2


# ---------------------------------------------------------------- export


def test_export_csv_flattens_params_and_results(cli_env, db):
    result = invoke("export", "--db", db, "--out", "out.csv")
    assert result.exit_code == 0, result.output
    with open(cli_env / "out.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4
    columns = set(table[0])
    assert {"key", "config", "status", "param_species", "param_alpha", "param_n",
            "result_auc", "result_presences", "result_curve"} <= columns
    done = [row for row in table if row["status"] == st.DONE]
    assert len(done) == 1
    assert (done[0]["param_species"], done[0]["param_alpha"], done[0]["result_auc"], done[0]["wall_seconds"]) == \
        ("oak", "0.5", "0.91", "12.5")
    assert json.loads(done[0]["result_curve"]) == [1, 2]
    assert all(row["result_auc"] == "" for row in table if row["status"] != st.DONE)
    assert not list(cli_env.glob("*.partial"))


def test_export_jsonl_keeps_types(cli_env, db):
    result = invoke("export", "--db", db, "--out", "out.jsonl")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (cli_env / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and [line["config"] for line in lines] == ["c2-m4", "c2-m4", "c2-m4", "c4-m8"]
    done = [line for line in lines if line["status"] == st.DONE][0]
    assert done["param_alpha"] == 0.5 and done["param_n"] == 3
    assert done["result_auc"] == 0.91 and done["result_presences"] == 120 and done["result_curve"] == "[1, 2]"
    assert "params" not in done and "result" not in done


def test_export_refuses_other_extensions_and_writes_nothing(cli_env, db):
    result = invoke("export", "--db", db, "--out", "out.xlsx")
    assert result.exit_code == 2 and ".csv" in error_line(result)
    assert not list(cli_env.glob("out*"))


def test_export_into_a_missing_directory_is_a_clear_error(cli_env, db):
    result = invoke("export", "--db", db, "--out", "nowhere/out.csv")
    assert result.exit_code == 2 and "nowhere" in error_line(result)


def test_export_of_a_missing_database_is_an_error(cli_env):
    result = invoke("export", "--db", "nothing.db", "--out", "out.csv")
    assert result.exit_code != 0 and "nothing.db" in result.stderr
    assert not (cli_env / "nothing.db").exists() and not (cli_env / "out.csv").exists()


# ---------------------------------------------------------------- help


def test_help_of_every_command_exits_zero():
    assert invoke("--help").exit_code == 0
    assert set(main.commands) >= {"init", "status", "export"}
    for name in main.commands:
        result = invoke(name, "--help")
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.stdout


# ---------------------------------------------------------------- the installed command


def run_command(*args, cwd):
    return subprocess.run([SDM_PEER, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "120"})


def test_installed_command_inits_reports_and_refuses(tmp_path):
    (tmp_path / "plan.csv").write_text(CSV_PLAN)
    first = run_command("init", "run.db", "--plan", "plan.csv", "--set", "provider=local", "--set", "confine=none",
                        cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "4 experiments added in 2 new configs" in first.stdout
    assert stat.S_IMODE((tmp_path / "run.db.token").stat().st_mode) == 0o600
    tables = dump(tmp_path / "run.db")
    again = run_command("init", "run.db", "--plan", "plan.csv", cwd=tmp_path)
    assert again.returncode == 0 and "0 experiments added" in again.stdout
    assert dump(tmp_path / "run.db") == tables

    status = run_command("status", "--db", "run.db", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["totals"]["not_started"] == 4
    table = run_command("status", "--db", "run.db", cwd=tmp_path)
    assert table.returncode == 0 and "c2-m4" in table.stdout and "c4-m8" in table.stdout

    (tmp_path / "bad.csv").write_text("cores,memory_gb\n2,4\n2,x\n")
    bad = run_command("init", "run.db", "--plan", "bad.csv", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["Error: bad.csv: row 2 (line 3): memory_gb must be a number, got 'x'"]
    assert dump(tmp_path / "run.db") == tables

    missing = run_command("status", "--db", "nothing.db", cwd=tmp_path)
    assert missing.returncode != 0 and "no such database" in missing.stderr and "Traceback" not in missing.stderr
