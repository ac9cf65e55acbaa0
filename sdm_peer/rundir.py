"""Where a run's files live, and the shared token.

A run directory holds `sdm.db`, `sdm.db.token`, `server.json` ({"host", "port", "pid"}), logs,
the local provider's groups and the workers' working directories."""

import json
import os
import secrets
import stat
from pathlib import Path

from .errors import BadInput, SdmPeerError

TOKEN_ENV = "SDM_TOKEN"


def token_path_for(db_path):
    return Path(str(db_path) + ".token")


def write_token(path):
    """Create a random token file readable by its owner only; keep an existing one."""
    path = Path(path)
    if path.exists():
        return read_token(path)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def read_token(path):
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such token file", hint="`sdm-peer init` writes DB.token") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the token file: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BadInput(f"{path}: the token file is readable by others", hint=f"chmod 600 {path}")
    if not text:
        raise BadInput(f"{path}: the token file is empty")
    return text


def resolve_token(token_file=None, *, default_path=None):
    """The token from --token-file, else $SDM_TOKEN, else the default file (DB.token)."""
    if token_file:
        return read_token(token_file)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if default_path is not None:
        return read_token(default_path)
    raise BadInput("no token given", hint="pass --token-file, set SDM_TOKEN, or use --dir RUNDIR")


class RunDir:
    def __init__(self, path):
        self.path = Path(path).absolute()

    db = property(lambda self: self.path / "sdm.db")
    token_file = property(lambda self: token_path_for(self.db))
    server_file = property(lambda self: self.path / "server.json")
    server_log = property(lambda self: self.path / "server.log")
    groups = property(lambda self: self.path / "groups")
    work = property(lambda self: self.path / "work")

    def server_info(self):
        """The recorded server address, or None when no server was started here."""
        try:
            return json.loads(self.server_file.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise SdmPeerError(f"{self.server_file}: unreadable ({exc})") from None

    def server_address(self):
        info = self.server_info()
        if info is None:
            raise BadInput(f"{self.path}: no server recorded (no server.json)",
                           hint=f"start one with `sdm-peer bootstrap` or `sdm-peer serve --dir {self.path}`")
        return info["host"], info["port"]

    def write_server_info(self, host, port, pid):
        temporary = self.server_file.with_suffix(".json.tmp")
        temporary.write_text(json.dumps({"host": host, "port": port, "pid": pid}) + "\n")
        temporary.replace(self.server_file)


def parse_address(text):
    """HOST:PORT -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)
