"""`sdm-peer serve`: the socket service in front of the store (DESIGN §4).

asyncio for the connections; every op is answered from protocol.OPS: write-lane ops in batches
run on the event loop itself, one transaction each (exactly one writer, and no thread hand-off
per request); a read-lane op on a thread and read-only connection of its own. The token is
checked in constant time on every request and never logged (auth.py)."""

import asyncio
import concurrent.futures
import logging
import os
import signal
import time

from . import auth, protocol
from .errors import BadInput, Busy, SdmPeerError, TooLarge, Unauthorized
from .store import Store

log = logging.getLogger("sdm_peer.server")

DEFAULT_PORT = 7787
IDLE_TIMEOUT = 300.0  # seconds; workers renew far more often than this
MAX_CONNECTIONS = 20_000  # every worker keeps one connection; a big study has tens of thousands
STOP_GRACE = 10.0  # seconds for in-flight requests to finish on SIGTERM
# A renewal waits this long for company before its batch starts: thousands of workers renewing
# every third of a lease then share commits instead of paying one each. Nothing else waits, and
# any other request starts the batch at once. 50 ms rather than 10: a quarter less CPU for 500
# renewals/s (bench), for latency on a call made every third of a lease.
RENEW_GATHER_SECONDS = 0.05
# A batch waits for the clients the last one answered at most as long as that one took, and never
# longer than this (a batch held up by a lock must not hold up the next one as long).
MAX_PACE_SECONDS = 0.02
# Alone (no Litestream), the WAL is checkpointed this often when anything was written, on a thread
# and connection of its own: the writer's commits never copy pages or wait for an fsync.
CHECKPOINT_SECONDS = 1.0


class Server:
    def __init__(self, db_path, token, *, host="127.0.0.1", port=DEFAULT_PORT, lease_seconds=None,
                 idle_timeout=IDLE_TIMEOUT, max_connections=MAX_CONNECTIONS, replicated=False,
                 on_listening=None, clock=time.time, ssl_context=None, durable=False, dashboard=None,
                 renew_gather=RENEW_GATHER_SECONDS):
        self.db_path, self.host, self.port = db_path, host, port
        self.dashboard = dashboard  # optional (dashboard.Dashboard): its own thread and read-only connection
        self._token = token.encode()
        self.lease_seconds = lease_seconds
        self.idle_timeout, self.max_connections = idle_timeout, max_connections
        self.replicated, self.on_listening, self.clock = replicated, on_listening, clock
        self._store = None
        # Read-lane ops (`status`) read on a thread and read-only connection of their own: a
        # whole-run overview (tens of milliseconds for a big study) never holds up the writer.
        self._read_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdm-read")
        self._read_store = None
        self._checkpoint_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdm-checkpoint")
        self._checkpoint_store = None
        self._written = False  # a batch committed since the last checkpoint
        self._connections = set()  # Connection
        self._stopping = None
        self.ssl_context = ssl_context
        self.throttle = auth.Throttle()
        self.durable = durable
        self._queued = []  # (op, args, deliver) waiting for the next batch
        self.renew_gather = renew_gather
        self._batch_start = self._batch_start_at = None  # the next batch's start: its handle, its loop time
        self._last_batch = (0, 0.0, 0.0)  # requests, seconds taken, loop time it ended
        self._delivering = False  # answers of a batch are being handed out

    # ---------------------------------------------------------------- store side

    def _open(self):
        """Open the database and settle the lease period: the run's `lease_seconds` setting, or
        `--lease-seconds`, which then becomes the setting (so that `hello`'s period and the
        settings it carries agree). Then give every held lease another period."""
        self._store = Store(self.db_path, autocheckpoint=False, durable=self.durable)
        stored = float(self._store.settings["lease_seconds"])
        if self.lease_seconds is None:
            self.lease_seconds = stored
        elif self.lease_seconds != stored:
            self._store.set_lease_seconds(self.lease_seconds)
            log.warning("lease period changed from %gs to %gs (--lease-seconds), stored as the run's lease_seconds "
                        "setting", stored, self.lease_seconds)
        return self._store.extend_leases(now=self.clock(), seconds=self.lease_seconds)

    def _context(self):
        return protocol.Context(now=self.clock(), lease_seconds=self.lease_seconds)

    def _write(self, op, args):
        """A write-lane op's answer (inside a batch)."""
        return protocol.OPS[op].handler(self._store, args, self._context())

    def _run_batch(self, requests):
        """Every queued request in one transaction (group commit). Each one's outcome is kept
        apart; none is answered before the commit, and a failed commit fails them all."""
        outcomes = []
        try:
            with self._store.batch():
                for op, args in requests:
                    try:
                        outcomes.append((True, self._write(op, args)))
                    except Exception as exc:  # noqa: BLE001 - each request gets its own answer
                        outcomes.append((False, exc))
        except Exception:
            log.exception("a batch of %d requests could not be committed", len(requests))
            failure = SdmPeerError("the database could not commit this request; try again")
            return [(False, failure)] * len(requests)
        return outcomes

    def _submit(self, op, args, deliver):
        """Queue a request on its op's lane: the next write batch, or the read thread;
        `deliver(ok, value)` gets its committed outcome on the event loop."""
        loop = asyncio.get_running_loop()
        if protocol.OPS[op].lane == protocol.READ:
            done = self._read_thread.submit(self._read, op, args)
            done.add_done_callback(lambda outcome: loop.call_soon_threadsafe(_deliver_outcome, deliver, outcome))
            return
        self._queued.append((op, args, deliver))
        if protocol.OPS[op].gathered and self.renew_gather > 0 and not self._delivering:
            self._start_batch_by(loop, loop.time() + self.renew_gather)
        else:
            self._start_batch_by(loop, self._paced_start(loop))

    def _paced_start(self, loop):
        """When the next batch should start: once as many requests wait as the last batch held
        (everyone it answered has asked again), else once as long has passed since it ended as
        it took (MAX_PACE_SECONDS at most). Requests that arrive meanwhile are read together,
        and a client slower to ask again still makes the next batch: each client gets its turn
        in every batch, as when batches ran on a thread beside the loop, without the hand-offs."""
        size, took, ended = self._last_batch
        return loop.time() if len(self._queued) >= size else ended + min(took, MAX_PACE_SECONDS)

    def _start_batch_by(self, loop, when):
        """Make sure the next batch starts no later than `when` (loop time)."""
        if self._batch_start is not None:
            if self._batch_start_at <= when:
                return
            self._batch_start.cancel()
        if when <= loop.time():
            self._batch_start = loop.call_soon(self._run_queued, loop)  # after this read's other requests
        else:
            self._batch_start = loop.call_at(when, self._run_queued, loop)
        self._batch_start_at = when

    def _run_queued(self, loop):
        """Run the queued requests as one batch, on the event loop itself (SQLite is fast next
        to a thread hop; reading waits meanwhile), and deliver each outcome."""
        self._batch_start = None
        batch, self._queued = self._queued, []
        started = loop.time()
        outcomes = self._run_batch([(op, args) for op, args, _ in batch])
        self._written = True
        ended = loop.time()
        self._last_batch = (len(batch), ended - started, ended)
        self._delivering = True  # a request an answer lets through (pipelined) needs no company
        try:
            for (_, _, deliver), (ok, value) in zip(batch, outcomes):
                try:
                    deliver(ok, value)
                except Exception:  # noqa: BLE001 - one bad delivery must not hold up the others
                    log.exception("could not deliver an answer")
        finally:
            self._delivering = False

    async def _execute(self, op, args):
        """One request's committed outcome, awaited (the connection's path without a socket)."""
        future = asyncio.get_running_loop().create_future()

        def deliver(ok, value):
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)
        self._submit(op, args, deliver)
        return await future

    def _close_store(self):
        if self._store is not None:
            self._store.close()
            self._store = None

    def _read(self, op, args):
        """A read-lane op's answer (on the read thread)."""
        if self._read_store is None:
            self._read_store = Store(self.db_path, readonly=True)
        return protocol.OPS[op].handler(self._read_store, args, self._context())

    async def _checkpoint_regularly(self):
        """Checkpoint the WAL every CHECKPOINT_SECONDS when a batch committed meanwhile (run only
        when the server is alone: under Litestream, Litestream checkpoints)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            if self._written:
                self._written = False
                try:
                    await loop.run_in_executor(self._checkpoint_thread, self._checkpoint)
                except Exception as exc:  # noqa: BLE001 - the next one tries again; commits go on
                    log.warning("could not checkpoint the WAL: %s", exc)

    def _checkpoint(self):
        if self._checkpoint_store is None:
            self._checkpoint_store = Store(self.db_path, autocheckpoint=False, durable=self.durable)
        return self._checkpoint_store.checkpoint()

    def _close_checkpoint_store(self):
        if self._checkpoint_store is not None:
            self._checkpoint_store.close()
            self._checkpoint_store = None

    def _close_read_store(self):
        if self._read_store is not None:
            self._read_store.close()
            self._read_store = None

    # ---------------------------------------------------------------- connections

    def _answer(self, connection, line):
        """Answer one request line on `connection`: at once when it is refused, else when its
        batch has committed."""
        request_id = None
        try:
            request = protocol.parse_request(line)
            request_id = request.id
            if not auth.matches(request.token, self._token):
                self._refuse_authentication(connection, request_id)
                return
        except protocol.RequestError as exc:
            connection.answer(protocol.encode_error(exc.request_id, exc.code, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - answered, never fatal to the connection
            connection.answer(self._encode_outcome(request_id, False, exc, connection.peer))
            return
        self._submit(request.op, request.args,
                     lambda ok, value: connection.answer(self._encode_outcome(request_id, ok, value, connection.peer)))

    @staticmethod
    def _encode_outcome(request_id, ok, value, peer):
        if ok:
            return protocol.encode_result(request_id, value)
        if isinstance(value, SdmPeerError):
            return protocol.encode_error(request_id, value.code, str(value))
        log.error("internal error serving a request from %s", peer, exc_info=value)
        return protocol.encode_error(request_id, "INTERNAL", "the server failed on this request; see its log")

    def _refuse_authentication(self, connection, request_id):
        """A missing or wrong token: counted per address, throttled past the allowance (the
        answer then waits auth.TARPIT and the connection is closed). The token itself is never
        logged or echoed."""
        address = connection.peer[0] if connection.peer else "unknown"
        over = self.throttle.failure(address)
        if over <= 1:  # each refusal until throttling starts, then quiet
            log.warning("refused a request from %s: missing or wrong token%s", address,
                        " (throttling this address)" if over else "")
        error = Unauthorized("missing or wrong token" + (f"; {auth.THROTTLED}" if over else ""))
        answer = protocol.encode_error(request_id, error.code, str(error))
        if over:
            asyncio.get_running_loop().call_later(auth.TARPIT, connection.answer, answer, True)
        else:
            connection.answer(answer)

    async def _close_idle_connections(self):
        """Close connections that have sat without a request for the idle timeout (one sweep
        over all of them every quarter timeout: no timer per request)."""
        while True:
            await asyncio.sleep(self.idle_timeout / 4)
            cutoff = time.monotonic() - self.idle_timeout
            for connection in list(self._connections):
                if not connection.busy and connection.last_request < cutoff:
                    connection.close()

    # ---------------------------------------------------------------- life cycle

    async def run(self):
        """Serve until SIGTERM/SIGINT; then answer in-flight requests and close the database."""
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        extended = self._open()
        server = await loop.create_server(lambda: Connection(self), self.host, self.port, reuse_address=True,
                                          ssl=self.ssl_context)
        host, port = server.sockets[0].getsockname()[:2]
        log.info("database %s; lease %ss; %d held leases extended%s", self.db_path, self.lease_seconds, extended,
                 "; TLS" if self.ssl_context else "")
        if self.on_listening is not None:
            self.on_listening(host, port)
        sweeper = loop.create_task(self._close_idle_connections())
        checkpoints = None if self.replicated else loop.create_task(self._checkpoint_regularly())
        try:
            if self.dashboard is not None:
                await loop.run_in_executor(None, self.dashboard.start)
            await self._stopping.wait()
        finally:
            sweeper.cancel()
            if checkpoints is not None:
                checkpoints.cancel()
            if self.dashboard is not None:
                await loop.run_in_executor(None, self.dashboard.stop)
            server.close()
            await self._finish_connections()
            self._close_store()
            await loop.run_in_executor(self._read_thread, self._close_read_store)
            self._read_thread.shutdown(wait=True)
            await loop.run_in_executor(self._checkpoint_thread, self._close_checkpoint_store)
            self._checkpoint_thread.shutdown(wait=True)
            log.info("stopped")

    async def _finish_connections(self):
        """On stop: close idle connections now; busy ones close once answered, within STOP_GRACE."""
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline:
            for connection in list(self._connections):
                if not connection.busy:
                    connection.close()
            if not self._connections:
                return
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.transport.abort()  # a client that reads nothing must not hold up the stop


def _deliver_outcome(deliver, outcome):
    """Hand a finished future's result, or its exception, to `deliver(ok, value)`."""
    try:
        value = outcome.result()
    except Exception as exc:  # noqa: BLE001 - the request's own answer
        deliver(False, exc)
    else:
        deliver(True, value)


class Connection(asyncio.Protocol):
    """One client's connection: newline-framed requests, answered one at a time and in order
    (a pipelined request waits in the buffer; reading pauses while a whole line's worth waits
    or while the client does not read its answers)."""

    def __init__(self, server):
        self.server = server
        self.transport = self.peer = None
        self.buffer = bytearray()
        self.busy = False  # a request is being answered
        self.writing_paused = False
        self.taking = False  # inside _next_request: an answer given at once must not nest another
        self.last_request = time.monotonic()

    def connection_made(self, transport):
        self.transport, self.peer = transport, transport.get_extra_info("peername")
        self.server._connections.add(self)
        if len(self.server._connections) > self.server.max_connections:
            error = Busy(f"the server has reached its limit of {self.server.max_connections} connections")
            self.answer(protocol.encode_error(None, error.code, str(error)), close=True)

    def connection_lost(self, exc):
        self.server._connections.discard(self)

    def data_received(self, data):
        self.buffer += data
        self._next_request()

    def pause_writing(self):
        self.writing_paused = True

    def resume_writing(self):
        self.writing_paused = False
        self._next_request()

    def _next_request(self):
        """Hand the next complete line to the server, unless one is being answered. A request
        answered at once (a refusal) is followed by the next one in this same loop."""
        if self.taking:
            return
        self.taking = True
        try:
            self._take_lines()
        finally:
            self.taking = False

    def _take_lines(self):
        while not (self.busy or self.writing_paused or self.transport.is_closing()):
            end = self.buffer.find(b"\n")
            if end >= protocol.MAX_LINE or (end < 0 and len(self.buffer) >= protocol.MAX_LINE):
                # The rest of an over-long line cannot be told from the next request: answer, close.
                error = TooLarge(f"a request line may be at most {protocol.MAX_LINE} bytes")
                self.answer(protocol.encode_error(None, error.code, str(error)), close=True)
                return
            if end < 0:
                self.transport.resume_reading()
                return
            line = bytes(self.buffer[:end + 1])
            del self.buffer[:end + 1]
            if line.strip():
                self.busy, self.last_request = True, time.monotonic()
                self.server._answer(self, line)
        if len(self.buffer) >= protocol.MAX_LINE:  # a whole line's worth waits: stop reading for now
            self.transport.pause_reading()

    def answer(self, payload, close=False):
        """Send one answer; then serve the next request, or close (when asked, or when the server
        is stopping)."""
        self.busy, self.last_request = False, time.monotonic()
        if self.transport.is_closing():
            return
        self.transport.write(payload)
        if close or (self.server._stopping is not None and self.server._stopping.is_set()):
            self.close()
        else:
            self._next_request()

    def close(self):
        """Close after what is written has been sent."""
        self.buffer.clear()
        self.transport.close()


def tls_server_context(cert_file, key_file):
    """A TLS context for the server from a certificate chain and its key (PEM files)."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise BadInput(f"cannot load the TLS certificate {cert_file} and key {key_file}: {exc}") from None
    return context


def raise_open_files_limit(connections):
    """Let this process hold `connections` sockets: lift the soft limit on open files as far
    as the hard limit allows (a VM's default soft limit, 1024, is far too low)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256  # the database, its WAL, logs and the listening sockets
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        soft = new_soft
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open files are limited to %d: fewer than %d connections can be served", soft, connections)


def serve(db_path, token, *, host, port, lease_seconds=None, run_dir=None, replicated=False, **limits):
    """Run the server in this process until it is told to stop."""
    raise_open_files_limit(limits.get("max_connections", MAX_CONNECTIONS))
    def on_listening(bound_host, bound_port):
        if run_dir is not None:
            run_dir.write_server_info(bound_host, bound_port, os.getpid())
        print(f"listening on {bound_host}:{bound_port}", flush=True)

    server = Server(db_path, token, host=host, port=port, lease_seconds=lease_seconds, replicated=replicated,
                    on_listening=on_listening, **limits)
    _event_loop_runner()(server.run())


def _event_loop_runner():
    """uvloop's runner where it is installed (a dependency wherever it builds): its transports
    spend less CPU per request, which the writer shares. Else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run
