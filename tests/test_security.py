"""TLS between workers and server, and the shared token's handling."""

import datetime
import ipaddress
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sdm_peer import auth
from sdm_peer.client import Client
from sdm_peer.errors import BadInput, ServerUnavailable

from .conftest import grid
from .runs import make_run, sdm

SHAPE = {"cores": 2, "memory_gb": 4}


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory):
    """A CA and a server certificate for 127.0.0.1 signed by it; returns (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("sdm-peer test CA")).issuer_name(_name("sdm-peer test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_tls_server_serves_clients_that_trust_its_ca_only(tmp_path, spawn_server):  # noqa: F811
    ca, cert, key = make_certificates(tmp_path)
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 2))
    server = spawn_server(db, "--tls-cert", cert, "--tls-key", key)
    trusting = Client(server.address, token, tls_ca=str(ca), retry_seconds=0)
    assert trusting.call("claim", worker_id="w", **SHAPE)["experiment"] is not None
    trusting.close()
    # A client speaking plain TCP gets nowhere (the handshake fails; it never reads an answer).
    with pytest.raises(ServerUnavailable):
        Client(server.address, token, retry_seconds=0.5, timeout=2).call("status")
    # A client trusting another CA refuses the server at once, with a reason.
    (tmp_path / "other").mkdir()
    other_ca, _, _ = make_certificates(tmp_path / "other")
    with pytest.raises(BadInput, match="not trusted"):
        Client(server.address, token, tls_ca=str(other_ca), retry_seconds=5).call("status")
    host, port = server.address
    shown = sdm("status", "--server", f"{host}:{port}", "--tls-ca", ca, "--json", env={"SDM_TOKEN": token})
    assert '"started": 1' in shown.stdout


def test_tls_needs_both_certificate_and_key(tmp_path):
    ca, cert, key = make_certificates(tmp_path)
    db, _ = make_run(tmp_path / "run", grid([(2, 4)], 1))
    refused = sdm("serve", "--db", db, "--port", 0, "--tls-cert", cert, check=False)
    assert refused.returncode == 2 and "--tls-key" in refused.stderr


def test_a_token_file_readable_by_others_is_refused(tmp_path):
    db, _ = make_run(tmp_path / "run", grid([(2, 4)], 1))
    token_file = str(db) + ".token"
    os.chmod(token_file, 0o644)
    refused = sdm("serve", "--db", db, "--port", 0, check=False)
    assert refused.returncode == 2 and "readable by others" in refused.stderr and "chmod 600" in refused.stderr


def test_the_token_is_never_logged_or_echoed(tmp_path, spawn_server):  # noqa: F811
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 1))
    server = spawn_server(db)
    client = Client(server.address, token, retry_seconds=0)
    client.call("hello", worker_id="w", **SHAPE)
    client.call("claim", worker_id="w", **SHAPE)
    with pytest.raises(BadInput) as refused:
        client.call("claim", worker_id=token, cores=0, memory_gb=1)
    assert token not in str(refused.value)
    client.close()
    settings_answer = Client(server.address, token, retry_seconds=0).call("hello", worker_id="w2", **SHAPE)
    assert token not in repr(settings_answer)
    log = server.log()
    assert "lease 2" in log and token not in log  # the log is real and holds no token


# ---------------------------------------------------------------- auth.py (the socket service and the dashboard)


def test_a_token_matches_only_itself_whatever_a_request_carried():
    assert auth.matches("s3cret", "s3cret") and auth.matches(b"s3cret", b"s3cret")
    for given in ("s3cre", "s3cret ", "", None, 7, ["s3cret"], "s3cret\udcff"):
        assert not auth.matches(given, "s3cret"), given


def test_the_throttle_counts_failures_per_address_over_a_sliding_window():
    clock = [1000.0]
    throttle = auth.Throttle(allowed=3, window=60.0, clock=lambda: clock[0])
    assert [throttle.failure("10.0.0.1") for _ in range(5)] == [0, 0, 0, 1, 2]
    assert throttle.failure("10.0.0.2") == 0  # another address has its own allowance
    clock[0] += 61.0  # the window slides past every earlier failure
    assert throttle.failure("10.0.0.1") == 0
