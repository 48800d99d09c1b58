#!/usr/bin/env python3
"""ci/bench-curve-image.py - the 1/2x and 2x images of ci/bench.sh's cost curve.

The curve asks whether conversion cost per GB of layer tar stays flat as an image
grows or shrinks "with more or fewer layers of the same kind". Same kind matters:
hakim-convert's cost follows what it reads plus what it writes, so an image whose
share of shadowed bytes differs is not a point on the same curve. Taking the bottom
half of the layers (almost nothing in them is shadowed yet) or every layer twice
(the whole first copy is shadowed by the second) changes that share. This script
derives images that keep it:

  half    every path goes to one of two halves of equal bytes (summed over all
          layers, biggest first, each to the lighter half) and every layer keeps the
          members of one half (directories and whiteouts always: a few bytes that keep
          the tree's shape), so the image is about half its bytes and each path is
          shadowed by later layers exactly as before.
  double  the image's layers, then every layer once more with each path moved under
          /bench-copy: the copy shadows nothing of the original and is shadowed
          within itself exactly as the original is.

Usage: bench-curve-image.py half|double SRC_LAYOUT TAG DST_LAYOUT

Writes an OCI layout whose new layers are plain tar (double keeps the original
layers by digest, hard-linked from SRC_LAYOUT). bench.sh then gzips it with
`skopeo copy`, the encoder buildah used for the original layers, so every point of
the curve inflates the same kind of gzip stream.
"""

import hashlib
import json
import multiprocessing
import os
import sys
import tarfile

PREFIX = "bench-copy"
PLAIN = "application/vnd.oci.image.layer.v1.tar"


def rel(name):
    """A member name without ./ or / in front or / behind ('' for the root)."""
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def is_whiteout(name):
    return os.path.basename(rel(name)).startswith(".wh.")


def relocate(name):
    r = rel(name)
    return PREFIX + "/" + r if r else PREFIX


class Hashing:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def decider(m):
    """The path whose half a member follows (a hard link follows its target)."""
    return rel(m.linkname if m.islnk() else m.name)


def events(src_blob):
    """A layer's members in order: ("file", path, bytes), ("gone", path) for a
    whiteout, ("opaque", dir) for an opaque directory."""
    out = []
    with open(src_blob, "rb") as raw:
        for m in tarfile.open(fileobj=raw, mode="r|*"):
            parent, base = os.path.split(rel(m.name))
            if base == ".wh..wh..opq":
                out.append(("opaque", parent))
            elif base.startswith(".wh."):
                out.append(("gone", os.path.join(parent, base[4:])))
            elif not m.isdir():
                out.append(("file", decider(m), m.size))
    return out


def under(path, roots):
    """Whether path is one of roots or below one."""
    while True:
        if path in roots:
            return True
        if "/" not in path:
            return False
        path = path.rsplit("/", 1)[0]


def halves(pool, blobs):
    """The paths of the kept half. Each path's bytes are split into what ends up
    in the image (its last version) and what later layers shadow or delete; paths go,
    biggest first, to the half that keeps both sums closest to even."""
    total, current = {}, {}
    for layer in pool.map(events, blobs):
        # Whiteouts and opaque markers hide what lower layers have, not this one.
        gone = {e[1] for e in layer if e[0] == "gone"}
        opaque = {e[1] for e in layer if e[0] == "opaque"}
        current = {
            p: n
            for p, n in current.items()
            if not under(p, gone) and not (opaque and "/" in p and under(p.rsplit("/", 1)[0], opaque))
        }
        for e in layer:
            if e[0] == "file":
                total[e[1]] = total.get(e[1], 0) + e[2]
                current[e[1]] = e[2]
    final_sum = max(sum(current.values()), 1)
    shadow_sum = max(sum(total.values()) - sum(current.values()), 1)
    kept, diff_final, diff_shadow = set(), 0, 0
    for path, n in sorted(total.items(), key=lambda kv: (-kv[1], kv[0])):
        final = current.get(path, 0)
        shadow = n - final
        keep_cost = abs(diff_final + final) / final_sum + abs(diff_shadow + shadow) / shadow_sum
        leave_cost = abs(diff_final - final) / final_sum + abs(diff_shadow - shadow) / shadow_sum
        if keep_cost <= leave_cost:
            kept.add(path)
            diff_final, diff_shadow = diff_final + final, diff_shadow + shadow
        else:
            diff_final, diff_shadow = diff_final - final, diff_shadow - shadow
    return frozenset(kept)


def derive_layer(job):
    mode, src_blob, tmp, kept = job
    with open(src_blob, "rb") as raw, open(tmp, "wb") as out:
        sink = Hashing(out)
        src = tarfile.open(fileobj=raw, mode="r|*")
        dst = tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT)
        for m in src:
            data = src.extractfile(m) if m.isreg() else None
            if mode == "half":
                if not (m.isdir() or is_whiteout(m.name) or decider(m) in kept):
                    continue
            else:
                m.name = relocate(m.name)
                if m.islnk():
                    m.linkname = relocate(m.linkname)
                # A PAX path/linkpath record would win over the new names.
                m.pax_headers.pop("path", None)
                m.pax_headers.pop("linkpath", None)
            if m.sparse is not None:
                # Written back expanded: the bench image has no sparse members.
                m.sparse = None
                m.type = tarfile.REGTYPE
                for k in [k for k in m.pax_headers if k.startswith("GNU.sparse.")]:
                    del m.pax_headers[k]
            dst.addfile(m, data)
        dst.close()
    return sink.sha.hexdigest(), sink.size


def load(layout, digest):
    with open(os.path.join(layout, "blobs", *digest.split(":")), "rb") as f:
        return json.load(f)


def put_json(dst, obj):
    raw = json.dumps(obj, separators=(",", ":")).encode()
    digest = hashlib.sha256(raw).hexdigest()
    with open(os.path.join(dst, "blobs", "sha256", digest), "wb") as f:
        f.write(raw)
    return {"digest": "sha256:" + digest, "size": len(raw)}


def main():
    if len(sys.argv) != 5 or sys.argv[1] not in ("half", "double"):
        sys.exit("usage: bench-curve-image.py half|double SRC_LAYOUT TAG DST_LAYOUT")
    mode, src, tag, dst = sys.argv[1:]
    with open(os.path.join(src, "index.json")) as f:
        index = json.load(f)
    [desc] = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    manifest = load(src, desc["digest"])
    config = load(src, manifest["config"]["digest"])
    blobs = os.path.join(dst, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    sources = [os.path.join(src, "blobs", *layer["digest"].split(":")) for layer in manifest["layers"]]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        kept = halves(pool, sources) if mode == "half" else frozenset()
        jobs = [(mode, s, os.path.join(blobs, f"tmp.{i}"), kept) for i, s in enumerate(sources)]
        derived = pool.map(derive_layer, jobs)
    new_layers, new_diff_ids = [], []
    for (_, _, tmp, _), (digest, size) in zip(jobs, derived):
        os.replace(tmp, os.path.join(blobs, digest))
        new_layers.append({"mediaType": PLAIN, "digest": "sha256:" + digest, "size": size})
        new_diff_ids.append("sha256:" + digest)

    if mode == "double":
        for layer in manifest["layers"]:
            target = os.path.join(blobs, layer["digest"].split(":")[1])
            if not os.path.exists(target):
                os.link(os.path.join(src, "blobs", *layer["digest"].split(":")), target)
        layers = manifest["layers"] + new_layers
        diff_ids = config["rootfs"]["diff_ids"] + new_diff_ids
    else:
        layers, diff_ids = new_layers, new_diff_ids

    config["rootfs"]["diff_ids"] = diff_ids
    config["history"] = []
    manifest["config"].update(put_json(dst, config))
    manifest["layers"] = layers
    manifest.pop("annotations", None)
    mdesc = put_json(dst, manifest)
    mdesc.update(
        mediaType="application/vnd.oci.image.manifest.v1+json",
        annotations={"org.opencontainers.image.ref.name": tag},
    )
    with open(os.path.join(dst, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [mdesc]}, f)


if __name__ == "__main__":
    main()
