"""Fetch the run's sdm-peer wheel on a VM with its service account, using nothing but Python: a
token from the metadata server, then Cloud Storage's JSON API media download.

Usage: python3 fetch_wheel.py gs://BUCKET/OBJECT FILE   (an empty URL: nothing to fetch, the
run installs its `sdm_peer_spec` instead). Written onto every VM by its cloud-config. The
metadata server and Cloud Storage can lag a freshly booted VM, so refusals that may pass
(a connection, 429, 5xx) are asked again for a few minutes. SDM_METADATA_URL and
SDM_GCS_API_ENDPOINT point elsewhere (tests: fakes on 127.0.0.1)."""

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

METADATA = os.environ.get("SDM_METADATA_URL", "http://metadata.google.internal/computeMetadata/v1").rstrip("/")
STORAGE = os.environ.get("SDM_GCS_API_ENDPOINT")
STORAGE = (STORAGE if "://" in STORAGE else f"http://{STORAGE}") if STORAGE else "https://storage.googleapis.com"
PATIENCE = 300.0  # seconds


def get(url, headers):
    deadline, pause = time.monotonic() + PATIENCE, 1.0
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            if exc.code != 429 and exc.code < 500 or time.monotonic() > deadline:
                raise SystemExit(f"fetch_wheel: {url}: {exc.code} {exc.read()[:300]!r}") from None
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"fetch_wheel: {url}: {exc}") from None
        time.sleep(pause)
        pause = min(pause * 2, 30.0)


def main(url, target):
    if not url:
        return
    bucket, _, name = url.removeprefix("gs://").partition("/")
    token = json.loads(get(f"{METADATA}/instance/service-accounts/default/token", {"Metadata-Flavor": "Google"}))
    data = get(f"{STORAGE}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(name, safe='')}"
               "?alt=media", {"Authorization": f"Bearer {token['access_token']}"})
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    with open(target + ".part", "wb") as out:
        out.write(data)
    os.replace(target + ".part", target)


if __name__ == "__main__":
    main(*sys.argv[1:3])
