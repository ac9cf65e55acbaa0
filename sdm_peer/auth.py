"""Who may ask: the run's token compared in constant time, and guessers slowed down per address.

One rule for the socket service and the dashboard: past FAILURES_ALLOWED refusals from one
address within WINDOW seconds, each further refusal is answered only after TARPIT seconds and
its connection closed. A guesser gets about one try a second per connection, while a worker with
the right token from the same address is served as before. No token is ever logged or echoed."""

import hmac
import threading
import time

FAILURES_ALLOWED = 20  # failed authentications per address and window before throttling
WINDOW = 60.0  # seconds
TARPIT = 1.0  # seconds a throttled address waits for each refusal
THROTTLED = "too many failures from this address, slowed down"  # said in every throttled refusal
REMEMBERED_ADDRESSES = 10_000  # past this many, quiet addresses are forgotten


def matches(given, secret):
    """Whether `given` (whatever a request carried: text, bytes, a number, None) is `secret`,
    compared in constant time."""
    if isinstance(given, str):
        given = given.encode(errors="surrogatepass")
    if not isinstance(given, bytes):
        return False
    return hmac.compare_digest(given, secret.encode() if isinstance(secret, str) else secret)


class Throttle:
    """Failed authentications per peer address over a sliding window; safe to share between
    threads (the dashboard serves each request on a thread of its own)."""

    def __init__(self, allowed=FAILURES_ALLOWED, window=WINDOW, clock=time.monotonic):
        self.allowed, self.window, self.clock = allowed, window, clock
        self.recent = {}  # address -> failure times within the window
        self.total = 0
        self._lock = threading.Lock()

    def failure(self, address):
        """Count one failure from `address`; return how many failures it now is over its
        allowance (0: within it, 1: throttling starts with this one)."""
        now = self.clock()
        with self._lock:
            self.total += 1
            times = [t for t in self.recent.get(address, ()) if t > now - self.window] + [now]
            self.recent[address] = times
            if len(self.recent) > REMEMBERED_ADDRESSES:  # the table stays small
                self.recent = {a: ts for a, ts in self.recent.items() if ts[-1] > now - self.window}
            return max(0, len(times) - self.allowed)
