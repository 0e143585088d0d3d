#!/usr/bin/env python3
"""Fetch the pinned Go toolchain from the Go module proxy, verify it and unpack it once.

    scripts/fetch-go.py --dest DIR [--proxy URL]

A fresh Debian machine has no Go new enough for the local control plane (bookworm's golang-go is 1.19,
too old to switch toolchains by itself). The Go project publishes every release as a module,
golang.org/toolchain, on its module proxy: this downloads the pinned version's zip for this machine's
architecture, checks its sha256 against the pin below, and unpacks it into DIR/<version> (a temporary
folder renamed into place: whole or absent). It prints the path of its `go` binary; a second call finds
it there and downloads nothing. Errors: one line on stderr, exit 1 (network) or 2 (a checksum mismatch,
an unknown architecture, a bad archive). Standard library only: it runs before any virtualenv exists.
"""

import argparse
import hashlib
import os
import platform
import shutil
import stat
import sys
import tempfile
import urllib.request
import zipfile

GO_VERSION = "1.26.8"
MODULE = "golang.org/toolchain"
# sha256 of the proxy's zip of v0.0.1-go<GO_VERSION>.linux-<arch>, taken from proxy.golang.org on 2026-12-05
SHA256 = {
    "amd64": "30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7",
    "arm64": "02b36b6787b3ac767668f630e2998df45a3b1f9ffee08d1bf3ef6487cd658d99",
}
MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
DEFAULT_PROXY = "https://proxy.golang.org"


class FetchError(Exception):
    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


def build_parser():
    parser = argparse.ArgumentParser(prog="fetch-go.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", required=True, help="folder the toolchain is unpacked under (a cache)")
    parser.add_argument("--proxy", default=os.environ.get("MLK_GO_PROXY", DEFAULT_PROXY),
                        help=f"the Go module proxy (default {DEFAULT_PROXY}; MLK_GO_PROXY)")
    parser.add_argument("--machine", default=platform.machine(), help=argparse.SUPPRESS)  # tests
    return parser


def unpack(archive, target, prefix):
    """Unpack the zip's files under `prefix` into `target`, keeping their executable bits."""
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            relative = info.filename[len(prefix):]
            path = os.path.normpath(os.path.join(target, relative))
            if relative.startswith("/") or not path.startswith(target + os.sep):
                raise FetchError(f"unsafe path in the archive: {info.filename}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with z.open(info) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode & stat.S_IXUSR:
                os.chmod(path, 0o755)


def fetch(dest, proxy, machine):
    arch = MACHINES.get(machine)
    if arch is None:
        raise FetchError(f"no Go toolchain pinned for machine '{machine}' (amd64 and arm64 are): install Go "
                         f"{GO_VERSION} or newer and set GO")
    version = f"v0.0.1-go{GO_VERSION}.linux-{arch}"
    home = os.path.join(os.path.abspath(dest), f"go{GO_VERSION}.linux-{arch}")
    go = os.path.join(home, "bin", "go")
    if os.access(go, os.X_OK):
        return go
    os.makedirs(dest, exist_ok=True)
    url = f"{proxy.rstrip('/')}/{MODULE}/@v/{version}.zip"
    print(f"fetch-go.py: downloading Go {GO_VERSION} ({arch}) from {url}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as work:
        archive = os.path.join(work, "go.zip")
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=120) as response, open(archive, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as err:
            raise FetchError(f"cannot download {url}: {err}", code=1) from None
        if digest.hexdigest() != SHA256[arch]:
            raise FetchError(f"{url}: sha256 {digest.hexdigest()}, expected {SHA256[arch]}: not used")
        unpacked = os.path.join(work, "go")
        try:
            unpack(archive, unpacked, f"{MODULE}@{version}/")
        except zipfile.BadZipFile as err:
            raise FetchError(f"{url}: not a zip archive: {err}") from None
        if not os.access(os.path.join(unpacked, "bin", "go"), os.X_OK):
            raise FetchError(f"{url}: no bin/go in the archive")
        os.replace(unpacked, home)
    return go


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(fetch(args.dest, args.proxy, args.machine))
    except FetchError as err:
        print(f"fetch-go.py: error: {err}", file=sys.stderr)
        return err.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
