"""Regenerate the checked-in Python stubs from proto/, deterministically: `python proto/generate.py`."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT_PACKAGE = "smartdiff"  # proto packages smartdiff.<stage>.v1 -> Python packages of the same name
DEFAULT_OUT = PROTO_DIR / "gen" / "python"


def proto_files() -> list[Path]:
    """Every .proto of the module, in a fixed order."""
    return sorted((PROTO_DIR / ROOT_PACKAGE).rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write `<pkg>_pb2.py`, `_pb2.pyi`, `_pb2_grpc.py` and package `__init__.py`s under out_dir/smartdiff."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    # Regular packages below the implicit namespace root `smartdiff` (which must stay __init__-free
    # so that smartdiff.services and smartdiff.shared from other folders share it).
    for pkg in sorted({p.parent for p in (out_dir / ROOT_PACKAGE).rglob("*.py")}):
        while pkg != out_dir / ROOT_PACKAGE:
            name = ".".join(pkg.relative_to(out_dir).parts)
            (pkg / "__init__.py").write_text(
                f'"""Generated from proto/ by proto/generate.py: {name}. Do not edit."""\n'
            )
            pkg = pkg.parent


def diff_trees(expected: Path, actual: Path) -> list[str]:
    """Relative paths that differ between two generated trees (missing, extra or changed)."""

    def files(root: Path) -> set[str]:
        return {
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
        }

    want, have = files(expected), files(actual)
    changed = {f for f in want & have if not filecmp.cmp(expected / f, actual / f, shallow=False)}
    return sorted((want ^ have) | changed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output root (default: proto/gen/python)"
    )
    parser.add_argument("--check", action="store_true", help="only report whether --out is up to date")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        stale = diff_trees(fresh / ROOT_PACKAGE, args.out / ROOT_PACKAGE)
        if args.check:
            for path in stale:
                print(f"out of date: {path}", file=sys.stderr)
            return 1 if stale else 0
        shutil.rmtree(args.out / ROOT_PACKAGE, ignore_errors=True)
        shutil.copytree(fresh / ROOT_PACKAGE, args.out / ROOT_PACKAGE)
    print(f"wrote {len(proto_files())} protos' stubs to {args.out / ROOT_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
