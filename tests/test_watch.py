"""`sdm-peer status --watch` driven in a real pseudo-terminal, as a person runs it: the screen
shows the configs, their counts, the live lease and its worker, throughput and ETA, and Ctrl-C
ends it with exit 0 and the cursor shown again. And the status table fits 80 columns."""

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from .conftest import grid

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
SHOW_CURSOR = "\x1b[?25h"
COLUMNS, ROWS = 120, 40


class Terminal:
    """A command on the slave side of a pty (its controlling terminal, so Ctrl-C is a real
    SIGINT from the line discipline); the test reads and types on the master side."""

    def __init__(self, command):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))

        def take_terminal():
            # A person's shell starts the command with Ctrl-C's default action; a test run
            # started in the background of a shell without job control inherits it ignored.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, preexec_fn=take_terminal,
                                        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS),
                                             "LINES": str(ROWS)})
        os.close(slave)
        self.output = ""

    def read_until(self, predicate, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not predicate(self.screen()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the screen never showed what was expected:\n{self.screen()[-3000:]}")
            if not self._read(min(left, 0.2)):
                raise AssertionError(f"the command ended before the screen showed it:\n{self.screen()[-3000:]}")

    def read_to_end(self, timeout=10.0):
        """Everything the command wrote until it closed the terminal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(0.2) is not False:
            pass

    def _read(self, wait):
        """Read what is there within `wait` seconds; False once the terminal is closed."""
        if select.select([self.master], [], [], wait)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every process on the slave side has gone
                return False
            if not chunk:
                return False
            self.output += chunk.decode(errors="replace")
        return True

    def screen(self):
        return ANSI.sub("", self.output)

    def type(self, text):
        os.write(self.master, text.encode())

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self.master)


def test_watch_in_a_terminal_shows_configs_counts_and_leases_and_ctrl_c_exits_0(make_store):
    now = time.time()
    store = make_store(grid([(2, 4)], 3) + grid([(4, 8)], 2))
    first = store.claim("w-alpha", 2, 4, now=now - 20, lease_seconds=60)["experiment"]
    store.complete(first["lease_token"], {"fit_seconds": 1.5}, 12.0, now=now - 8)
    second = store.claim("w-alpha", 2, 4, now=now - 8, lease_seconds=60)["experiment"]
    store.fail(second["lease_token"], "Traceback\nValueError: bad alpha", 1, 3.0, now=now - 5)
    retry = store.claim("w-beta", 2, 4, now=now - 5, lease_seconds=600)["experiment"]
    assert retry["key"] == second["key"]  # an ERROR is claimed again before what never ran

    terminal = Terminal([sys.executable, "-m", "sdm_peer", "status", "--db", str(store.path), "--watch", "0.3"])
    try:
        terminal.read_until(lambda screen: "recent events" in screen and "c4-m8" in screen)
        # Let it redraw at least once more: the live view refreshes in place.
        shown = len(terminal.output)
        terminal.read_until(lambda screen: len(terminal.output) > shown + 200)
        screen = terminal.screen()
        # config, state, bar, %, done, running, waiting, error, failed, mean wall seconds
        assert re.search(r"c2-m4\s+RUNNING\s+\S+\s+33\.3\s+1\s+1\s+1\s+0\s+0\s+12\.0\s", screen), screen
        assert re.search(r"c4-m8\s+WAITING\s+\S+\s+0\.0\s+0\s+0\s+2\s+0\s+0", screen), screen
        assert re.search(r"all\s+\S+\s+20\.0\s+1\s+1\s+3\s+0\s+0", screen), screen
        # The live lease: its experiment, worker, attempt and seconds left (about 595).
        assert re.search(re.escape(retry["key"]) + r"\s+c2-m4\s+w-beta\s+2\s+59\d\s+\d+", screen), screen
        assert "throughput" in screen and "ETA" in screen
        assert f"{second['key']} (c2-m4) failed (exit 1) on w-alpha: ValueError: bad alpha" in screen
        terminal.type("\x03")  # Ctrl-C, as typed: SIGINT from the terminal
        assert terminal.process.wait(timeout=10) == 0
        terminal.read_to_end()
        # The terminal is given back: the cursor hidden while watching is shown again at the end.
        assert terminal.output.rfind(SHOW_CURSOR) > terminal.output.rfind("\x1b[?25l")
        assert "Traceback" not in terminal.screen() and "Aborted" not in terminal.screen()
    finally:
        terminal.close()


def test_watch_refuses_a_period_that_is_not_positive(make_store):
    store = make_store(grid([(2, 4)], 1))
    done = subprocess.run([sys.executable, "-m", "sdm_peer", "status", "--db", str(store.path), "--watch", "0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--watch" in done.stderr


def test_status_fits_an_80_column_terminal_without_cutting_a_column(make_store):
    """The widest things a status table shows: a config PROVISIONING, counts in the thousands,
    a mean of a few thousand seconds, lapsed leases: every header and value whole at 80 columns."""
    from rich.console import Console

    from sdm_peer.overview import PROGRESS_COLUMNS, overview
    from sdm_peer.view import status_view

    now = time.time()
    store = make_store(grid([(16, 64)], 3) + grid([(96, 384)], 2400) + grid([(224, 1792)], 40), provider="local")
    for worker in ("w-alpha", "w-beta", "w-gamma"):  # c16-m64 finishes: c96-m384 is handed off
        lease = store.claim(worker, 16, 64, now=now - 3000, lease_seconds=60)["experiment"]
        store.complete(lease["lease_token"], {}, 1234.5, now=now - 1800)
    store.claim("w-delta", 224, 1792, now=now - 100, lease_seconds=60)  # lapsed, not yet taken back
    console = Console(width=80, record=True)
    console.print(status_view(overview(store, now=now)))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    header = next(line for line in lines if line.startswith("config"))
    assert header.split() == " ".join(PROGRESS_COLUMNS).split() and header.rstrip().endswith("mean s"), header
    rows = {line.split()[0]: line for line in lines if line.startswith(("c16-m64", "c96-m384", "c224-m1792"))}
    assert re.search(r"c16-m64\s+DONE\s+\S+\s+100\.0\s+3\s+0\s+0\s+0\s+0\s+1,234$", rows["c16-m64"].rstrip())
    assert re.search(r"c96-m384\s+PROVISIONING\s+0\.0\s+0\s+0\s+2,400\s+0\s+0$", rows["c96-m384"].rstrip())
    assert re.search(r"c224-m1792\s+RUNNING\s+0\.0\s+0\s+1 \(1\s+39\s+0\s+0$", rows["c224-m1792"].rstrip())
