#!/usr/bin/env python3
"""Generate moe_service/transport/pb/ from protos/ (run after editing a .proto file).

protoc writes `import moe_pb2` in the gRPC module; it is rewritten to a relative import so the
generated package can live inside moe_service. `--check` regenerates into a temp dir and compares.
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


def generate(out: Path) -> None:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            str(PROTO_DIR / "moe.proto")]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_file = out / "moe_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("import moe_pb2 as", "from . import moe_pb2 as"))
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
