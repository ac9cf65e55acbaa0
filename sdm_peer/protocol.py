"""The socket protocol (DESIGN §4): newline-delimited JSON, one request -> one response.

Framing, the error envelope and the op table live here: each op's argument spec, its handler
(a store transition, or the overview) and its lane, in one place per op. The server dispatches
from the table, so it only ever sees well-formed requests and every refusal has one shape."""

import dataclasses
import json
import math
from typing import Callable

from .errors import BadInput, LeaseLost, SdmPeerError
from .overview import overview

VERSION = 1
MAX_LINE = 1 << 20  # bytes, newline included
MAX_TEXT = 256  # ids, tokens, names
MAX_ERROR_TEXT = 64 * 1024
MAX_CAUSE_TEXT = 1000  # why a group cannot run: one line
MAX_INT = (1 << 63) - 1  # SQLite's integers are 64-bit
MAX_LEASES = 1000  # leases in one `renew`

_NUMBER = (int, float)


class Spec:
    """One argument: its type, whether it must be given, and its bounds."""

    def __init__(self, kind, required=True, *, positive=False, max_len=MAX_TEXT, nullable=False, items=None):
        self.kind, self.required, self.positive = kind, required, positive
        self.max_len, self.nullable = max_len, nullable
        self.items = items  # a list's: the specs of its objects' fields, exactly one of which is given

    def check(self, op, name, value):
        if value is None and self.nullable:
            return None
        kind = self.kind
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            raise BadInput(f"{op}: argument {name!r} must be {_KIND_WORDS[kind]}")
        if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
            raise BadInput(f"{op}: argument {name!r} is out of range")
        if kind is _NUMBER and not math.isfinite(value):
            raise BadInput(f"{op}: argument {name!r} must be {_KIND_WORDS[kind]}")
        if self.positive and value <= 0:
            raise BadInput(f"{op}: argument {name!r} must be positive")
        if kind is str and not 0 < len(value) <= self.max_len:
            raise BadInput(f"{op}: argument {name!r} must be 1 to {self.max_len} characters")
        if kind is list:
            if not 0 < len(value) <= self.max_len:
                raise BadInput(f"{op}: argument {name!r} must hold 1 to {self.max_len} items")
            return [_checked_fields(f"{op}: {name}[{n}]", self.items, item, one_of=tuple(self.items))
                    for n, item in enumerate(value)]
        return value


_KIND_WORDS = {str: "a string", int: "an integer", _NUMBER: "a number", dict: "a JSON object", list: "a JSON array"}

READ, WRITE = "read", "write"  # lanes: the read thread's read-only connection, or the writer's batches


@dataclasses.dataclass(frozen=True)
class Context:
    """What a handler knows besides its arguments: the server's clock and lease period."""
    now: float
    lease_seconds: float


@dataclasses.dataclass(frozen=True)
class Op:
    """One op: its arguments, who answers it and on which lane.

    `handler(store, args, context)` returns the result; `one_of` names arguments of which exactly
    one must be given; a `gathered` op waits RENEW_GATHER_SECONDS for company before its batch
    starts (renewals come by the thousand and can share one commit)."""
    args: dict  # name -> Spec
    handler: Callable
    lane: str = WRITE
    one_of: tuple = ()
    gathered: bool = False


def _hello(store, args, context):
    return {"lease_seconds": context.lease_seconds, **store.hello(**args, now=context.now)}


def _status(store, args, context):
    return overview(store, now=context.now, with_replication=False)  # the server never waits on Litestream


def _renew(store, args, context):
    """One lease's renewal, or with `leases` each one's, as it would be answered alone: a
    refused lease is reported in its own entry and the others are renewed all the same."""
    if "leases" not in args:
        return store.renew(**args, now=context.now, lease_seconds=context.lease_seconds)
    answers = []
    for lease in args["leases"]:
        try:
            answers.append({**lease, "ok": True,
                            **store.renew(**lease, now=context.now, lease_seconds=context.lease_seconds)})
        except LeaseLost as exc:
            answers.append({**lease, "ok": False, "error": {"code": exc.code, "message": str(exc)}})
    return {"leases": answers}


def _release(store, args, context):
    return store.release(**{"reason": "released", **args}, now=context.now)


def _transition(method, *, leases=False):
    """The handler of an op that is the store transition `method` called with the op's
    arguments and the clock (`leases`: and the lease period, for one that grants or renews)."""
    def handler(store, args, context):
        timing = {"lease_seconds": context.lease_seconds} if leases else {}
        return getattr(store, method)(**args, now=context.now, **timing)
    return handler


LEASE = {"lease_token": Spec(str, False), "provision_token": Spec(str, False)}
SHAPE = {"worker_id": Spec(str), "cores": Spec(int, positive=True), "memory_gb": Spec(_NUMBER, positive=True)}
# Every op, in the order an unknown op's refusal lists them; the README's protocol table documents each.
OPS = {
    "hello": Op(SHAPE, _hello),
    "claim": Op(SHAPE, _transition("claim", leases=True)),
    "renew": Op({**LEASE, "leases": Spec(list, False, max_len=MAX_LEASES, items=LEASE)}, _renew,
                one_of=("lease_token", "provision_token", "leases"), gathered=True),
    "complete": Op({"lease_token": Spec(str), "result": Spec(dict), "wall_seconds": Spec(_NUMBER),
                    "host": Spec(dict, False)}, _transition("complete")),
    "fail": Op({"lease_token": Spec(str), "error": Spec(str, max_len=MAX_ERROR_TEXT),
                "exit_code": Spec(int, nullable=True), "wall_seconds": Spec(_NUMBER), "host": Spec(dict, False)},
               _transition("fail")),
    "release": Op({"lease_token": Spec(str, False), "worker_id": Spec(str, False),
                   "reason": Spec(str, False, max_len=1000)}, _release, one_of=("lease_token", "worker_id")),
    "provisioned": Op({"provision_token": Spec(str), "worker_id": Spec(str, False)}, _transition("provisioned")),
    "group_failed": Op({"provision_token": Spec(str), "error": Spec(str, max_len=MAX_CAUSE_TEXT),
                        "cause": Spec(str, False, max_len=100), "worker_id": Spec(str, False)},
                       _transition("group_failed")),
    "acquire_provisioning": Op({"owner": Spec(str)}, _transition("acquire_provisioning")),
    "group_deleted": Op({"config": Spec(str), "worker_id": Spec(str, False)}, _transition("group_deleted")),
    "status": Op({}, _status, lane=READ),
}


class Request:
    __slots__ = ("id", "op", "token", "args")

    def __init__(self, id, op, token, args):
        self.id, self.op, self.token, self.args = id, op, token, args


class RequestError(SdmPeerError):
    """A request that cannot be served; carries the request id when it could be read."""

    def __init__(self, error, request_id=None):
        super().__init__(str(error))
        self.code = error.code
        self.request_id = request_id


def parse_request(line):
    """bytes -> Request, or RequestError(BAD_REQUEST) with a human sentence."""
    request_id = None
    try:
        try:
            message = json.loads(line, parse_constant=_refuse_constant, parse_float=_finite_float)
        except UnicodeDecodeError:
            raise BadInput("the request is not UTF-8") from None
        except RecursionError:
            raise BadInput("the request is nested too deeply") from None
        except ValueError as exc:
            raise BadInput(f"the request is not valid JSON ({exc.msg})") from None
        if not isinstance(message, dict):
            raise BadInput("a request must be a JSON object")
        request_id = message.get("id")
        if isinstance(request_id, bool) or not isinstance(request_id, int):
            request_id = None
            raise BadInput("a request needs an integer 'id'")
        if isinstance(message.get("v"), bool) or message.get("v") != VERSION:
            raise BadInput(f"unsupported protocol version {message.get('v')!r}; this server speaks v{VERSION}")
        op = message.get("op")
        if op not in OPS:
            raise BadInput(f"unknown op {op!r}; ops are {', '.join(OPS)}")
        args = message.get("args", {})
        if not isinstance(args, dict):
            raise BadInput("'args' must be a JSON object")
        return Request(request_id, op, message.get("token"), check_args(op, args))
    except BadInput as exc:
        raise RequestError(exc, request_id) from None


def _refuse_constant(name):
    raise BadInput(f"the request holds {name}, which is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise BadInput(f"the number {text[:40]} is too large")
    return value


def check_args(op, args):
    return _checked_fields(op, OPS[op].args, args, one_of=OPS[op].one_of)


def _checked_fields(where, specs, args, *, one_of=()):
    """`args` checked against `specs` (`where` starts each refusal)."""
    if not isinstance(args, dict):
        raise BadInput(f"{where} must be a JSON object")
    unknown = set(args) - set(specs)
    if unknown:
        raise BadInput(f"{where}: unknown argument {sorted(unknown)[0]!r}; expected {', '.join(specs) or 'none'}")
    clean = {}
    for name, spec in specs.items():
        if name in args:
            clean[name] = spec.check(where, name, args[name])
        elif spec.required:
            raise BadInput(f"{where}: missing argument {name!r}")
    if one_of and sum(clean.get(name) is not None for name in one_of) != 1:
        raise BadInput(f"{where}: give exactly one of {' or '.join(one_of)}")
    return clean


def encode_request(request_id, op, token, args):
    return _line({"v": VERSION, "id": request_id, "op": op, "token": token, "args": args})


def encode_result(request_id, result):
    return _line({"v": VERSION, "id": request_id, "ok": True, "result": result})


def encode_error(request_id, code, message):
    return _line({"v": VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}})


def decode_response(line):
    """bytes -> dict; raises ValueError when the line is not a response at all."""
    message = json.loads(line)
    if not isinstance(message, dict) or message.get("v") != VERSION or "ok" not in message:
        raise ValueError("not a protocol response")
    return message


def _line(message):
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
