"""The request parser of DESIGN §4: every op's valid shape, and a clear BAD_REQUEST for everything else."""

import json
import re
from pathlib import Path

import pytest

from sdm_peer import protocol
from sdm_peer.errors import BadInput, LeaseLost, ServerUnavailable, error_for
from sdm_peer.protocol import MAX_TEXT, RequestError, parse_request

TOKEN = "s3cret-token"
SHAPE = {"worker_id": "host:1", "cores": 2, "memory_gb": 4.5}

VALID = {
    "hello": SHAPE,
    "claim": SHAPE,
    "renew": {"lease_token": "lt"},
    "complete": {"lease_token": "lt", "result": {"auc": 0.8, "nested": {"a": [1, 2]}}, "wall_seconds": 12.5},
    "fail": {"lease_token": "lt", "error": "Traceback ...", "exit_code": 3, "wall_seconds": 1},
    "release": {"lease_token": "lt", "reason": "SIGTERM"},
    "provisioned": {"provision_token": "pt", "worker_id": "host:1"},
    "group_failed": {"provision_token": "pt", "error": "quota CPUS exceeded", "worker_id": "host:1"},
    "acquire_provisioning": {"owner": "bootstrap"},
    "group_deleted": {"config": "c2-m4", "worker_id": "host:1"},
    "status": {},
}


def raw(message):
    return json.dumps(message).encode() + b"\n"


def request(op, args=None, **fields):
    message = {"v": 1, "id": 7, "op": op, "token": TOKEN, "args": VALID[op] if args is None else args}
    message.update(fields)
    return raw(message)


def refusal(line):
    with pytest.raises(RequestError) as caught:
        parse_request(line)
    assert caught.value.code == "BAD_REQUEST"
    return caught.value


# ---------------------------------------------------------------- valid requests


@pytest.mark.parametrize("op", sorted(VALID))
def test_every_op_with_its_documented_args_parses(op):
    parsed = parse_request(request(op))
    assert (parsed.id, parsed.op, parsed.token, parsed.args) == (7, op, TOKEN, VALID[op])


def test_renew_of_a_provisioning_lease_parses():
    assert parse_request(request("renew", {"provision_token": "pt"})).args == {"provision_token": "pt"}


def test_renew_of_several_leases_parses_and_each_must_name_exactly_one():
    leases = [{"lease_token": "lt"}, {"provision_token": "pt"}]
    assert parse_request(request("renew", {"leases": leases})).args == {"leases": leases}
    for bad, words in [([], "1 to 1000 items"), (["lt"], "leases[0] must be a JSON object"),
                       ([{"lease_token": "lt", "provision_token": "pt"}], "leases[0]: give exactly one"),
                       ([{"lease_token": "lt"}, {}], "leases[1]: give exactly one"),
                       ([{"lease_token": 5}], "'lease_token' must be a string"),
                       ([{"lease": "lt"}], "unknown argument 'lease'")]:
        assert words in str(refusal(request("renew", {"leases": bad}))), bad
    assert "exactly one" in str(refusal(request("renew", {"leases": leases, "lease_token": "lt"})))


def test_release_by_worker_id_parses_and_reason_is_optional():
    assert parse_request(request("release", {"worker_id": "host:1"})).args == {"worker_id": "host:1"}


def test_fail_without_an_exit_code_parses_as_null():
    args = {**VALID["fail"], "exit_code": None}
    assert parse_request(request("fail", args)).args["exit_code"] is None


def test_status_without_args_and_without_token_parses():
    parsed = parse_request(raw({"v": 1, "id": 0, "op": "status"}))
    assert parsed.args == {} and parsed.token is None


def test_integer_memory_and_surrounding_whitespace_are_accepted():
    parsed = parse_request(b"  " + request("claim", {**SHAPE, "memory_gb": 8}).rstrip() + b" \r\n")
    assert parsed.args["memory_gb"] == 8


def test_text_at_the_length_limit_is_accepted():
    assert parse_request(request("renew", {"lease_token": "t" * MAX_TEXT})).args["lease_token"] == "t" * MAX_TEXT


def test_encoded_request_round_trips_through_the_parser():
    line = protocol.encode_request(41, "claim", TOKEN, SHAPE)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed = parse_request(line)
    assert (parsed.id, parsed.op, parsed.token, parsed.args) == (41, "claim", TOKEN, SHAPE)


# ---------------------------------------------------------------- framing and envelope refusals


@pytest.mark.parametrize("line, words", [
    (b"{not json}\n", "not valid JSON"),
    (b'{"v": 1, "id": 1, "op": "status"} trailing\n', "not valid JSON"),
    (b"\n", "not valid JSON"),
    (b"\xff\xfe\xfa garbage\n", "not"),  # neither UTF-8 nor JSON
    (b'{"v": 1, "id": 1, "op": "status", "token": "\xff\xfe"}\n', "not UTF-8"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'"status"\n', "must be a JSON object"),
    (b"null\n", "must be a JSON object"),
])
def test_unreadable_line_is_refused_with_a_sentence(line, words):
    error = refusal(line)
    assert words in str(error) and error.request_id is None


def test_deeply_nested_brackets_are_bad_request_not_a_crash():
    error = refusal(b"[" * 100_000 + b"\n")
    assert "nested too deeply" in str(error)
    error = refusal(raw({"v": 1, "id": 2, "op": "status"})[:-2] + b',"x":' + b'{"a":' * 100_000 + b"\n")
    assert "JSON" in str(error) or "nested" in str(error)


@pytest.mark.parametrize("request_id", [None, "7", 1.5, True, [1]])
def test_missing_or_non_integer_id_is_refused_without_an_id(request_id):
    message = {"v": 1, "op": "status", "token": TOKEN}
    if request_id is not None:
        message["id"] = request_id
    error = refusal(raw(message))
    assert "integer 'id'" in str(error) and error.request_id is None


@pytest.mark.parametrize("version", [None, 0, 2, "1", True])
def test_wrong_protocol_version_is_refused_and_carries_the_id(version):
    error = refusal(request("status", v=version))
    assert "protocol version" in str(error) and "v1" in str(error)
    assert error.request_id == 7


@pytest.mark.parametrize("op", ["shutdown", "", None, 3, "Claim"])
def test_unknown_op_is_refused_and_names_the_known_ops(op):
    error = refusal(raw({"v": 1, "id": 9, "op": op, "token": TOKEN, "args": {}}))
    assert "unknown op" in str(error) and "claim" in str(error) and error.request_id == 9


@pytest.mark.parametrize("args", [[], "x", 1, False])
def test_args_that_are_not_an_object_are_refused(args):
    error = refusal(request("status", args))
    assert "'args' must be a JSON object" in str(error) and error.request_id == 7


# ---------------------------------------------------------------- argument refusals


def test_unknown_argument_is_refused_and_names_it():
    error = refusal(request("claim", {**SHAPE, "gpus": 1}))
    assert "unknown argument 'gpus'" in str(error) and "worker_id" in str(error) and error.request_id == 7


def test_status_with_any_argument_is_refused():
    assert "unknown argument 'verbose'" in str(refusal(request("status", {"verbose": True})))


@pytest.mark.parametrize("op, missing", [
    ("claim", "worker_id"), ("claim", "cores"), ("hello", "memory_gb"),
    ("complete", "result"), ("complete", "wall_seconds"), ("fail", "error"), ("fail", "exit_code"),
    ("provisioned", "provision_token"), ("acquire_provisioning", "owner"), ("group_deleted", "config"),
])
def test_missing_argument_is_refused_and_named(op, missing):
    args = {name: value for name, value in VALID[op].items() if name != missing}
    error = refusal(request(op, args))
    assert f"missing argument {missing!r}" in str(error) and error.request_id == 7


@pytest.mark.parametrize("name, value, words", [
    ("cores", True, "must be an integer"),
    ("cores", 2.0, "must be an integer"),
    ("cores", "2", "must be an integer"),
    ("cores", 0, "must be positive"),
    ("cores", -1, "must be positive"),
    ("cores", 10**30, "out of range"),
    ("memory_gb", False, "must be a number"),
    ("memory_gb", "4", "must be a number"),
    ("memory_gb", None, "must be a number"),
    ("memory_gb", 0.0, "must be positive"),
    ("worker_id", 5, "must be a string"),
    ("worker_id", "", "1 to 256 characters"),
    ("worker_id", "w" * (MAX_TEXT + 1), "1 to 256 characters"),
])
def test_wrongly_typed_argument_is_refused_and_named(name, value, words):
    error = refusal(request("claim", {**SHAPE, name: value}))
    assert repr(name) in str(error) and words in str(error) and error.request_id == 7


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
def test_non_finite_numbers_are_refused(number):
    line = b'{"v":1,"id":3,"op":"claim","token":"t","args":{"worker_id":"w","cores":1,"memory_gb":%s}}\n' % number
    error = refusal(line)
    assert "memory_gb" in str(error) or "JSON number" in str(error) or "too large" in str(error)


@pytest.mark.parametrize("number", [b"NaN", b"1e400"])
def test_non_finite_number_hidden_in_a_result_is_refused(number):
    line = (b'{"v":1,"id":3,"op":"complete","token":"t","args":{"lease_token":"lt","wall_seconds":1,'
            b'"result":{"score":[%s]}}}\n' % number)
    refusal(line)


def test_huge_integer_wall_seconds_is_bad_request_not_a_crash():
    line = (b'{"v":1,"id":3,"op":"complete","token":"t","args":{"lease_token":"lt","result":{},'
            b'"wall_seconds":1' + b"0" * 400 + b"}}\n")
    assert "out of range" in str(refusal(line))


def test_error_text_may_be_long_but_not_unbounded():
    long_error = "x" * protocol.MAX_ERROR_TEXT
    assert parse_request(request("fail", {**VALID["fail"], "error": long_error})).args["error"] == long_error
    refusal(request("fail", {**VALID["fail"], "error": long_error + "x"}))


@pytest.mark.parametrize("op, args", [
    ("renew", {}),
    ("renew", {"lease_token": "lt", "provision_token": "pt"}),
    ("release", {}),
    ("release", {"reason": "why"}),
    ("release", {"lease_token": "lt", "worker_id": "w"}),
])
def test_renew_and_release_need_exactly_one_of_their_two_handles(op, args):
    assert "give exactly one of" in str(refusal(request(op, args)))


def test_result_must_be_an_object():
    error = refusal(request("complete", {**VALID["complete"], "result": [1, 2]}))
    assert "'result' must be a JSON object" in str(error)


# ---------------------------------------------------------------- responses


def test_result_and_error_lines_decode_back():
    ok = protocol.decode_response(protocol.encode_result(5, {"lease_seconds_left": 60}))
    assert ok == {"v": 1, "id": 5, "ok": True, "result": {"lease_seconds_left": 60}}
    bad = protocol.decode_response(protocol.encode_error(None, "TOO_LARGE", "too long"))
    assert bad["ok"] is False and bad["id"] is None and bad["error"] == {"code": "TOO_LARGE", "message": "too long"}


@pytest.mark.parametrize("line", [b"[]\n", b'{"v": 2, "ok": true}\n', b'{"v": 1, "id": 1}\n'])
def test_a_line_that_is_no_response_is_rejected_by_the_decoder(line):
    with pytest.raises(ValueError):
        protocol.decode_response(line)


def test_error_codes_map_to_the_error_classes():
    assert type(error_for("LEASE_LOST", "m")) is LeaseLost
    assert type(error_for("BAD_REQUEST", "m")) is BadInput
    assert type(error_for("UNAVAILABLE", "m")) is ServerUnavailable
    unknown = error_for("SOMETHING_NEW", "m")
    assert unknown.code == "SOMETHING_NEW" and str(unknown) == "m"


# ---------------------------------------------------------------- the op table and its documentation

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def readme_protocol_rows():
    """op -> its row's args cell, from the README's socket protocol table."""
    section = README.split("## Socket protocol", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", section, re.MULTILINE)
    return dict(rows)


def test_every_op_has_a_handler_a_lane_and_a_readme_entry_naming_its_args():
    documented = readme_protocol_rows()
    assert list(documented) == list(protocol.OPS)  # every op, in the table's order, and nothing else
    for name, op in protocol.OPS.items():
        assert callable(op.handler) and op.lane in (protocol.READ, protocol.WRITE), name
        assert set(op.one_of) <= set(op.args), name
        for arg in op.args:
            assert f"`{arg}`" in documented[name], (name, arg)


def test_every_op_is_tested_here():
    assert set(VALID) == set(protocol.OPS)
