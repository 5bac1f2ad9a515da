"""Build hook: generate the gRPC stubs from ``protos/`` into ``serving/_proto/`` (the package
``prefixserve._proto``) whenever the package is built or installed, editable installs included.

The generated files are never committed or edited: change the .proto, then reinstall
(``make protos`` or ``pip install -e . --no-deps``). Everything else lives in pyproject.toml.
"""

from __future__ import annotations

import importlib.resources
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "protos" / "prefixserve" / "v1"
OUT_DIR = ROOT / "serving" / "_proto"
# protoc names generated modules after the proto's import path: mapping the proto directory to
# this virtual path makes the stubs import each other as ``prefixserve._proto.*``.
VIRTUAL_PATH = "prefixserve/_proto"


def generate_stubs() -> None:
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise RuntimeError(
            "grpcio-tools is needed to generate the gRPC stubs (it is a build requirement in "
            "pyproject.toml; with --no-build-isolation install it first: pip install grpcio-tools)"
        ) from e
    protos = sorted(str(p) for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files in {PROTO_DIR}")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{VIRTUAL_PATH}={PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
        OUT_DIR.mkdir(exist_ok=True)
        for old in OUT_DIR.glob("*_pb2*"):
            old.unlink()
        for path in (Path(tmp) / VIRTUAL_PATH).iterdir():
            shutil.copyfile(path, OUT_DIR / path.name)
    (OUT_DIR / "__init__.py").write_text(
        '"""gRPC stubs generated from protos/ by setup.py at build time; do not edit."""\n'
    )


class BuildPyWithStubs(build_py):
    """``build_py`` that first generates the stubs into the source tree."""

    def run(self) -> None:
        generate_stubs()
        super().run()


# setuptools checks that every listed package directory exists before any command runs.
OUT_DIR.mkdir(exist_ok=True)
setup(cmdclass={"build_py": BuildPyWithStubs})
