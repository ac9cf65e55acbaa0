"""`sdm-peer serve` as a real process on 127.0.0.1, spoken to over raw sockets (DESIGN §4, §5).

Every server a test starts is stopped by the `spawn_server` fixture with SIGTERM, which also
checks that it exits 0 within STOP_TIMEOUT seconds."""

import itertools
import json
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sdm_peer.protocol import MAX_LINE

from .conftest import grid
from .runs import ServerProcess, make_run, wait_for

SHAPE = {"cores": 2, "memory_gb": 4}


@pytest.fixture
def run(tmp_path):
    """A run of 3 experiments of shape c2-m4: (db, token)."""
    return make_run(tmp_path / "run", grid([(2, 4)], 3))


class Conn:
    """A raw protocol connection: send bytes or requests, read one answer line at a time."""

    def __init__(self, address, token=None, timeout=10.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.token = token
        self.ids = itertools.count(1)
        self.raw = []  # every answer line, as received

    def send(self, data):
        self.sock.sendall(data)

    def read(self):
        line = self.file.readline()
        assert line.endswith(b"\n"), f"no answer line, got {line!r}"
        self.raw.append(line)
        return json.loads(line)

    def ask(self, op, *, request_id=None, token=..., **args):
        request_id = next(self.ids) if request_id is None else request_id
        token = self.token if token is ... else token
        message = {"v": 1, "id": request_id, "op": op, "args": args}
        if token is not None:
            message["token"] = token
        self.send(json.dumps(message).encode() + b"\n")
        answer = self.read()
        assert answer["id"] == request_id and answer["v"] == 1
        return answer

    def closed_by_server(self, within):
        """True once the server closes the connection (EOF) within `within` seconds."""
        timeout = self.sock.gettimeout()
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""  # answers are read whole, so nothing is buffered past them
        except (TimeoutError, socket.timeout):
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(timeout)

    def close(self):
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def result_of(answer):
    assert answer["ok"] is True, answer
    return answer["result"]


def code_of(answer):
    assert answer["ok"] is False, answer
    assert answer["error"]["message"], answer
    return answer["error"]["code"]


def claim(conn, worker="w1", **shape):
    return result_of(conn.ask("claim", worker_id=worker, **{**SHAPE, **shape}))["experiment"]


def status(conn):
    return result_of(conn.ask("status"))


def experiments_in(db):
    with sqlite3.connect(db) as con:
        return {key: (status, attempts) for key, status, attempts in
                con.execute("SELECT key, status, attempts FROM experiments")}


# ---------------------------------------------------------------- starting up


def loopback_listeners(port):
    """Local addresses listening on `port`, from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # LISTEN
                found.append(address)
    return found


def test_serve_prints_listening_line_and_binds_loopback_by_default(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    host, port = server.address
    assert host == "127.0.0.1" and 0 < port < 65536
    assert server.listening_line == f"listening on 127.0.0.1:{port}"
    if Path("/proc/net/tcp").exists():
        assert loopback_listeners(port) == ["0100007F"]  # 127.0.0.1 only, not 0.0.0.0
    with Conn(server.address, token) as conn:
        assert status(conn)["totals"]["total"] == 3


def test_serve_with_a_run_dir_records_host_port_and_pid(tmp_path, spawn_server):
    make_run(tmp_path / "rundir", grid([(2, 4)], 1))
    server = spawn_server(run_dir=tmp_path / "rundir")
    info = json.loads((tmp_path / "rundir" / "server.json").read_text())
    assert info == {"host": "127.0.0.1", "port": server.address[1], "pid": server.pid}


# ---------------------------------------------------------------- a conversation


def test_hello_answers_lease_seconds_and_settings_without_the_token(tmp_path, spawn_server):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 1), command="python fit.py", max_failures=5)
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        answer = result_of(conn.ask("hello", worker_id="w1", **SHAPE))
    assert answer["lease_seconds"] == 2
    assert answer["settings"]["command"] == ["python", "fit.py"] and answer["settings"]["max_failures"] == 5
    assert not [key for key in answer["settings"] if "token" in key]
    assert token.encode() not in conn.raw[0]


def test_lease_seconds_given_to_serve_becomes_the_runs_setting_and_hello_agrees(tmp_path, spawn_server):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 1), lease_seconds=60)
    server = spawn_server(db, lease_seconds=7.5)
    with Conn(server.address, token) as conn:
        changed = result_of(conn.ask("hello", worker_id="w1", **SHAPE))
    assert changed["lease_seconds"] == changed["settings"]["lease_seconds"] == 7.5
    server.stop()
    assert server.log().count("lease period changed from 60s to 7.5s") == 1
    # Started again without --lease-seconds, it serves the stored period, and says nothing.
    again = spawn_server(db, lease_seconds=None)
    with Conn(again.address, token) as conn:
        kept = result_of(conn.ask("hello", worker_id="w1", **SHAPE))
    assert kept["lease_seconds"] == kept["settings"]["lease_seconds"] == 7.5
    assert "lease period changed" not in again.log()


def test_claim_renew_complete_and_status_on_one_connection_echo_request_ids(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        claimed = result_of(conn.ask("claim", request_id=0, worker_id="w1", **SHAPE))
        experiment = claimed["experiment"]
        assert claimed["config_done"] is False and claimed["provision"] is None
        assert set(experiment) >= {"key", "params", "lease_token", "lease_seconds_left", "attempt"}
        assert experiment["lease_seconds_left"] == 2 and experiment["attempt"] == 1
        assert experiment["params"] == {"i": 0}
        # Lease times travel as seconds left, never as clock values.
        assert not any(isinstance(value, (int, float)) and value > 1e6 for value in experiment.values())
        lease = experiment["lease_token"]

        assert result_of(conn.ask("renew", request_id=2**40, lease_token=lease)) == {"lease_seconds_left": 2}
        done = result_of(conn.ask("complete", request_id=-5, lease_token=lease, result={"auc": 0.9},
                                  wall_seconds=1.25))
        assert done["status"] == "DONE" and done["provision"] is None
        totals = status(conn)["totals"]
        assert (totals["total"], totals["done"], totals["started"], totals["not_started"]) == (3, 1, 0, 2)
    assert experiments_in(db)[experiment["key"]] == ("DONE", 1)


def test_pipelined_requests_on_one_connection_are_answered_in_order(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        lines = b"".join(json.dumps({"v": 1, "id": request_id, "op": "status", "token": token}).encode() + b"\n"
                         for request_id in (11, 12, 13))
        conn.send(lines)
        answers = [conn.read() for _ in range(3)]
    assert [answer["id"] for answer in answers] == [11, 12, 13]
    assert all(answer["ok"] for answer in answers)


def test_a_client_that_pipelines_more_than_it_reads_gets_every_answer_in_order(run, spawn_server):
    """Some 2 MiB of requests sent before reading a single answer: the server stops reading
    while a line's worth waits and while the client does not read, yet loses nothing."""
    db, token = run
    server = spawn_server(db)
    padding = "x" * 250
    count = 6000
    with Conn(server.address, token) as conn, Conn(server.address, token) as other:
        lines = b"".join(json.dumps({"v": 1, "id": request_id, "op": "renew", "token": token,
                                     "args": {"lease_token": padding}}).encode() + b"\n"
                         for request_id in range(count))
        sender = threading.Thread(target=conn.send, args=(lines,))
        sender.start()
        assert status(other)["totals"]["total"] == 3  # others are served meanwhile
        answers = [conn.read() for _ in range(count)]
        sender.join(10)
    assert [answer["id"] for answer in answers] == list(range(count))
    assert {answer["error"]["code"] for answer in answers} == {"LEASE_LOST"}


def test_thousands_of_bad_lines_in_one_packet_are_each_answered_in_order(run, spawn_server):
    """Refusals are answered without waiting for the database: many in one buffer must not
    nest one answer inside the next."""
    db, token = run
    server = spawn_server(db)
    count = 5000
    with Conn(server.address, token) as conn:
        conn.send(b"".join(b'{"v": 1, "id": %d, "op": "no-such-op", "token": "t"}\n' % n for n in range(count)))
        answers = [conn.read() for _ in range(count)]
        assert [answer["id"] for answer in answers] == list(range(count))
        assert {code_of(answer) for answer in answers} == {"BAD_REQUEST"}
        assert status(conn)["totals"]["total"] == 3


def test_a_token_that_is_not_valid_unicode_is_refused_and_the_connection_kept(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        conn.send(b'{"v": 1, "id": 5, "op": "status", "token": "\\ud800"}\n')
        answer = conn.read()
        assert answer["id"] == 5 and code_of(answer) == "UNAUTHORIZED"
        assert status(conn)["totals"]["total"] == 3


def test_refusal_from_the_store_carries_the_id_and_keeps_the_connection(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        assert code_of(conn.ask("claim", request_id=77, worker_id="w1", cores=3, memory_gb=7)) == "NO_SUCH_CONFIG"
        assert code_of(conn.ask("renew", lease_token="never-issued")) == "LEASE_LOST"
        assert claim(conn)["attempt"] == 1


def test_one_renew_carries_several_leases_and_answers_each(run, spawn_server):
    """The list form: every lease renewed as it would be alone; a lease not held is refused in
    its own entry (fencing as for one lease) and the others are renewed all the same."""
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        first, second = claim(conn)["lease_token"], claim(conn, worker="w2")["lease_token"]
        answer = result_of(conn.ask("renew", leases=[{"lease_token": first}, {"lease_token": "never-issued"},
                                                     {"provision_token": "never-issued"},
                                                     {"lease_token": second}]))["leases"]
        assert [entry["ok"] for entry in answer] == [True, False, False, True]
        assert answer[0] == {"lease_token": first, "ok": True, "lease_seconds_left": 2}
        assert answer[1]["lease_token"] == "never-issued" and answer[1]["error"]["code"] == "LEASE_LOST"
        assert answer[2]["provision_token"] == "never-issued" and answer[2]["error"]["code"] == "LEASE_LOST"
        result_of(conn.ask("complete", lease_token=first, result={}, wall_seconds=1))
        refused = result_of(conn.ask("renew", leases=[{"lease_token": first}, {"lease_token": second}]))["leases"]
        assert [entry["ok"] for entry in refused] == [False, True]  # a finished lease is no longer held
        assert status(conn)["totals"]["started"] == 1


def test_bad_arguments_on_a_held_lease_change_nothing(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        lease = claim(conn)["lease_token"]
        assert code_of(conn.ask("complete", lease_token=lease, result=[1], wall_seconds=1)) == "BAD_REQUEST"
        assert code_of(conn.ask("complete", lease_token=lease, result={}, wall_seconds=True)) == "BAD_REQUEST"
        assert code_of(conn.ask("fail", lease_token=lease, error="x", wall_seconds=1)) == "BAD_REQUEST"
        assert status(conn)["totals"]["started"] == 1
        assert result_of(conn.ask("renew", lease_token=lease))["lease_seconds_left"] == 2


# ---------------------------------------------------------------- the token


def test_missing_or_wrong_token_is_unauthorized_and_changes_nothing(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        lease = claim(conn)["lease_token"]
        before = experiments_in(db)
        # 18 failures: within the per-address allowance (past it, the connection is closed).
        for wrong in (None, "", token[:-1], token + "x", 12345, ["list"]):
            answer = conn.ask("claim", request_id=31, token=wrong, worker_id="thief", **SHAPE)
            assert code_of(answer) == "UNAUTHORIZED" and answer["id"] == 31
            assert code_of(conn.ask("complete", token=wrong, lease_token=lease, result={}, wall_seconds=1)) \
                == "UNAUTHORIZED"
            assert code_of(conn.ask("release", token=wrong, worker_id="w1")) == "UNAUTHORIZED"
        assert experiments_in(db) == before
        totals = status(conn)["totals"]
        assert (totals["started"], totals["done"], totals["not_started"]) == (1, 0, 2)
    assert server.stop() == 0
    log = server.log()
    assert "refused a request" in log
    assert token not in log and lease not in log


# ---------------------------------------------------------------- bad lines


def test_line_over_one_mib_gets_too_large_and_the_server_serves_the_next_connection(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    padding = b"x" * (MAX_LINE + 1024)
    with Conn(server.address, token) as conn:
        try:
            conn.send(b'{"v":1,"id":1,"op":"status","token":"' + padding + b'"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before the whole line is sent; its answer is already on the way
        answer = conn.read()
        assert answer["id"] is None and code_of(answer) == "TOO_LARGE"
        assert "1048576" in answer["error"]["message"]
        assert conn.closed_by_server(within=5)
    with Conn(server.address, token) as conn:
        assert status(conn)["totals"]["total"] == 3


def test_line_at_the_limit_is_served(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    head = b'{"v":1,"id":4,"op":"status","token":"%s","pad":"' % token.encode()
    line = head + b"x" * (MAX_LINE - len(head) - 3) + b'"}\n'
    assert len(line) == MAX_LINE
    with Conn(server.address, token) as conn:
        conn.send(line)
        assert result_of(conn.read())["totals"]["total"] == 3


def test_garbage_gets_bad_request_and_the_connection_keeps_working(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        for garbage in (b"\x00\xff\xfe\x80garbage\n", b"GET / HTTP/1.1\r\n", b"{\"v\": 1,\n", b"[" * 100_000 + b"\n"):
            conn.send(garbage)
            answer = conn.read()
            assert answer["id"] is None and code_of(answer) == "BAD_REQUEST"
        conn.send(b"\n  \r\n")  # blank lines are skipped, not answered
        conn.send(json.dumps({"v": 9, "id": 5, "op": "status", "token": token}).encode() + b"\n")
        answer = conn.read()
        assert answer["id"] == 5 and code_of(answer) == "BAD_REQUEST" and "version" in answer["error"]["message"]
        assert status(conn)["totals"]["total"] == 3


def test_client_that_disconnects_mid_line_does_not_disturb_the_server(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        conn.send(b'{"v":1,"id":1,"op":"sta')
    with Conn(server.address, token) as conn:
        assert status(conn)["totals"]["total"] == 3


# ---------------------------------------------------------------- leases


def test_server_start_extends_held_leases(tmp_path, spawn_server):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 1))
    server = spawn_server(db, lease_seconds=2)
    with Conn(server.address, token) as conn:
        experiment = claim(conn, "w1")
    assert server.stop() == 0
    with sqlite3.connect(db) as con:  # the lease period passes while the server is down
        con.execute("UPDATE experiments SET lease_expires_at = lease_expires_at - 2.3")

    server = spawn_server(db, lease_seconds=2)
    assert "1 held leases extended" in server.log()
    with Conn(server.address, token) as conn:
        assert claim(conn, "w2") is None  # not taken back
        assert result_of(conn.ask("renew", lease_token=experiment["lease_token"]))["lease_seconds_left"] == 2
        result_of(conn.ask("complete", lease_token=experiment["lease_token"], result={}, wall_seconds=3))
    assert experiments_in(db)[experiment["key"]] == ("DONE", 1)


# ---------------------------------------------------------------- connection limits


def test_connection_beyond_max_connections_gets_busy(run, spawn_server):
    db, token = run
    server = spawn_server(db, "--max-connections", "3")
    held = [Conn(server.address, token) for _ in range(3)]
    try:
        for conn in held:
            status(conn)  # each is being served
        with Conn(server.address, token) as extra:
            answer = extra.read()
            assert answer["id"] is None and code_of(answer) == "BUSY" and "3 connections" in answer["error"]["message"]
            assert extra.closed_by_server(within=5)
        held.pop().close()

        def served_again():  # the server notices the close soon; then a new connection is served again
            with Conn(server.address, token) as conn:
                conn.send(json.dumps({"v": 1, "id": 1, "op": "status", "token": token}).encode() + b"\n")
                return conn.read()["ok"]
        wait_for(served_again, timeout=5, what="a freed connection slot reused")
        for conn in held:
            assert status(conn)["totals"]["total"] == 3
    finally:
        for conn in held:
            conn.close()


@pytest.mark.timeout(30)
def test_idle_connection_is_closed_while_an_active_one_stays(run, spawn_server):
    db, token = run
    server = spawn_server(db, "--idle-timeout", "1")
    with Conn(server.address, token) as idle, Conn(server.address, token) as active:
        status(idle)
        answered = 0
        while not idle.closed_by_server(within=0.3):  # bounded by the test's timeout
            status(active)
            answered += 1
        assert answered >= 2  # the idle one stayed open a while, the active one served meanwhile
        status(active)  # still open: it never sat idle for a whole second


# ---------------------------------------------------------------- stopping


def test_sigterm_with_an_idle_client_connected_exits_cleanly(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    with Conn(server.address, token) as conn:
        lease = claim(conn)["lease_token"]
        assert server.stop() == 0  # within STOP_TIMEOUT
        assert conn.closed_by_server(within=5)
    assert "stopped" in server.log()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT status FROM experiments WHERE lease_token = ?", (lease,)).fetchone() == ("STARTED",)


def test_serve_refuses_a_missing_database(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "sdm_peer", "serve", "--db", str(tmp_path / "nope.db"),
                                "--port", "0"], capture_output=True, text=True, timeout=30)
    assert completed.returncode == 2 and "no such database" in completed.stderr
    assert not (tmp_path / "nope.db").exists()


# ---------------------------------------------------------------- many clients


def test_twenty_concurrent_clients_finish_every_experiment_exactly_once(tmp_path, spawn_server):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 60))
    server = spawn_server(db, lease_seconds=30)
    completed, errors = [], []
    lock = threading.Lock()

    def worker(number):
        try:
            with Conn(server.address, token) as conn:
                result_of(conn.ask("hello", worker_id=f"w{number}", **SHAPE))
                for _ in range(100):  # bounded: 60 experiments in all
                    experiment = claim(conn, f"w{number}")
                    if experiment is None:
                        return
                    result_of(conn.ask("complete", lease_token=experiment["lease_token"],
                                       result={"by": number}, wall_seconds=0.01))
                    with lock:
                        completed.append(experiment["key"])
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert len(completed) == len(set(completed)) == 60
    with Conn(server.address, token) as conn:
        totals = status(conn)["totals"]
    assert (totals["total"], totals["done"], totals["started"]) == (60, 60, 0)
    assert server.stop() == 0
    assert set(experiments_in(db).values()) == {("DONE", 1)}
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*), COUNT(DISTINCT experiment) FROM attempts").fetchone() == (60, 60)


def test_the_server_lifts_its_open_files_limit_for_its_connections(run, tmp_path):
    import resource

    db, _ = run
    # Start it as a VM would: with a soft limit of 1024 open files.
    lowered = ("import resource; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1];"
               " resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard));"
               " from sdm_peer.cli import main; main()")
    server = ServerProcess([sys.executable, "-c", lowered, "serve", "--db", str(db), "--port", "0",
                            "--max-connections", "5000"], tmp_path / "limits.log")
    try:
        limits = Path(f"/proc/{server.pid}/limits").read_text()
        soft = int(next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3])
    finally:
        assert server.stop() == 0
    assert soft >= min(5256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]) > 1024
