"""Generated gRPC stubs for proto/steerwatch/v1, built with grpcio-tools on first import.

Stubs are never committed or hand-edited: they are generated from the .proto files into
``service/_generated/`` (or ``$STEERWATCH_CACHE/proto`` when the tree is read-only) and regenerated
whenever a .proto file changes (a hash of their contents is kept beside them). The generated modules
import each other as ``steerwatch.v1.*``, so their root goes on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
NAMES = ("common", "chat", "policy", "vector", "alert", "model")


def _digest() -> str:
    h = hashlib.sha256()
    for name in NAMES:
        h.update((PROTO_ROOT / "steerwatch" / "v1" / f"{name}.proto").read_bytes())
    return h.hexdigest()


def _out_dir() -> Path:
    here = Path(__file__).resolve().parent / "_generated"
    if os.access(here.parent, os.W_OK):
        return here
    return Path(os.environ.get("STEERWATCH_CACHE", Path.home() / ".cache" / "steerwatch")) / "proto"


def _generate(out: Path, digest: str) -> None:
    from grpc_tools import protoc  # imported lazily: only needed when the stubs are stale

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=out.parent))
    files = [str(PROTO_ROOT / "steerwatch" / "v1" / f"{n}.proto") for n in NAMES]
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                      f"--grpc_python_out={tmp}", *files])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {PROTO_ROOT}")
    for pkg in (tmp / "steerwatch", tmp / "steerwatch" / "v1"):
        (pkg / "__init__.py").touch()
    (tmp / "DIGEST").write_text(digest)
    if out.exists():  # replace atomically enough: another process may have raced us to the same result
        _remove_tree(out)
    tmp.rename(out)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _ensure() -> Path:
    out = _out_dir()
    digest = _digest()
    stamp = out / "DIGEST"
    if not stamp.exists() or stamp.read_text() != digest:
        _generate(out, digest)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return out


_ensure()


def module(name: str) -> ModuleType:
    """``module("chat_pb2")`` or ``module("chat_pb2_grpc")``."""
    return importlib.import_module(f"steerwatch.v1.{name}")


common_pb2 = module("common_pb2")
chat_pb2 = module("chat_pb2")
chat_pb2_grpc = module("chat_pb2_grpc")
policy_pb2 = module("policy_pb2")
policy_pb2_grpc = module("policy_pb2_grpc")
vector_pb2 = module("vector_pb2")
vector_pb2_grpc = module("vector_pb2_grpc")
alert_pb2 = module("alert_pb2")
alert_pb2_grpc = module("alert_pb2_grpc")
model_pb2 = module("model_pb2")
model_pb2_grpc = module("model_pb2_grpc")
