"""The socket client: results, refusals raised as their error class and never retried, transport
failures retried until `retry_seconds`, reconnection to a restarted server, and a callable address.

Real `sdm-peer serve` processes where the server's behaviour matters; a tiny fake TCP server in a
thread where the test needs to count connections and requests or to misbehave on purpose."""

import json
import logging
import socket
import threading
import time

import pytest

from sdm_peer.client import Client
from sdm_peer.errors import (BadInput, LeaseLost, NoSuchConfig, SdmPeerError, ServerUnavailable, TooLarge,
                             Unauthorized)
from sdm_peer.rundir import RunDir

from .conftest import grid
from .runs import free_port, make_run

SHAPE = {"cores": 2, "memory_gb": 4}


class FakeServer:
    """A TCP server in a thread on 127.0.0.1. `answer(request, connection_number)` returns the
    response object to send, or None to never answer. Counts connections and keeps every request."""

    def __init__(self, answer):
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.address = self.listener.getsockname()[:2]
        self.connections = 0
        self.requests = []
        self._socks, self._threads = [], []
        self._stopping = threading.Event()
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self):
        while not self._stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.connections += 1
            self._socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, self.connections), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock, number):
        sock.settimeout(None)
        with sock.makefile("rb") as lines:
            while True:
                try:
                    line = lines.readline()
                except OSError:
                    return
                if not line:
                    return
                request = json.loads(line)
                self.requests.append(request)
                reply = self.answer(request, number)
                if reply is None:
                    continue
                try:
                    sock.sendall(reply if isinstance(reply, bytes) else json.dumps(reply).encode() + b"\n")
                except OSError:
                    return

    def close(self):
        self._stopping.set()
        self.listener.close()
        self._accepter.join(5)
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)
        assert not self._accepter.is_alive() and not any(thread.is_alive() for thread in self._threads)


@pytest.fixture
def fake_server():
    """fake_server(answer) -> FakeServer; every one is closed after the test."""
    started = []

    def start(answer):
        server = FakeServer(answer)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def ok(result):
    return lambda request, number: {"v": 1, "id": request["id"], "ok": True, "result": result}


def refuse(code, request_id=...):
    return lambda request, number: {"v": 1, "id": request["id"] if request_id is ... else request_id, "ok": False,
                                     "error": {"code": code, "message": f"refused with {code}"}}


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run", grid([(2, 4)], 2))


# ---------------------------------------------------------------- answers


def test_call_returns_the_result_of_each_op(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    client = Client(server.address, token, retry_seconds=5)
    try:
        assert client.call("hello", worker_id="w1", **SHAPE)["lease_seconds"] == 2
        experiment = client.call("claim", worker_id="w1", **SHAPE)["experiment"]
        assert experiment["attempt"] == 1
        assert client.call("renew", lease_token=experiment["lease_token"]) == {"lease_seconds_left": 2}
        assert client.call("complete", lease_token=experiment["lease_token"], result={"x": 1},
                           wall_seconds=0.5)["status"] == "DONE"
        assert client.call("status")["totals"]["done"] == 1
        assert (client.host, client.port) == server.address
    finally:
        client.close()


def test_calls_reuse_one_connection_and_number_their_requests(fake_server):
    fake = fake_server(ok({"fine": True}))
    client = Client(fake.address, "tok", retry_seconds=5)
    try:
        for _ in range(5):
            assert client.call("status") == {"fine": True}
    finally:
        client.close()
    assert fake.connections == 1
    assert [request["id"] for request in fake.requests] == [1, 2, 3, 4, 5]
    assert all(request["token"] == "tok" and request["v"] == 1 and request["op"] == "status"
               for request in fake.requests)


def test_server_refusals_raise_their_error_class(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    client = Client(server.address, token, retry_seconds=5)
    intruder = Client(server.address, "not-the-token", retry_seconds=5)
    try:
        with pytest.raises(LeaseLost):
            client.call("renew", lease_token="never-issued")
        with pytest.raises(BadInput, match="'cores' must be positive"):
            client.call("claim", worker_id="w1", cores=0, memory_gb=4)
        with pytest.raises(NoSuchConfig, match="3 cores x 7 GB"):
            client.call("claim", worker_id="w1", cores=3, memory_gb=7)
        with pytest.raises(Unauthorized):
            intruder.call("claim", worker_id="thief", **SHAPE)
        assert client.call("status")["totals"]["started"] == 0  # the connection survived every refusal
    finally:
        client.close()
        intruder.close()


@pytest.mark.parametrize("code, error_class", [
    ("LEASE_LOST", LeaseLost), ("UNAUTHORIZED", Unauthorized), ("BAD_REQUEST", BadInput),
    ("NO_SUCH_CONFIG", NoSuchConfig), ("INTERNAL", SdmPeerError),
])
def test_refusal_is_raised_once_and_never_retried(fake_server, code, error_class):
    fake = fake_server(refuse(code))
    client = Client(fake.address, "tok", retry_seconds=30)
    try:
        with pytest.raises(error_class, match=f"refused with {code}") as caught:
            client.call("renew", lease_token="lt")
    finally:
        client.close()
    assert type(caught.value) is error_class and caught.value.code == code
    assert (fake.connections, len(fake.requests)) == (1, 1)


def test_too_large_refusal_of_the_connection_is_raised_not_retried(fake_server):
    fake = fake_server(refuse("TOO_LARGE", request_id=None))
    client = Client(fake.address, "tok", retry_seconds=30)
    try:
        with pytest.raises(TooLarge):
            client.call("status")
    finally:
        client.close()
    assert len(fake.requests) == 1


def test_busy_connection_is_retried_on_a_new_connection(fake_server):
    fake = fake_server(lambda request, number: (refuse("BUSY", request_id=None) if number == 1 else ok({"n": number}))
                       (request, number))
    client = Client(fake.address, "tok", retry_seconds=10)
    try:
        assert client.call("status") == {"n": 2}
    finally:
        client.close()
    assert fake.connections == 2


# ---------------------------------------------------------------- an unreachable server


@pytest.mark.timeout(30)
def test_connection_refused_raises_server_unavailable_after_retry_seconds():
    port = free_port()
    client = Client(("127.0.0.1", port), "tok", retry_seconds=1)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{port}") as caught:
        client.call("status")
    assert time.monotonic() - started >= 0.9  # it kept trying for retry_seconds
    assert caught.value.exit_code == 3 and "sdm-peer serve" in caught.value.hint


@pytest.mark.timeout(30)  # the client's own default would retry forever
def test_retry_seconds_per_call_overrides_the_clients(fake_server):
    client = Client(("127.0.0.1", free_port()), "tok", retry_seconds=None)  # None: retry forever by default
    with pytest.raises(ServerUnavailable):
        client.call("status", retry_seconds=0.3)


@pytest.mark.timeout(30)
def test_server_that_never_answers_times_out_is_retried_then_unavailable(fake_server):
    fake = fake_server(lambda request, number: None)
    client = Client(fake.address, "tok", timeout=0.5, retry_seconds=1.5)
    started = time.monotonic()
    try:
        with pytest.raises(ServerUnavailable, match="timed out"):
            client.call("status")
    finally:
        client.close()
    assert time.monotonic() - started >= 1.0  # it kept trying for retry_seconds
    assert fake.connections >= 2 and len(fake.requests) >= 2  # each timeout dropped the connection and retried


@pytest.mark.timeout(10)  # the call timeout (30 s) would overrun it: the retry limit (1 s) must win
def test_a_silent_connection_holds_a_call_no_longer_than_its_retry_limit(fake_server):
    # A half-open connection: the call timeout is long, the caller's limit short; the limit wins
    # (a SIGTERMed worker must release and exit within 20 s, whatever the network does).
    fake = fake_server(lambda request, number: None)
    client = Client(fake.address, "tok", timeout=30.0, retry_seconds=1.0)
    try:
        with pytest.raises(ServerUnavailable):
            client.call("release", worker_id="w", reason="SIGTERM")
    finally:
        client.close()


def test_answer_that_is_not_a_response_is_retried_then_unavailable(fake_server):
    fake = fake_server(lambda request, number: b"HTTP/1.1 400 Bad Request\r\n")
    client = Client(fake.address, "tok", timeout=2, retry_seconds=0.5)
    try:
        with pytest.raises(ServerUnavailable):
            client.call("status")
    finally:
        client.close()
    assert fake.connections >= 1


def test_answer_to_another_request_is_not_taken_for_this_one(fake_server):
    fake = fake_server(lambda request, number: ok({"n": number})({**request, "id": request["id"] + 100}, number)
                       if number == 1 else ok({"n": number})(request, number))
    client = Client(fake.address, "tok", retry_seconds=10)
    try:
        assert client.call("status") == {"n": 2}
    finally:
        client.close()


# ---------------------------------------------------------------- reconnection


def test_client_reconnects_to_a_restarted_server(run, spawn_server):
    db, token = run
    server = spawn_server(db)
    client = Client(server.address, token, retry_seconds=10)
    try:
        experiment = client.call("claim", worker_id="w1", **SHAPE)["experiment"]
        assert server.stop() == 0
        spawn_server(db, port=server.address[1])
        assert client.call("renew", lease_token=experiment["lease_token"]) == {"lease_seconds_left": 2}
    finally:
        client.close()


def test_call_waits_for_a_server_that_comes_back_during_it(run, spawn_server, caplog):
    db, token = run
    server = spawn_server(db)
    port = server.address[1]
    client = Client(server.address, token, retry_seconds=20)
    retrying = threading.Event()  # the client logs each retry: the server comes back during one
    caplog.set_level(logging.INFO, logger="sdm_peer.client")
    watcher = logging.Handler()
    watcher.emit = lambda record: "retrying" in record.getMessage() and retrying.set()
    logging.getLogger("sdm_peer.client").addHandler(watcher)
    try:
        client.call("status")
        assert server.stop() == 0
        restart = threading.Thread(target=lambda: retrying.wait(20) and spawn_server(db, port=port))
        restart.start()
        try:
            assert client.call("status")["totals"]["total"] == 2
        finally:
            restart.join(30)
    finally:
        logging.getLogger("sdm_peer.client").removeHandler(watcher)
        client.close()


def test_callable_address_is_asked_again_at_each_reconnection(fake_server):
    first, second = fake_server(ok({"server": "first"})), fake_server(ok({"server": "second"}))
    current, asked = [first.address], []

    def address():
        asked.append(current[0])
        return current[0]

    client = Client(address, "tok", retry_seconds=10)
    try:
        assert client.call("status") == {"server": "first"}
        assert client.call("status") == {"server": "first"}
        assert asked == [first.address]  # one connection, asked once
        current[0] = second.address
        first.close()
        assert client.call("status") == {"server": "second"}
    finally:
        client.close()
    assert asked[-1] == second.address and asked.count(second.address) == 1


def test_callable_address_that_fails_is_retried_like_an_unreachable_server(fake_server):
    fake = fake_server(ok({"fine": True}))
    attempts = []

    def address():
        attempts.append(1)
        if len(attempts) < 3:
            raise BadInput("no server recorded (no server.json)")
        return fake.address

    client = Client(address, "tok", retry_seconds=10)
    try:
        assert client.call("status") == {"fine": True}
    finally:
        client.close()
    assert len(attempts) == 3


def test_run_dir_client_follows_the_server_to_its_new_port(tmp_path, spawn_server, monkeypatch):
    monkeypatch.delenv("SDM_TOKEN", raising=False)
    make_run(tmp_path / "rundir", grid([(2, 4)], 2))
    run_dir = RunDir(tmp_path / "rundir")
    server = spawn_server(run_dir=run_dir.path)
    client = Client.for_run_dir(run_dir, retry_seconds=10)
    try:
        experiment = client.call("claim", worker_id="w1", **SHAPE)["experiment"]
        assert server.stop() == 0
        moved = spawn_server(run_dir=run_dir.path)  # port 0: most likely another port
        assert client.call("renew", lease_token=experiment["lease_token"]) == {"lease_seconds_left": 2}
        assert (client.host, client.port) == moved.address
    finally:
        client.close()
