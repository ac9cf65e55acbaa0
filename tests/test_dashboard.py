"""`sdm-peer serve --http-port`: the read-only dashboard of a real server process, looked at by
headless Chromium from Debian's packages while a small local study runs; `/status.json` and its
token rules over plain HTTP. Every server listens on 127.0.0.1 and is stopped by its test."""

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse

import pytest

from sdm_peer import states as st
from sdm_peer.dashboard import render_page, view_token_path_for, wall_time_chart
from sdm_peer.overview import overview
from sdm_peer.run import stop

from .conftest import grid
from .runs import init, job_command, sdm, shape_rows, status, wait_for, with_store

CHROMIUM = "/usr/bin/chromium"
A, B = (1, 1), (1, 2)  # configs c1-m1 and c1-m2


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium, installed by `make test`'s set-up (the Makefile's chromium step).
    Missing under CI is a failure; elsewhere the browser test is skipped with the reason."""
    if not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing (`make test` installs Debian's chromium when it runs as root)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


def browse(chromium, profile, url, *flags):
    """Load `url` in a fresh headless Chromium; its stdout (the DOM with --dump-dom)."""
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-domain-reliability", "--disable-client-side-phishing-detection",
         # Anything not for 127.0.0.1 goes to a closed local port: nothing leaves this machine.
         "--proxy-server=127.0.0.1:9", f"--user-data-dir={profile}", *flags, url],
        capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def start_dashboard_server(run):
    """`sdm-peer serve --dir RUN --port 0 --http-port 0` as a process; (process, dashboard URL)."""
    log = open(run.path / "server.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "sdm_peer", "serve", "--dir", str(run.path), "--port", "0",
                                "--http-port", "0"], stdout=subprocess.PIPE, stderr=log, text=True)
    listening, dashboard = process.stdout.readline(), process.stdout.readline()
    assert listening.startswith("listening on 127.0.0.1:"), listening
    assert dashboard.startswith("dashboard on http://127.0.0.1:"), dashboard  # 127.0.0.1 unless told
    return process, dashboard.split()[2]


def get(url, path, headers=None):
    """One GET without following redirects: (response, body)."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=15)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def view_token(run):
    return view_token_path_for(run.db).read_text().strip()


def run_token(run):
    return run.token_file.read_text().strip()


def test_dashboard_in_headless_chromium_shows_the_counts_while_a_study_runs(run, tmp_path, tmp_path_factory,
                                                                           chromium):
    # c1-m1: 3 quick runs by a group of 2; then c1-m2 (a group of 1): one quick run, then one
    # that keeps running while the browser looks, so the counts hold still.
    rows = shape_rows(A, 3, 2, sleep=0.1) + shape_rows(B, 1, 1, sleep=0.1) + shape_rows(B, 1, 1, sleep=120, long=1)
    init(run, rows, provider="local", command=job_command(tmp_path), lease_seconds=5)
    server, url = start_dashboard_server(run)
    try:
        from sdm_peer.run import bootstrap

        bootstrap(run)  # finds the server above answering; provisions the first group

        def mid_study():
            configs = {config["name"]: config for config in status(run)["configs"]}
            return (configs["c1-m1"]["state"] == st.CONFIG_DONE and configs["c1-m2"]["done"] == 1
                    and configs["c1-m2"]["started"] == 1)
        wait_for(mid_study, timeout=60, what="c1-m1 done and the long run of c1-m2 started")
        long_run = with_store(run, lambda store: next(e for e in store.experiments() if e["status"] == st.STARTED))

        profile = tmp_path_factory.mktemp("chromium")  # outside the run's tmp_path: not one of its processes
        sign_in = f"{url}?token={view_token(run)}"  # the read-only token once; a cookie after that
        dom = browse(chromium, profile, sign_in, "--dump-dom")
        assert '<span id="finished">4</span> of <span id="total">5</span>' in dom
        assert '<span id="running">1</span>' in dom and '<span id="failed">0</span>' in dom
        assert cells(dom, "c1-m1") == {"state": "DONE", "percent": "100.0%", "done": "3", "running": "0",
                                       "waiting": "0", "error": "0", "failed": "0"}
        assert cells(dom, "c1-m2") == {"state": "RUNNING", "percent": "50.0%", "done": "1", "running": "1",
                                       "waiting": "0", "error": "0", "failed": "0"}
        assert f'<td class="name">{long_run["key"]}</td><td class="name">c1-m2</td><td class="name">c1-m2-' in dom
        assert 'data-kind="handoff"' in dom and "hand-off: c1-m2 to be provisioned after c1-m1" in dom
        assert '<rect class="bar-rect" data-config="c1-m1"' in dom and 'data-config="c1-m2"' in dom
        assert run_token(run) not in dom and view_token(run) not in dom

        screenshot = tmp_path / "dashboard.png"  # the test's artifact
        browse(chromium, profile, sign_in, f"--screenshot={screenshot}", "--window-size=1000,1150", "--hide-scrollbars")
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    finally:
        stop(run)  # groups first (their workers give leases back to a live server), then the server
        server.wait(timeout=15)


def cells(dom, config):
    """The count cells of a config's row in the progress table, by class."""
    row = dom.split(f'<tr data-config="{config}">', 1)[1].split("</tr>", 1)[0]
    found = {}
    for cell in row.split("<td")[1:]:
        css = cell.split('class="', 1)[1].split('"', 1)[0] if 'class="' in cell.split(">", 1)[0] else ""
        text = cell.split(">", 1)[1].split("</td>", 1)[0]
        for name in ("percent", "done", "running", "waiting", "error", "failed"):
            if css == name:
                found[name] = text
        if css.startswith("name state"):
            found["state"] = text
    return found


def without_clocks(status):
    """The status with the seconds-ago of its events left out (they move while we compare)."""
    return {**status, "events": [{k: v for k, v in event.items() if k != "seconds_ago"}
                                 for event in status["events"]]}


def test_status_json_needs_the_token_and_equals_what_status_json_prints(run):
    init(run, shape_rows(A, 3) + shape_rows(B, 2))
    long_ago = time.time() - 1000  # outside the throughput window, so nothing moves while we compare

    def history(store):
        first = store.claim("w1", *A, now=long_ago, lease_seconds=60)["experiment"]
        store.complete(first["lease_token"], {"fit_seconds": 0.5}, 2.0, now=long_ago + 2)
        second = store.claim("w1", *A, now=long_ago + 2, lease_seconds=60)["experiment"]
        store.fail(second["lease_token"], "bad input", 3, 1.0, now=long_ago + 3)
    with_store(run, history)
    server, url = start_dashboard_server(run)
    try:
        token, view = run_token(run), view_token(run)
        assert get(url, "/status.json")[0].status == 401
        refused, _ = get(url, "/status.json", {"Authorization": "Bearer not-the-token"})
        assert refused.status == 401 and refused.getheader("WWW-Authenticate") == 'Bearer realm="sdm-peer"'
        assert get(url, "/status.json", {"Authorization": f"Basic {token}"})[0].status == 401
        answer, body = get(url, "/status.json", {"Authorization": f"Bearer {token}"})
        assert answer.status == 200 and answer.getheader("Content-Type") == "application/json"
        from_http = json.loads(body)

        from_cli = json.loads(sdm("status", "--db", run.db, "--json").stdout)
        port = run.server_info()["port"]
        from_socket = json.loads(sdm("status", "--server", f"127.0.0.1:{port}", "--token-file", run.token_file,
                                     "--json").stdout)
        assert without_clocks(from_http) == without_clocks(from_cli) == without_clocks(from_socket)
        assert from_http["configs"][0]["done"] == 1 and from_http["configs"][0]["error"] == 1
        assert from_http["configs"][0]["mean_wall_seconds"] == 2.0
        assert [e["kind"] for e in from_http["events"]][:2] == ["server_started", "error"]

        # The read-only token works as a bearer token too, and signs a browser in once.
        assert get(url, "/status.json", {"Authorization": f"Bearer {view}"})[0].status == 200
        signed_in, _ = get(url, f"/?token={view}")
        assert signed_in.status == 303 and signed_in.getheader("Location") == "/"
        cookie = signed_in.getheader("Set-Cookie")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        page, body = get(url, "/", {"Cookie": cookie.split(";")[0]})
        assert page.status == 200 and b'<tr data-config="c1-m1">' in body
        assert get(url, "/status.json", {"Cookie": "sdm_view=forged"})[0].status == 401
        # The run's own token is never taken in a URL.
        in_url, body = get(url, f"/?token={token}")
        assert in_url.status == 401 and b"not taken in a URL" in body
        assert get(url, "/elsewhere", {"Authorization": f"Bearer {token}"})[0].status == 404
    finally:
        server.terminate()
        assert server.wait(timeout=15) == 0
    log = (run.path / "server.log").read_text()
    assert token not in log and view not in log and "refused a dashboard request" in log


def test_wrong_tokens_are_slowed_down_per_address_but_the_right_token_still_works(run):
    init(run, shape_rows(A, 1))
    server, url = start_dashboard_server(run)
    try:
        refusals = []
        for attempt in range(23):
            answer, body = get(url, "/status.json", {"Authorization": f"Bearer guess-{attempt}"})
            assert answer.status == 401
            refusals.append(body.decode())
        assert not any("slowed down" in body for body in refusals[:20])
        assert all("slowed down" in body for body in refusals[20:])
        assert get(url, "/status.json", {"Authorization": f"Bearer {run_token(run)}"})[0].status == 200
    finally:
        server.terminate()
        assert server.wait(timeout=15) == 0
    assert "guess-" not in (run.path / "server.log").read_text()


def test_dashboard_port_already_taken_is_a_clear_error_before_anything_serves(run):
    init(run, shape_rows(A, 1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = sdm("serve", "--dir", run.path, "--port", "0", "--http-port", port, check=False, timeout=30)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} for the dashboard" in result.stderr
    assert run.server_info() is None  # the socket service never started


def test_the_page_escapes_what_the_run_names_and_draws_no_chart_before_a_measurement(make_store):
    now = time.time()
    store = make_store(grid([(2, 4)], 2))
    store.claim("<script>alert(1)</script>", 2, 4, now=now, lease_seconds=60)
    status = overview(store, now=now)
    page = render_page(status, now=now, database="<b>run</b>")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>run</b>" not in page
    assert "no wall time measured yet" in wall_time_chart(status["configs"])


def test_dashboard_speaks_https_with_the_servers_certificate_and_a_silent_client_holds_up_nobody(run, tmp_path):
    from .test_security import make_certificates

    ca, cert, key = make_certificates(tmp_path)
    init(run, shape_rows(A, 2))
    log = open(run.path / "server.log", "ab")
    server = subprocess.Popen([sys.executable, "-m", "sdm_peer", "serve", "--dir", str(run.path), "--port", "0",
                               "--http-port", "0", "--tls-cert", str(cert), "--tls-key", str(key)],
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        server.stdout.readline()
        url = server.stdout.readline().split()[2]
        assert url.startswith("https://127.0.0.1:")
        address = urllib.parse.urlsplit(url)
        with socket.create_connection((address.hostname, address.port)):  # connects, never says hello
            context = ssl.create_default_context(cafile=str(ca))
            connection = http.client.HTTPSConnection(address.hostname, address.port, timeout=5, context=context)
            connection.request("GET", "/status.json", headers={"Authorization": f"Bearer {run_token(run)}"})
            answer = connection.getresponse()
            assert answer.status == 200 and json.loads(answer.read())["totals"]["total"] == 2
            connection.close()
    finally:
        server.terminate()
        assert server.wait(timeout=20) == 0
