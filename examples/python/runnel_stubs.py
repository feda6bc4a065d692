"""Generates Python stubs from proto/runnel.proto with grpcio-tools (once) and imports them.

    pip install grpcio grpcio-tools
"""
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
OUT = os.path.join(HERE, "generated")


def load():
    """Returns (runnel_pb2, runnel_pb2_grpc), generating them when missing or stale."""
    src = os.path.join(PROTO_DIR, "runnel.proto")
    target = os.path.join(OUT, "runnel_pb2.py")
    if not os.path.exists(target) or os.path.getmtime(target) < os.path.getmtime(src):
        from grpc_tools import protoc

        os.makedirs(OUT, exist_ok=True)
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"--python_out={OUT}",
                f"--grpc_python_out={OUT}",
                src,
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with {rc}")
    if OUT not in sys.path:
        sys.path.insert(0, OUT)
    return importlib.import_module("runnel_pb2"), importlib.import_module("runnel_pb2_grpc")
