"""`sdm-peer serve --http-port PORT`: a read-only web dashboard in the server's process.

`http.server` in its own thread, reading through its own read-only SQLite connection (WAL lets
it read beside the server's writer), so the socket service's event loop, which writes, never
waits on it, and SQLite itself refuses it any write. Two pages: `/`, HTML that refreshes
itself (per-config progress, leases, recent events, a cores × memory heatmap of mean wall time per shape
drawn here as inline SVG: no script, no CDN, works offline); and `/status.json`, the object
`status --json` prints.

Access (DESIGN §5): `Authorization: Bearer <token>`, with the run's token or the dashboard's
read-only view token (`DB.view-token`, made at start, mode 0600). A browser opens
`/?token=<view token>` once: the token moves into an HttpOnly cookie and a redirect takes it out
of the address bar. The run's own token is never taken in a URL (URLs end up in histories and
logs), and no URL is logged with its query."""

import html
import http.cookies
import http.server
import json
import logging
import math
import threading
import time
import urllib.parse
from pathlib import Path

from . import auth
from .errors import BadInput
from .overview import (COUNT_COLUMNS, LEASE_COLUMNS, PROGRESS_COLUMNS, account_text, event_rows, finished,
                       hidden_summary, idle_text, lease_rows, leases_text, mean_text, overview, progress_cells,
                       progress_text, provisioning_text, replication_text, seconds_text, visible_configs)
from .rundir import write_token
from .store import Store

log = logging.getLogger("sdm_peer.dashboard")

REFRESH_SECONDS = 5
COOKIE = "sdm_view"
COOKIE_MAX_AGE = 30 * 86400  # seconds a browser stays signed in
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its request; bounds shutdown too
PAGES = ("/", "/status.json")
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
}


def view_token_path_for(db_path):
    return Path(str(db_path) + ".view-token")


class Dashboard:
    """Bound at construction (a taken port is an error before the server starts); serves from
    start() to stop(), which the server calls when it starts listening and when it stops."""

    def __init__(self, db_path, token, *, host="127.0.0.1", port=0, ssl_context=None, clock=time.time):
        self.db_path, self.clock = Path(db_path), clock
        self._token = token
        self.view_token_file = view_token_path_for(db_path)
        self._view_token = write_token(self.view_token_file)
        try:
            self._http = _HTTPServer((host, port), _Handler)
        except OSError as exc:
            raise BadInput(f"cannot listen on {host}:{port} for the dashboard: {exc.strerror}") from None
        if ssl_context is not None:  # handshakes in the request threads: a silent client holds up only its own
            self._http.socket = ssl_context.wrap_socket(self._http.socket, server_side=True,
                                                        do_handshake_on_connect=False)
        self._http.dashboard = self
        self.scheme = "https" if ssl_context is not None else "http"
        self._store = None
        self._lock = threading.Lock()  # one read at a time on the one read-only connection
        self._thread = None
        self.throttle = auth.Throttle()  # the socket service's rule: guessers are slowed down

    @property
    def url(self):
        host, port = self._http.server_address[:2]
        return f"{self.scheme}://{host}:{port}/"

    def start(self):
        self._store = Store(self.db_path, readonly=True)
        self._thread = threading.Thread(target=self._http.serve_forever, name="sdm-dashboard", daemon=True)
        self._thread.start()
        print(f"dashboard on {self.url} (read-only token in {self.view_token_file})", flush=True)

    def stop(self):
        if self._thread is not None:
            self._http.shutdown()
        self._http.server_close()  # waits for requests in flight (each bounded by REQUEST_TIMEOUT)
        if self._store is not None:
            self._store.close()

    def snapshot(self):
        with self._lock:
            return overview(self._store, now=self.clock())

    def authorized(self, headers):
        """The run's token or the view token as a bearer token, or the view token's cookie."""
        scheme, _, credential = (headers.get("Authorization") or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() == "bearer" and credential and (
                auth.matches(credential, self._token) or auth.matches(credential, self._view_token)):
            return True
        try:
            cookie = http.cookies.SimpleCookie(headers.get("Cookie") or "").get(COOKIE)
        except http.cookies.CookieError:
            return False
        return cookie is not None and auth.matches(cookie.value, self._view_token)

    def sign_in(self, given):
        """The cookie for `?token=`, or the reason it is refused."""
        if auth.matches(given, self._view_token):
            return (f"{COOKIE}={self._view_token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={COOKIE_MAX_AGE}"
                    + ("; Secure" if self.scheme == "https" else "")), None
        if auth.matches(given, self._token):
            return None, f"the run's token is not taken in a URL; use the read-only token in {self.view_token_file}"
        return None, "wrong token"


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the requests in flight
    dashboard = None


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT

    def version_string(self):
        return "sdm-peer"  # not the Python version

    def do_GET(self):
        dashboard = self.server.dashboard
        url = urllib.parse.urlsplit(self.path)
        if url.path not in PAGES:
            return self._send(404, "text/plain; charset=utf-8", b"not found\n")
        given = urllib.parse.parse_qs(url.query).get("token")
        if given:
            cookie, refusal = dashboard.sign_in(given[0])
            if refusal:
                return self._refuse(refusal)
            return self._send(303, "text/plain; charset=utf-8", b"signed in\n",
                              {"Location": url.path, "Set-Cookie": cookie})
        if not dashboard.authorized(self.headers):
            return self._refuse("missing or wrong token")
        status = dashboard.snapshot()
        if url.path == "/status.json":
            return self._send(200, "application/json", json.dumps(status).encode())
        page = render_page(status, now=dashboard.clock(), database=dashboard.db_path)
        return self._send(200, "text/html; charset=utf-8", page.encode())

    def _refuse(self, reason):
        """401, counted per address: past the allowance the answer waits auth.TARPIT and the
        connection is closed, as on the socket service."""
        address = self.client_address[0]
        if self.server.dashboard.throttle.failure(address):
            time.sleep(auth.TARPIT)  # this request's own thread: the tarpit holds up only the guesser
            self.close_connection = True
            reason += f"; {auth.THROTTLED}"
        log.info("refused a dashboard request from %s: %s", address, reason)
        body = (f"401 unauthorized: {reason}.\nSend 'Authorization: Bearer <token>', or open "
                f"/?token=<read-only token> once in a browser (the token is in the file named in the "
                f"server's output).\n")
        self._send(401, "text/plain; charset=utf-8", body.encode(), {"WWW-Authenticate": 'Bearer realm="sdm-peer"'})

    def _send(self, code, content_type, body, headers=None):
        self.send_response(code)
        for name, value in {**SECURITY_HEADERS, "Content-Type": content_type, "Content-Length": str(len(body)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        # The path only: a query may carry a token.
        log.debug("%s %s %s %s", self.client_address[0], self.command, urllib.parse.urlsplit(self.path).path, code)

    def log_message(self, format, *args):
        pass  # http.server's own messages quote the request line, query included


# ---------------------------------------------------------------- the page

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sdm-peer: {percent} done</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }}
h1 {{ font-size: 1.4em; margin: 0 0 .2em; }} h2 {{ font-size: 1.1em; margin: 1.4em 0 .4em; }}
table {{ border-collapse: collapse; }} th, td {{ padding: .2em .7em; text-align: right; white-space: nowrap; }}
th {{ border-bottom: 1px solid #999; font-weight: 600; }} td.name, th.name {{ text-align: left; }}
tr.all td {{ border-top: 1px solid #999; font-weight: 600; }}
.bar {{ width: 140px; height: .8em; background: #e4e4e4; display: inline-block; }}
.bar span {{ display: block; height: 100%; background: #2e8b57; }}
.state-RUNNING {{ color: #0a6fa8; font-weight: 600; }} .state-PROVISIONING {{ color: #a86b00; }}
.state-WAITING {{ color: #888; }} .state-DONE {{ color: #2e8b57; }}
.kind-error {{ color: #b00020; }} .kind-expired, .kind-interrupted, .kind-lost {{ color: #a86b00; }}
.lapsed, .replica-error, .stopped {{ color: #b00020; }} .replica-late {{ color: #a86b00; }} .muted {{ color: #777; }}
ul.events {{ list-style: none; padding: 0; }} ul.events li {{ margin: .15em 0; }}
svg text {{ font: 11px system-ui, sans-serif; fill: #333; }} svg .heat-cell {{ stroke: #fff; stroke-width: .5; }}
</style></head>
<body>
<h1>sdm-peer <span class="muted">{database}</span></h1>
<p id="summary"><strong><span id="finished">{finished}</span> of <span id="total">{total}</span></strong>
experiments finished ({percent}); <span id="running">{running}</span> running,
<span id="errors">{errors}</span> errors, <span id="failed">{failed}</span> failed.</p>
<p id="speed">{speed}</p>
{lines}
<h2>Progress per configuration</h2>
{progress}
<h2>Mean wall time per shape (cores × memory)</h2>
{chart}
<h2>Leases</h2>
{leases}
<h2>Recent events</h2>
{events}
<p class="muted">Read-only. Refreshes every {refresh}s; as of {as_of}.</p>
</body></html>
"""

LEFT_ALIGNED = ("config", "state", "experiment", "worker")


def render_page(status, *, now, database=""):
    """The dashboard's HTML for one status object (everything from the run is escaped)."""
    totals = status["totals"]
    cells = progress_cells(totals)
    lines = [f'<p class="provisioning">{_e(provisioning_text(p))}</p>' for p in status.get("provisioning", ())]
    if status.get("idle", {}).get("idle_fraction") is not None:
        lines.append(f'<p id="idle">{_e(idle_text(status["idle"]))}</p>')
    if account_text(status):
        lines.append(f'<p id="account" class="{"stopped" if status["spend"]["stopped"] else "muted"}">'
                     f'{_e(account_text(status))}</p>')
    if "replication" in status:
        text, standing = replication_text(status["replication"])
        lines.append(f'<p id="replication" class="replica-{standing}">{_e(text)}</p>')
    return PAGE.format(
        database=_e(database), refresh=REFRESH_SECONDS, percent=f"{cells['percent']}%",
        finished=f"{finished(totals):,}", total=f"{totals['total']:,}", running=f"{totals['started']:,}",
        errors=cells["error"], failed=cells["failed"], speed=_e(progress_text(status)), lines="\n".join(lines),
        progress=progress_table(status), chart=wall_time_chart(status["configs"]),
        leases=leases_table(status.get("leases", []), held=totals["started"]),
        events=events_list(status.get("events", [])),
        as_of=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)))


def _e(value):
    return html.escape(str(value))


def _cell(text, *classes):
    css = " ".join(name for name in classes if name)
    return f'<td class="{css}">{_e(text)}</td>' if css else f"<td>{_e(text)}</td>"


def _header(columns):
    return "".join(f'<th class="name">{_e(c)}</th>' if c in LEFT_ALIGNED else f"<th>{_e(c)}</th>" for c in columns)


def _progress_cells(counts):
    """The bar, percentage and count cells of one progress row."""
    cells = progress_cells(counts)
    return (f'<td><span class="bar"><span style="width:{100 * cells["fraction"]:.1f}%"></span></span></td>'
            f'<td class="percent">{cells["percent"]}%</td>'
            + "".join(_cell(cells[column], column) for column in COUNT_COLUMNS))


def progress_table(status):
    configs = status["configs"]
    shown = visible_configs(configs)
    rows = [f'<tr data-config="{_e(config["name"])}"><td class="name">{_e(config["name"])}</td>'
            f'<td class="name state state-{_e(config["state"])}">{_e(config["state"])}</td>'
            f'{_progress_cells(config)}<td class="mean">{mean_text(config)}</td></tr>' for config in shown]
    rows.append(f'<tr class="all" id="totals"><td class="name">all</td><td></td>'
                f'{_progress_cells(status["totals"])}<td></td></tr>')
    hidden = hidden_summary(configs, shown)
    note = f'<p class="muted">{_e(hidden)}</p>' if hidden else ""
    return f'<table id="progress"><tr>{_header(PROGRESS_COLUMNS)}</tr>\n' + "\n".join(rows) + "</table>" + note


def leases_table(leases, *, held):
    if not leases:
        return '<p class="muted" id="leases">no lease held</p>'
    rows = "".join("<tr>" + "".join(_cell(row[column], "name" if column in LEFT_ALIGNED else "",
                                          "lapsed" if column == "left s" and row["lapsed"] else "")
                                    for column in LEASE_COLUMNS) + "</tr>"
                   for row in lease_rows(leases))
    return (f'<p>{_e(leases_text(held, len(leases)))}</p><table id="leases"><tr>{_header(LEASE_COLUMNS)}</tr>'
            f'{rows}</table>')


def events_list(events):
    if not events:
        return '<p class="muted" id="events">nothing yet</p>'
    items = "".join(f'<li class="kind-{_e(row["kind"])}" data-kind="{_e(row["kind"])}">'
                    f'<span class="muted">{_e(row["ago"])}</span> {_e(row["text"])}</li>'
                    for row in event_rows(events))
    return f'<ul class="events" id="events">{items}</ul>'


# ---------------------------------------------------------------- the chart

CHART_WIDTH, CHART_HEIGHT = 720, 300
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_BOTTOM, MARGIN_TOP = 56, 96, 40, 12
LABELLED_VALUES = 24  # more distinct cores (or memory) values than this: every n-th gets a label
# viridis at 0, 0.25, 0.5, 0.75 and 1: the report's colour map, without matplotlib.
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def colour(fraction):
    """The viridis colour at `fraction` (0..1) of the scale, as #rrggbb."""
    position = min(max(fraction, 0.0), 1.0) * (len(VIRIDIS) - 1)
    low = min(int(position), len(VIRIDIS) - 2)
    mix = position - low
    rgb = (round(a + (b - a) * mix) for a, b in zip(VIRIDIS[low], VIRIDIS[low + 1]))
    return "#" + "".join(f"{value:02x}" for value in rgb)


def wall_time_chart(configs):
    """An SVG heatmap of each measured config's mean wall time on the cores × memory grid: the
    study's shape space, readable at 2,000 shapes where a bar per shape is not."""
    measured = [c for c in configs if c.get("mean_wall_seconds") is not None]
    if not measured:
        return '<p class="muted" id="chart">no wall time measured yet</p>'
    cores = sorted({c["cores"] for c in measured})
    memory = sorted({c["memory_gb"] for c in measured})
    low, high = min(c["mean_wall_seconds"] for c in measured), max(c["mean_wall_seconds"] for c in measured)
    span = high - low or 1.0
    plot_width = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_height = CHART_HEIGHT - MARGIN_BOTTOM - MARGIN_TOP
    width, height = plot_width / len(cores), plot_height / len(memory)
    parts = []
    for config in measured:
        mean, name = config["mean_wall_seconds"], _e(config["name"])
        x = MARGIN_LEFT + cores.index(config["cores"]) * width
        y = MARGIN_TOP + (len(memory) - 1 - memory.index(config["memory_gb"])) * height
        parts.append(f'<rect class="heat-cell" data-config="{name}" data-mean="{mean:.6g}" x="{x:.1f}" y="{y:.1f}" '
                     f'width="{width:.1f}" height="{height:.1f}" fill="{colour((mean - low) / span)}">'
                     f'<title>{name}: {seconds_text(mean)} s mean wall time</title></rect>')
    for i, value in _labelled(cores):
        x = MARGIN_LEFT + (i + 0.5) * width
        parts.append(f'<text x="{x:.1f}" y="{MARGIN_TOP + plot_height + 14}" text-anchor="middle">{value:g}</text>')
    for i, value in _labelled(memory):
        y = MARGIN_TOP + (len(memory) - 0.5 - i) * height
        parts.append(f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>')
    parts.append(f'<text x="{MARGIN_LEFT + plot_width / 2:.0f}" y="{CHART_HEIGHT - 6}" '
                 f'text-anchor="middle">cores</text>')
    parts.append(f'<text x="14" y="{MARGIN_TOP + plot_height / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {MARGIN_TOP + plot_height / 2:.0f})">memory (GB)</text>')
    parts.append(_scale(low, high, x=CHART_WIDTH - MARGIN_RIGHT + 16, top=MARGIN_TOP, height=plot_height))
    return (f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
            f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" aria-label="mean wall time per shape">'
            + "".join(parts) + "</svg>")


def _labelled(values):
    """(index, value) of the values that get a label: all, or every n-th of many."""
    step = max(1, math.ceil(len(values) / LABELLED_VALUES))
    return list(enumerate(values))[::step]


def _scale(low, high, *, x, top, height):
    """The colour scale: a vertical gradient from `low` (bottom) to `high` (top) seconds."""
    stops = "".join(f'<stop offset="{i / (len(VIRIDIS) - 1):.2f}" stop-color="{colour(1 - i / (len(VIRIDIS) - 1))}"/>'
                    for i in range(len(VIRIDIS)))
    return (f'<defs><linearGradient id="heat-scale" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>'
            f'<rect x="{x}" y="{top}" width="12" height="{height}" fill="url(#heat-scale)"/>'
            f'<text x="{x + 16}" y="{top + 10}">{seconds_text(high)} s</text>'
            f'<text x="{x + 16}" y="{top + height}">{seconds_text(low)} s</text>')
