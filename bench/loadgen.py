"""Load for the socket service, from separate processes (each with threads, one connection per
thread): claim+complete cycles, or paced renewals. Requests are framed with sdm_peer.protocol on
a plain blocking socket, one request in flight per connection (a worker's pattern), without the
retrying Client (whose per-call tenacity set-up would spend the clients' share of the two cores).

Every thread connects and says `hello` first; the clock starts when the parent sets `go` (after
every connection is up) and each thread stops at start + duration, or after `limit` cycles."""

import itertools
import multiprocessing
import socket
import threading
import time

from sdm_peer import protocol

from common import SHAPE

CALL_TIMEOUT = 30.0
READY_TIMEOUT = 60.0


class Refused(Exception):
    pass


class Connection:
    def __init__(self, address, token):
        self.sock = socket.create_connection(address, timeout=CALL_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.token = token
        self.ids = itertools.count(1)

    def call(self, op, **args):
        request_id = next(self.ids)
        self.sock.sendall(protocol.encode_request(request_id, op, self.token, args))
        line = self.file.readline(protocol.MAX_LINE + 1)
        if not line:
            raise ConnectionError("the server closed the connection")
        response = protocol.decode_response(line)
        if not response["ok"]:
            raise Refused(response["error"]["code"])
        return response["result"]

    def close(self):
        self.file.close()
        self.sock.close()


def _cycle_thread(job, ready, go, start, report):
    """Claim+complete until the window ends, the cycle limit is reached or nothing is left."""
    worker_id = job["worker_id"]
    latencies, cycles, worst, exhausted, error = [], 0, 0.0, False, None
    connection = None
    try:
        connection = Connection(job["address"], job["token"])
        connection.call("hello", worker_id=worker_id, cores=SHAPE[0], memory_gb=SHAPE[1])
    except Exception as exc:  # noqa: BLE001 - reported, never raised in a thread
        error = f"connect: {exc!r}"
    ready.put(worker_id)
    if not go.wait(READY_TIMEOUT) or error:
        report.append({"cycles": 0, "latencies": [], "worst": 0.0, "exhausted": False,
                       "error": error or "never started"})
        return
    end = start.value + job["duration"]
    clock = time.perf_counter
    try:
        while cycles < job["limit"] and time.time() < end:
            t0 = clock()
            answer = connection.call("claim", worker_id=worker_id, cores=SHAPE[0], memory_gb=SHAPE[1])
            t1 = clock()
            if answer["experiment"] is None:
                exhausted = True
                break
            connection.call("complete", lease_token=answer["experiment"]["lease_token"], result={},
                            wall_seconds=0.0)
            t2 = clock()
            if time.time() <= end:
                cycles += 1
                latencies += (t1 - t0, t2 - t1)
                worst = max(worst, t2 - t0)
    except Exception as exc:  # noqa: BLE001
        error = repr(exc)
    finally:
        connection.close()
    report.append({"cycles": cycles, "latencies": latencies, "worst": worst, "exhausted": exhausted, "error": error})


def _renew_thread(job, ready, go, start, report):
    """Renew the job's leases round-robin at `rate` per second, the first at start + offset
    (`together` of them in each request: the list form).
    A renewal that falls behind its schedule is sent at once (no burst to catch up is skipped)."""
    leases, together = job["leases"], job.get("together", 1)
    rate = job["rate"] / together  # requests per second
    latencies, sent, lost, error = [], 0, 0, None
    connection = None
    try:
        connection = Connection(job["address"], job["token"])
    except Exception as exc:  # noqa: BLE001
        error = f"connect: {exc!r}"
    ready.put(job["offset"])
    if not go.wait(READY_TIMEOUT) or error:
        report.append({"latencies": [], "sent": 0, "lost": 0, "error": error or "never started"})
        return
    begin = start.value + job["offset"]
    end = start.value + job["duration"]
    try:
        for number in itertools.count():
            due = begin + number / rate
            if due >= end:
                break
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            t0 = time.perf_counter()
            if together == 1:
                try:
                    connection.call("renew", lease_token=leases[number % len(leases)])
                except Refused:
                    lost += 1
            else:  # the list form: `together` leases in one request
                first = number * together
                chosen = [leases[(first + n) % len(leases)] for n in range(together)]
                answer = connection.call("renew", leases=[{"lease_token": token} for token in chosen])
                lost += sum(not entry["ok"] for entry in answer["leases"])
            latencies.append(time.perf_counter() - t0)
            sent += together
    except Exception as exc:  # noqa: BLE001
        error = repr(exc)
    finally:
        connection.close()
    report.append({"latencies": latencies, "sent": sent, "lost": lost, "error": error})


def _process(kind, jobs, ready, go, start, out):
    target = _cycle_thread if kind == "cycle" else _renew_thread
    report = []
    threads = [threading.Thread(target=target, args=(job, ready, go, start, report), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(report)


def run(kind, jobs_per_process, *, timeout, on_start=None):
    """Start one process per job list, wait for every connection, start the clock (and call
    `on_start(start)`); return (start time, [thread reports])."""
    context = multiprocessing.get_context("fork")  # no re-import: the clients are up in milliseconds
    ready, out, go = context.Queue(), context.Queue(), context.Event()
    start = context.Value("d", 0.0)
    processes = [context.Process(target=_process, args=(kind, jobs, ready, go, start, out), daemon=True)
                 for jobs in jobs_per_process]
    try:
        for process in processes:
            process.start()
        for _ in range(sum(map(len, jobs_per_process))):
            ready.get(timeout=READY_TIMEOUT)
        start.value = time.time()
        go.set()
        if on_start is not None:
            on_start(start.value)
        reports = []
        for _ in processes:
            reports += out.get(timeout=timeout)
        return start.value, reports
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


def split(count, processes):
    """`count` clients over at most `processes` processes: [threads per process]."""
    processes = min(processes, count)
    base, extra = divmod(count, processes)
    return [base + (1 if n < extra else 0) for n in range(processes)]
