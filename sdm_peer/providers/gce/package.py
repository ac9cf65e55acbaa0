"""The VMs run exactly the sdm-peer that bootstrapped the run (issue 14): `bootstrap` writes a
wheel of the installed sdm-peer and puts it beside the replica in the run's bucket
(gs://BUCKET/RUN/sdm_peer-VERSION-py3-none-any.whl); the cloud-configs fetch it from there with
the VM's service account (cloud_init/fetch_wheel.py: nothing but Python) and pip-install it with
its [gce] extra. Nothing has to be published first. The `sdm_peer_spec` setting overrides it.

The wheel is written from the installed distribution itself, its metadata and the files of the
imported package, so it is the same from an editable checkout and from an installed wheel, needs
no build backend and no network, and the same code always gives the same bytes."""

import base64
import hashlib
import os
import shutil
import urllib.parse
import zipfile
from importlib import metadata
from pathlib import Path

import tenacity

from ...errors import ProviderError

DISTRIBUTION = "sdm-peer"
TAG = "py3-none-any"
STORAGE_ENDPOINT_ENV = "SDM_GCS_API_ENDPOINT"  # set: plain HTTP to this host:port, anonymous (tests)
STORAGE_URL = "https://storage.googleapis.com"
SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # every entry's time: the same files give the same wheel
UPLOAD_SECONDS = 120.0


def version():
    return metadata.version(DISTRIBUTION)


def wheel_name():
    """sdm_peer-VERSION-py3-none-any.whl: the installed version's wheel."""
    return f"{DISTRIBUTION.replace('-', '_')}-{version()}-{TAG}.whl"


def wheel_url(settings):
    """Where a run keeps the wheel its VMs install: beside its replica. A VM renders the same
    URL for its own version, which is the wheel's."""
    return f"{settings['replica_url'].rstrip('/')}/{wheel_name()}"


def build_wheel(directory):
    """Write the installed sdm-peer as a wheel into `directory`; its path."""
    import sdm_peer

    distribution = metadata.distribution(DISTRIBUTION)
    package = Path(sdm_peer.__file__).parent
    info = f"{DISTRIBUTION.replace('-', '_')}-{version()}.dist-info"
    files = [(f"{package.name}/{path.relative_to(package).as_posix()}", path.read_bytes())
             for path in sorted(package.rglob("*"))
             if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"]
    files += [
        # An egg-info (a checkout's, found first from its directory) holds the same as PKG-INFO.
        (f"{info}/METADATA", (distribution.read_text("METADATA") or distribution.read_text("PKG-INFO")).encode()),
        (f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: sdm-peer\nRoot-Is-Purelib: true\nTag: {TAG}\n".encode()),
        (f"{info}/entry_points.txt", (distribution.read_text("entry_points.txt") or "").encode()),
        (f"{info}/top_level.txt", f"{package.name}\n".encode()),
    ]
    record = "".join(f"{name},sha256={_digest(data)},{len(data)}\n" for name, data in files) + f"{info}/RECORD,,\n"
    path = Path(directory) / wheel_name()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in [*files, (f"{info}/RECORD", record.encode())]:
            entry = zipfile.ZipInfo(name, ZIP_TIME)
            entry.external_attr = 0o644 << 16
            wheel.writestr(entry, data, zipfile.ZIP_DEFLATED)
    return path


def _digest(data):
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def publish(settings, directory):
    """Build the wheel in `directory` and put it where the run's VMs fetch it; its URL."""
    url = wheel_url(settings)
    upload(build_wheel(directory), url)
    return url


def upload(path, url):
    """Copy a file to gs://BUCKET/OBJECT through the Cloud Storage JSON API (a media upload
    with Application Default Credentials), or to a file:// URL (a test's replica)."""
    if url.startswith("file://"):
        target = Path(urllib.parse.urlparse(url).path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return
    bucket, _, name = url.removeprefix("gs://").partition("/")
    session, base = _storage_session()
    what = f"uploading {path.name} to {url}"
    retrying = tenacity.Retrying(retry=tenacity.retry_if_exception_type(_Transient), reraise=True,
                                 wait=tenacity.wait_random_exponential(multiplier=1, max=20),
                                 stop=tenacity.stop_after_delay(UPLOAD_SECONDS))
    try:
        retrying(_post, session, f"{base}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o",
                 path.read_bytes(), name, what)
    except _Transient as exc:
        raise ProviderError(f"{what}: Cloud Storage still refused after retrying ({exc})") from None


class _Transient(Exception):
    """A refusal worth asking again: throttling, a server error, a connection that failed."""


def _post(session, url, data, name, what):
    import requests

    try:
        answer = session.post(url, params={"uploadType": "media", "name": name}, data=data, timeout=60,
                              headers={"Content-Type": "application/octet-stream"})
    except requests.RequestException as exc:
        raise _Transient(str(exc)) from None
    if answer.status_code == 429 or answer.status_code >= 500:
        raise _Transient(f"{answer.status_code} {answer.text[:200]}")
    if answer.status_code in (401, 403):
        raise ProviderError(f"{what}: permission denied ({answer.text[:300]})",
                            hint="the account needs roles/storage.objectAdmin on the bucket (as Litestream does)")
    if answer.status_code != 200:
        raise ProviderError(f"{what}: {answer.status_code} {answer.text[:300]}")


def _storage_session():
    """A requests session for Cloud Storage and its base URL: Application Default Credentials,
    or, with SDM_GCS_API_ENDPOINT set, plain HTTP to that endpoint without credentials."""
    import requests

    endpoint = os.environ.get(STORAGE_ENDPOINT_ENV)
    if endpoint:
        return requests.Session(), endpoint if "://" in endpoint else f"http://{endpoint}"
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    from google.auth.transport.requests import AuthorizedSession

    try:
        credentials, _ = google.auth.default(scopes=SCOPES)
    except DefaultCredentialsError as exc:
        raise ProviderError(f"cannot use Cloud Storage: {exc}",
                            hint="run `gcloud auth application-default login`") from None
    return AuthorizedSession(credentials), STORAGE_URL

