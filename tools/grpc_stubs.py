"""Compile the Open Inference Protocol's gRPC API (app/grpc/proto/grpc_predict_v2.proto) into
the serialized descriptor set camserve builds its messages from (``grpc_predict_v2.binpb``).

Usage (from the repository root; ``make grpc-stubs`` runs the first)::

    .venv/bin/python tools/grpc_stubs.py              # rewrite the committed descriptor set
    .venv/bin/python tools/grpc_stubs.py --out DIR    # write it into DIR instead

A descriptor set rather than generated ``_pb2`` modules: tritonclient.grpc and the KServe SDK
register protobuf package ``inference`` in protobuf's default pool, and modules of ours would
collide with theirs in any process that imports both ("duplicate symbol"). app.grpc.messages
loads the set into a pool of its own. ``tests/grpc/test_stubs.py`` fails when the committed file
is not what this script writes from the proto.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "app" / "grpc" / "proto"
PROTO = "grpc_predict_v2.proto"
DESCRIPTOR_SET = "grpc_predict_v2.binpb"


def generate(out_dir: Path) -> Path:
    """Run protoc (grpcio-tools) on the proto; return the descriptor set written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / DESCRIPTOR_SET
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--descriptor_set_out={target}",
            "--include_imports",
            PROTO,
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed on {PROTO} (exit {status})")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="folder to write into")
    args = parser.parse_args(argv)
    written = generate(args.out)
    print(f"wrote {written.relative_to(REPO) if written.is_relative_to(REPO) else written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
