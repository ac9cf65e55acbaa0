"""The socket client: one reused connection, a timeout on every call, and retries with
exponential backoff and jitter on transport errors only. A refusal from the server
(LEASE_LOST, BAD_REQUEST, UNAUTHORIZED, ...) is an answer, never retried."""

import itertools
import logging
import socket
import ssl
import threading
import time

import tenacity

from . import protocol
from .errors import BadInput, SdmPeerError, ServerUnavailable, error_for
from .rundir import parse_address, resolve_token

log = logging.getLogger("sdm_peer.client")

CALL_TIMEOUT = 30.0  # seconds for one request/response
MAX_BACKOFF = 10.0  # seconds between reconnection attempts, at most
MIN_CALL_SECONDS = 0.5  # the least time one exchange is given, however close its deadline


class TransportError(Exception):
    """The connection failed or answered nonsense; reconnecting may help."""


def _tls_client_context(ca_file):
    """Verify the server against this CA certificate (PEM), hostname or IP included."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise BadInput(f"cannot load the TLS CA certificate {ca_file}: {exc}") from None


def _backoff_within(limit):
    """Exponential backoff with jitter that never sleeps past `limit` seconds from the first
    try, so the last try happens at the limit itself (None: no limit)."""
    backoff = tenacity.wait_random_exponential(multiplier=0.2, max=MAX_BACKOFF)
    if limit is None:
        return backoff
    return lambda state: min(backoff(state), max(0.0, limit - state.seconds_since_start))


class Client:
    def __init__(self, address, token, *, timeout=CALL_TIMEOUT, retry_seconds=60.0, tls_ca=None):
        """`address`: (host, port), or a function returning it, asked again at every reconnection
        (a run directory's server may come back on another port). `retry_seconds`: how long a
        call keeps retrying an unreachable server by default (None: until it answers)."""
        self._address = address if callable(address) else (lambda: address)
        self.host, self.port = None, None
        self._token = token
        self._tls = _tls_client_context(tls_ca) if tls_ca else None
        self.timeout, self.retry_seconds = timeout, retry_seconds
        self._sock = None
        self._file = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # one connection, shared by the worker's threads

    @classmethod
    def for_server(cls, address, *, token_file=None, **options):
        """A client for `--server HOST:PORT`."""
        return cls(parse_address(address), resolve_token(token_file), **options)

    @classmethod
    def for_run_dir(cls, run_dir, *, token_file=None, **options):
        """A client for `--dir RUNDIR`: the address from server.json, the token from the run."""
        return cls(run_dir.server_address, resolve_token(token_file, default_path=run_dir.token_file), **options)

    def call(self, op, retry_seconds=..., **args):
        """Send one request and return its result, or raise the server's refusal.

        Transport failures are retried for `retry_seconds` (default: the client's), then
        ServerUnavailable is raised."""
        limit = self.retry_seconds if retry_seconds is ... else retry_seconds
        deadline = None if limit is None else time.monotonic() + max(limit, MIN_CALL_SECONDS)
        try:
            response = self._exchange(op, args, deadline)  # the common case, without a retry loop
        except TransportError:
            response = self._retried(op, args, limit, deadline)
        if response["ok"]:
            return response["result"]
        error = response.get("error") or {}
        raise error_for(error.get("code", "INTERNAL"), error.get("message", "no message"))

    def _retried(self, op, args, limit, deadline):
        """The exchange again, with backoff, until it goes through or `limit` seconds pass."""
        stop = tenacity.stop_never if limit is None else tenacity.stop_after_delay(limit)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransportError),
            wait=_backoff_within(limit),
            stop=stop, reraise=True,
            before_sleep=lambda state: log.info("server %s:%s unreachable (%s); retrying",
                                                self.host, self.port, state.outcome.exception()))
        try:
            return retrying(self._exchange, op, args, deadline)
        except TransportError as exc:
            raise ServerUnavailable(f"cannot reach the server at {self.host}:{self.port}: {exc}",
                                    hint="is `sdm-peer serve` running there?") from None

    def _exchange(self, op, args, deadline=None):
        """One request and its answer. The wait is bounded by the call timeout and by the
        caller's deadline: a half-open connection must not hold a call past its time."""
        request_id = next(self._ids)
        line = protocol.encode_request(request_id, op, self._token, args)
        with self._lock:
            try:
                if self._sock is None:
                    self._connect()
                wait = self.timeout if deadline is None else min(self.timeout, deadline - time.monotonic())
                self._sock.settimeout(max(MIN_CALL_SECONDS, wait))
                self._sock.sendall(line)
                answer = self._file.readline(protocol.MAX_LINE + 1)
                if not answer:
                    raise TransportError("the server closed the connection")
                response = protocol.decode_response(answer)
                if response.get("id") is None and not response["ok"]:
                    # A refusal of the connection itself (too busy, line too long); it closes.
                    self._disconnect()
                    if response["error"].get("code") == "BUSY":
                        raise TransportError(response["error"].get("message"))
                    return response
                if response.get("id") != request_id:
                    raise TransportError("the answer does not match the request")
                return response
            except ssl.SSLCertVerificationError as exc:
                self._disconnect()
                raise BadInput(f"the server at {self.host}:{self.port} is not trusted: {exc.verify_message}",
                               hint="check --tls-ca (the CA that signed the server's certificate)") from None
            except (OSError, ValueError, TransportError) as exc:
                self._disconnect()
                if isinstance(exc, TransportError):
                    raise
                raise TransportError(str(exc) or type(exc).__name__) from exc

    def _connect(self):
        try:
            self.host, self.port = self._address()
        except SdmPeerError as exc:
            raise TransportError(str(exc)) from None
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        self._sock, self._file = sock, sock.makefile("rb")

    def _disconnect(self):
        for closeable in (self._file, self._sock):
            if closeable is not None:
                try:
                    closeable.close()
                except OSError:
                    pass
        self._sock = self._file = None

    def close(self):
        with self._lock:
            self._disconnect()
