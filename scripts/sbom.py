#!/usr/bin/env python3
"""The CycloneDX SBOM of the tokenvault binary, checked (`make sbom`).

cargo-cyclonedx lists the crates; this script checks that every crate the
binary links on the target (cargo's resolved graph: normal dependencies,
no build or dev ones) is in it, and adds the native libraries that crates
compile into the binary (RocksDB's C++ above all), which no crate listing
names: each crate with a `links` key contributes one component, its
version from the crate's build metadata (`librocksdb-sys 0.19.0+11.8.1`
bundles RocksDB 11.8.1) where the crate gives one.

    scripts/sbom.py OUT_DIR     writes OUT_DIR/tokenvault.cdx.json
"""

import json
import os
import subprocess
import sys
from pathlib import Path

TARGET = "x86_64-unknown-linux-gnu"
ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def linked_packages():
    """Every package the binary links: normal dependencies of the root
    package, transitively, for TARGET."""
    meta = json.loads(
        run("cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", TARGET)
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
        "licenses": [{"expression": package["license"].replace("/", " OR ")}]
        if package.get("license")
        else [],
    }


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = ROOT / "tokenvault_bin.cdx.json"
    generated.unlink(missing_ok=True)
    run(
        "cargo", "cyclonedx", "--format", "json", "--spec-version", "1.5",
        "--describe", "binaries", "--target", TARGET, "--no-build-deps", "--quiet",
    )
    bom = json.loads(generated.read_text())
    generated.unlink()
    listed = {(c["name"], c["version"]) for c in bom.get("components", [])}
    linked = linked_packages()
    missing = sorted(
        f"{p['name']} {p['version']}" for p in linked if (p["name"], p["version"]) not in listed
    )
    if missing:
        sys.exit(f"sbom: the SBOM lacks crates the binary links: {', '.join(missing)}")
    natives = [native_component(p) for p in linked if p.get("links")]
    if not any(n["name"] == "rocksdb" and n["version"] != "unknown" for n in natives):
        sys.exit("sbom: no RocksDB among the native libraries (librocksdb-sys's version names it)")
    bom["components"].extend(natives)
    out = out_dir / "tokenvault.cdx.json"
    out.write_text(json.dumps(bom, indent=2) + "\n")
    names = ", ".join(f"{n['name']} {n['version']}" for n in natives)
    print(f"sbom: {len(linked)} crates and {len(natives)} native libraries ({names}) in {out}")


if __name__ == "__main__":
    main()
