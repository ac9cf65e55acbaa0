"""Hostile input against the socket service: the server stays up, keeps answering a well-behaved
client within a second during each attack, and refused requests change nothing."""

import hashlib
import json
import socket
import sqlite3
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as strategies

from sdm_peer.client import Client
from sdm_peer.errors import BadInput, LeaseLost, Unauthorized

from .conftest import grid
from .test_server import Conn
from .runs import make_run

SHAPE = {"cores": 2, "memory_gb": 4}


# Columns the probe's own renewals move; everything else must stay as it was.
PROBE_MOVES = {"lease_expires_at", "updated_at", "last_seen"}


def fingerprint(db):
    """Row counts and a checksum of every table: what a refused request must not change."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        digest = hashlib.sha256()
        counts = {}
        for table in tables:
            rows = conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            counts[table] = len(rows)
            for row in rows:
                digest.update(repr({k: row[k] for k in row.keys() if k not in PROBE_MOVES}).encode())
    return counts, digest.hexdigest()


@pytest.fixture
def served(tmp_path, spawn_server):  # noqa: F811
    """A server with one claimed experiment (a live lease), and a well-behaved probe client that
    must be answered within 1 s, without retries."""
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 3))
    server = spawn_server(db, lease_seconds=30)
    good = Client(server.address, token, timeout=1.0, retry_seconds=0)
    lease = good.call("claim", worker_id="good", **SHAPE)["experiment"]["lease_token"]

    def probe():
        good.call("renew", lease_token=lease)
        return good.call("status")["totals"]["started"] == 1

    yield db, token, server, probe
    good.close()


def under_attack(attack, probe, seconds=None):
    """Run `attack` in a thread while probing the server every 0.1 s; the probe must keep working."""
    errors = []

    def run():
        try:
            attack()
        except OSError:
            pass  # the server closing on the attacker is the expected end of many attacks
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + (seconds or 0)
    probes = 0
    while thread.is_alive() or time.monotonic() < deadline:
        assert probe()
        probes += 1
        time.sleep(0.1)
    thread.join()
    assert not errors, errors
    assert probe()
    return probes


def test_random_bytes_invalid_utf8_and_deep_nesting_are_refused_and_change_nothing(served):
    db, token, server, probe = served
    before = fingerprint(db)
    with Conn(server.address, token) as conn:
        for payload in (b"\xff\xfe\x00garbage\n", b"\xc3\x28\n", b"[" * 200_000 + b"\n", b"{\"v\":1,\"id\":\n",
                        b"null\n", b"42\n", json.dumps({"v": 1, "id": 1, "op": "claim", "token": token,
                                                         "args": {"worker_id": 7, "cores": "2"}}).encode() + b"\n"):
            conn.send(payload)
            answer = conn.read()
            assert answer["ok"] is False and answer["error"]["code"] == "BAD_REQUEST"
            assert token not in json.dumps(answer)
    assert probe() and fingerprint(db) == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=strategies.binary(max_size=300).filter(lambda data: b"\n" not in data))
def test_any_bytes_get_an_error_answer_and_the_server_stays_up(served, payload):
    db, token, server, probe = served
    with Conn(server.address, token) as conn:
        conn.send(payload + b"\n")
        if payload.strip():
            assert conn.read()["ok"] is False
    assert probe()


def test_wrong_types_unknown_ops_and_missing_or_wrong_tokens_change_nothing(served):
    db, token, server, probe = served
    before = fingerprint(db)
    with Conn(server.address, token) as conn:
        assert conn.ask("drop_tables")["error"]["code"] == "BAD_REQUEST"
        assert conn.ask("claim", worker_id=["x"], cores=2, memory_gb=4)["error"]["code"] == "BAD_REQUEST"
        assert conn.ask("complete", lease_token="x", result=[1], wall_seconds=1)["error"]["code"] == "BAD_REQUEST"
    for bad_token in (None, "", "wrong", token + "x"):
        with Conn(server.address, bad_token) as conn:
            answer = conn.ask("claim", worker_id="thief", **SHAPE)
            assert answer["error"]["code"] == "UNAUTHORIZED" and token not in json.dumps(answer)
    assert probe() and fingerprint(db) == before


def test_stale_and_forged_lease_tokens_are_lease_lost_and_change_nothing(served):
    db, token, server, probe = served
    thief = Client(server.address, token, timeout=5.0, retry_seconds=0)
    before = fingerprint(db)
    for forged in ("forged", "A" * 24, "' OR 1=1 --"):
        for op, args in (("renew", {"lease_token": forged}),
                         ("complete", {"lease_token": forged, "result": {}, "wall_seconds": 1.0}),
                         ("fail", {"lease_token": forged, "error": "x", "exit_code": 1, "wall_seconds": 1.0}),
                         ("release", {"lease_token": forged, "reason": "x"})):
            with pytest.raises(LeaseLost):
                thief.call(op, **args)
    thief.close()
    assert probe() and fingerprint(db) == before


def test_a_100_mib_line_is_refused_while_others_are_served(served):
    db, token, server, probe = served
    before = fingerprint(db)

    def flood():
        with socket.create_connection(server.address, timeout=10) as sock:
            chunk = b"x" * (1 << 20)
            for _ in range(100):
                sock.sendall(chunk)

    under_attack(flood, probe)
    assert fingerprint(db) == before


def test_a_client_sending_one_byte_a_second_does_not_hold_up_others(served):
    db, token, server, probe = served
    request = json.dumps({"v": 1, "id": 1, "op": "status", "token": token}).encode()

    def trickle():
        with socket.create_connection(server.address, timeout=10) as sock:
            for byte in request[:4]:
                sock.sendall(bytes([byte]))
                time.sleep(1.0)

    assert under_attack(trickle, probe) >= 10


def test_a_thousand_idle_connections_do_not_hold_up_others(served):
    db, token, server, probe = served
    idle = [socket.create_connection(server.address, timeout=10) for _ in range(1000)]
    try:
        assert probe()  # within its calls' 1 s timeout
    finally:
        for sock in idle:
            sock.close()
    assert probe()


def test_failed_authentication_is_throttled_per_address_but_the_right_token_still_works(served):
    db, token, server, probe = served
    refusals = []
    for attempt in range(23):
        with Conn(server.address, f"guess-{attempt}") as conn:
            answer = conn.ask("status")
            refusals.append(answer["error"]["message"])
            if "slowed down" in answer["error"]["message"]:
                assert conn.closed_by_server(within=2.0)
    assert not any("slowed down" in message for message in refusals[:20])
    assert all("slowed down" in message for message in refusals[20:])
    assert probe()  # the same address, with the right token, is served as before
    log = server.log()
    assert "guess-" not in log and token not in log
    assert log.count("throttling this address") == 1


def test_injection_strings_are_stored_verbatim(tmp_path, spawn_server):  # noqa: F811
    evil = "x'); DROP TABLE experiments; --"
    rows = [{"cores": 2, "memory_gb": 4, "key": evil, "note": evil, '"; DELETE FROM configs; --': 1}]
    db, token = make_run(tmp_path / "run", rows)
    server = spawn_server(db)
    client = Client(server.address, token, timeout=5.0, retry_seconds=0)
    claimed = client.call("claim", worker_id=evil, **SHAPE)["experiment"]
    assert claimed["key"] == evil and claimed["params"] == {"note": evil, '"; DELETE FROM configs; --': 1}
    client.call("complete", lease_token=claimed["lease_token"], result={evil: evil}, wall_seconds=1.0)
    with pytest.raises(BadInput):
        client.call("claim", worker_id="x" * 1000, **SHAPE)
    with pytest.raises(Unauthorized):
        Client(server.address, evil, retry_seconds=0).call("status")
    client.close()
    counts, _ = fingerprint(db)
    assert counts["experiments"] == 1 and counts["configs"] == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT key, lease_owner, result FROM experiments").fetchone() == \
            (evil, None, json.dumps({evil: evil}))
        assert conn.execute("SELECT worker FROM attempts").fetchone()[0] == evil
