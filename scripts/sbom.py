#!/usr/bin/env python3
"""The CycloneDX SBOM of the tokenvault binary, checked (`make sbom`).

cargo-cyclonedx lists the crates; this script checks that every crate the
binary links on the target (cargo's resolved graph: normal dependencies,
no build or dev ones) is in it, and adds the native libraries that crates
compile into the binary (RocksDB's C++ above all), which no crate listing
names: each crate with a `links` key contributes one component, its
version from the crate's build metadata (`librocksdb-sys 0.19.0+11.8.1`
bundles RocksDB 11.8.1) where the crate gives one.

    scripts/sbom.py OUT_DIR [TARGET]
        writes OUT_DIR/tokenvault.cdx.json for TARGET (default
        x86_64-unknown-linux-gnu)

The native libraries' licences are not stated: a crate's licence is not
the library's (RocksDB is GPL-2.0 OR Apache-2.0, its crate MIT/Apache-2.0).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

TARGET = "x86_64-unknown-linux-gnu"
ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"sbom: {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def linked_packages(target):
    """Every package the binary links: normal dependencies of the root
    package, transitively, for `target`."""
    meta = json.loads(
        run("cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", target)
    )
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    seen, stack = set(), [root]
    while stack:
        node = nodes[stack.pop()]
        for dep in node["deps"]:
            normal = any(kind["kind"] is None for kind in dep["dep_kinds"])
            if normal and dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                stack.append(dep["pkg"])
    return [packages[i] for i in seen]


def native_component(package):
    """The native library a `links` crate compiles in, as a component."""
    name = package["links"]
    version = package["version"]
    bundled = version.split("+", 1)[1] if "+" in version else None
    if bundled and bundled.startswith(name + "-"):
        bundled = bundled[len(name) + 1 :]
    return {
        "type": "library",
        "bom-ref": f"native:{name}@{bundled or 'unknown'}",
        "name": name,
        "version": bundled or "unknown",
        "description": f"native library the crate {package['name']} {version} builds or links into the binary",
        "purl": f"pkg:generic/{name}@{bundled}" if bundled else f"pkg:generic/{name}",
    }


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out_dir = Path(sys.argv[1])
    target = sys.argv[2] if len(sys.argv) == 3 else TARGET
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = ROOT / "tokenvault_bin.cdx.json"
    generated.unlink(missing_ok=True)
    try:
        run(
            "cargo", "cyclonedx", "--format", "json", "--spec-version", "1.5",
            "--describe", "binaries", "--target", target, "--no-build-deps", "--quiet",
        )
        bom = json.loads(generated.read_text())
    finally:
        generated.unlink(missing_ok=True)
    listed = {(c["name"], c["version"]) for c in bom.get("components", [])}
    linked = linked_packages(target)
    missing = sorted(
        f"{p['name']} {p['version']}" for p in linked if (p["name"], p["version"]) not in listed
    )
    if missing:
        sys.exit(f"sbom: the SBOM lacks crates the binary links: {', '.join(missing)}")
    natives = sorted(
        (native_component(p) for p in linked if p.get("links")), key=lambda n: n["name"]
    )
    if not any(n["name"] == "rocksdb" and n["version"] != "unknown" for n in natives):
        sys.exit("sbom: no RocksDB among the native libraries (librocksdb-sys's version names it)")
    bom["components"].extend(natives)
    out = out_dir / "tokenvault.cdx.json"
    out.write_text(json.dumps(bom, indent=2) + "\n")
    names = ", ".join(f"{n['name']} {n['version']}" for n in natives)
    print(f"sbom: {len(linked)} crates and {len(natives)} native libraries ({names}) in {out}")


if __name__ == "__main__":
    main()
