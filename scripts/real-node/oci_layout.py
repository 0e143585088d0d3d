#!/usr/bin/env python3
"""An OCI image layout of one layer, for the real node's pause image (scripts/real-node.sh build).

    oci_layout.py --layer LAYER.tar --arch ARCH --name IMAGE:TAG --ref TAG [--user U:G] [--entrypoint PATH]... DIR

Moves LAYER.tar (an uncompressed tar) into DIR/blobs/sha256/ under its digest and writes beside it the
image's config, its manifest, DIR/index.json (the manifest named IMAGE:TAG for containerd and TAG as the
OCI ref name, for linux/ARCH) and DIR/oci-layout: what `ctr images import` takes once DIR is tarred. Every
JSON document is written compact, keys in the order given here, so the same layer gives the same digests.
Prints the manifest's digest. Errors: one line on stderr, exit 2. Standard library only.
"""

import argparse
import hashlib
import json
import os
import sys

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def compact(document):
    return json.dumps(document, separators=(",", ":")).encode()


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_blob(blobs, data):
    """data under its sha256 in blobs/; returns its descriptor's digest and size."""
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return f"sha256:{digest}", len(data)


def write_layout(out, layer, arch, name, ref, user="65535:65535", entrypoint=("/pause",)):
    """The layout in out (created); returns the manifest's digest."""
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    layer_digest, layer_size = sha256_file(layer), os.path.getsize(layer)
    os.replace(layer, os.path.join(blobs, layer_digest))
    layer_digest = f"sha256:{layer_digest}"
    config = {"architecture": arch, "os": "linux",
              "config": {"User": user, "Entrypoint": list(entrypoint)},
              "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}  # uncompressed: diff_id = digest
    config_digest, config_size = write_blob(blobs, compact(config))
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_size},
                "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": layer_size}]}
    manifest_digest, manifest_size = write_blob(blobs, compact(manifest))
    index = {"schemaVersion": 2, "mediaType": INDEX,
             "manifests": [{"mediaType": MANIFEST, "digest": manifest_digest, "size": manifest_size,
                            "annotations": {"io.containerd.image.name": name,
                                            "org.opencontainers.image.ref.name": ref},
                            "platform": {"architecture": arch, "os": "linux"}}]}
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(compact(index))
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(compact({"imageLayoutVersion": "1.0.0"}))
    return manifest_digest


def build_parser():
    parser = argparse.ArgumentParser(prog="oci_layout.py", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("dir", help="the layout's folder (created)")
    parser.add_argument("--layer", required=True, help="the layer, an uncompressed tar (moved into the layout)")
    parser.add_argument("--arch", required=True, help="GOARCH of the image (amd64, arm64)")
    parser.add_argument("--name", required=True, help="the image's name for containerd (io.containerd.image.name)")
    parser.add_argument("--ref", required=True, help="its OCI ref name (org.opencontainers.image.ref.name)")
    parser.add_argument("--user", default="65535:65535", help="the config's User (65535:65535)")
    parser.add_argument("--entrypoint", action="append", help="the config's Entrypoint, one word each (/pause)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.layer):
        print(f"oci_layout.py: no layer file {args.layer}", file=sys.stderr)
        return 2
    try:
        print(write_layout(args.dir, args.layer, args.arch, args.name, args.ref, args.user,
                           args.entrypoint or ["/pause"]))
    except OSError as e:
        print(f"oci_layout.py: cannot write the layout in {args.dir}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
