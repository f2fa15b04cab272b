#!/usr/bin/env python3
"""Delete this repository's stale build outputs from shared Cargo target dirs.

Usage: scripts/prune-target.py TARGET_DIR...

Every checkout at a new path (each CI clone is one) and every change to the
crate builds its test binaries, libraries and incremental state under new
hashes; Cargo never deletes the old ones. With RocksDB linked into every test
and fuzz binary (100 to 500 MB each), a shared target dir grew past 70 GB in
one day and a CI run died when the disk filled mid-link (`ld` killed by
SIGBUS).

Only artifacts named after this workspace's own targets are touched:
third-party crates keep one hash per profile and are what makes a warm build
warm. For each (name, extension) the KEEP newest are kept, enough for every
variant one build needs at once (a library, its unit-test binary and a
binary share a name), and twice that in build/, where a build script's
binary and each of its runs have a directory apiece. Deleting a current one
only costs a relink or a rerun of our own build script.
"""

import collections
import json
import os
import re
import shutil
import subprocess
import sys

KEEP = 3
# name-hash[.ext]: 16 hex digits in deps/, 13 base-36 ones in incremental/.
ARTIFACT = re.compile(r"^(lib)?([A-Za-z0-9_]+)-([0-9a-f]{16}|[0-9a-z]{13})((?:\.[A-Za-z0-9_]+)*)$")


def workspace_names():
    """Crate names of every target in this workspace and the fuzz crate."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = set()
    for manifest in ("Cargo.toml", "fuzz/Cargo.toml"):
        path = os.path.join(root, manifest)
        if not os.path.exists(path):
            continue
        out = subprocess.run(
            ["cargo", "metadata", "--no-deps", "--offline", "--format-version", "1",
             "--manifest-path", path],
            check=True, capture_output=True, text=True,
        ).stdout
        for package in json.loads(out)["packages"]:
            names.add(package["name"].replace("-", "_"))
            for target in package["targets"]:
                names.add(target["name"].replace("-", "_"))
    return names


def size_of(path):
    if os.path.isdir(path) and not os.path.islink(path):
        total = 0
        for dirpath, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def prune_dir(directory, names, keep):
    """Delete all but the `keep` newest entries per (name, extension)."""
    groups = collections.defaultdict(list)
    for entry in os.listdir(directory):
        match = ARTIFACT.match(entry)
        if not match or match.group(2) not in names:
            continue
        path = os.path.join(directory, entry)
        key = (match.group(1), match.group(2), match.group(4))
        groups[key].append((os.lstat(path).st_mtime, path))
    freed = 0
    for entries in groups.values():
        entries.sort(reverse=True)
        for _, path in entries[keep:]:
            freed += size_of(path)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
    return freed


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip().splitlines()[2])
    target_dirs = [d for d in sys.argv[1:] if os.path.isdir(d)]
    if not target_dirs:
        return
    try:
        names = workspace_names()
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        # Pruning saves disk; it is never a reason for a build to fail.
        print(f"prune-target: skipped, cannot list this workspace's targets: {e}")
        return
    for target_dir in target_dirs:
        freed = 0
        for dirpath, dirnames, _ in os.walk(target_dir):
            # deps/ and incremental/ sit one or two levels down (profile, or
            # target triple then profile); nothing of ours lies deeper.
            if dirpath[len(target_dir):].count(os.sep) >= 3:
                dirnames.clear()
                continue
            for sub, keep in (("deps", KEEP), ("incremental", KEEP), ("build", 2 * KEEP)):
                if sub in dirnames:
                    freed += prune_dir(os.path.join(dirpath, sub), names, keep)
            dirnames[:] = [d for d in dirnames if d not in ("deps", "incremental", "build", ".fingerprint")]
        print(f"prune-target: {target_dir}: freed {freed / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
