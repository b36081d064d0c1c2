#!/usr/bin/env python3
"""Generate moe_service/transport/pb/ from protos/ (run after editing a .proto file).

protoc sees protos/moe/v1/moe.proto under the virtual path moe_service/transport/pb/moe.proto, so the
generated modules carry their real import path (messages pickle, e.g. through Ray Serve, and the gRPC
module imports its messages by package). `--check` regenerates into a temp dir and compares.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "moe" / "v1"
OUT = ROOT / "moe_service" / "transport" / "pb"
FILES = ("moe_pb2.py", "moe_pb2.pyi", "moe_pb2_grpc.py")


VIRTUAL = "moe_service/transport/pb"


def generate(out: Path) -> None:
    """Writes the generated files into `out` (a folder standing for moe_service/transport/pb)."""
    import shutil
    import tempfile

    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as root:
        args = ["protoc", f"-I{VIRTUAL}={PROTO_DIR}", f"--python_out={root}", f"--pyi_out={root}",
                f"--grpc_python_out={root}", f"{VIRTUAL}/moe.proto"]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.copy(Path(root) / VIRTUAL / f, out / f)
    (out / "__init__.py").write_text('"""Generated from protos/moe/v1/moe.proto by scripts/gen_protos.py; do not edit."""\n')


def check() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [f for f in FILES + ("__init__.py",) if not filecmp.cmp(Path(tmp) / f, OUT / f, shallow=False)]


if __name__ == "__main__":
    if "--check" in sys.argv:
        stale = check()
        print("up to date" if not stale else f"stale: {stale}")
        sys.exit(1 if stale else 0)
    generate(OUT)
    print(f"generated {OUT}")
