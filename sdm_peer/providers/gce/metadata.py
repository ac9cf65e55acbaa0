"""What a Compute Engine VM knows about itself: the metadata server (DESIGN §6).

The gce provider writes a worker's server address, token, config and shape into its
instance template's metadata; `sdm-peer work --from-metadata` and `sdm-peer release
--from-metadata` read them back here, with the VM's name as the worker id. SDM_METADATA_URL
points elsewhere (tests: a fake on 127.0.0.1)."""

import os
import urllib.error
import urllib.request

import tenacity

from ...errors import SdmPeerError

METADATA_URL_ENV = "SDM_METADATA_URL"
DEFAULT_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1"
BOOT_RETRY_SECONDS = 60.0  # the metadata server can lag a freshly booted VM's first requests

# Instance metadata keys the gce provider sets and the VM reads.
SERVER_KEY = "sdm-server"
TOKEN_KEY = "sdm-token"
CONFIG_KEY = "sdm-config"
CORES_KEY = "sdm-cores"
MEMORY_KEY = "sdm-memory-gb"
RUN_KEY = "sdm-run"


class MetadataUnavailable(Exception):
    """The metadata server did not answer; worth asking again."""


def metadata_url():
    return os.environ.get(METADATA_URL_ENV, DEFAULT_METADATA_URL).rstrip("/")


@tenacity.retry(retry=tenacity.retry_if_exception_type(MetadataUnavailable), reraise=True,
                wait=tenacity.wait_exponential(multiplier=0.2, max=5),
                stop=tenacity.stop_after_delay(BOOT_RETRY_SECONDS))
def _get(path):
    request = urllib.request.Request(f"{metadata_url()}/{path}", headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise SdmPeerError(f"this VM's metadata has no {path!r}",
                               hint="was it created by the sdm-peer gce provider?") from None
        raise MetadataUnavailable(f"{path}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise MetadataUnavailable(f"{path}: {exc}") from None


def read(path):
    """One value from the metadata server, e.g. `instance/name`."""
    try:
        return _get(path)
    except MetadataUnavailable as exc:
        raise SdmPeerError(f"the metadata server at {metadata_url()} does not answer ({exc})",
                           hint="--from-metadata works on a Compute Engine VM only") from None


def attribute(key):
    return read(f"instance/attributes/{key}")


def worker_identity():
    """The worker's name, server, token, config and shape, as the gce provider set them."""
    memory = float(attribute(MEMORY_KEY))
    return {"worker_id": read("instance/name"), "server": attribute(SERVER_KEY), "token": attribute(TOKEN_KEY),
            "config": attribute(CONFIG_KEY), "cores": int(attribute(CORES_KEY)),
            "memory_gb": int(memory) if memory.is_integer() else memory}
