"""Regenerate the eddy.v1 stubs in ``service/serving/grpc/gen`` from ``service/serving/grpc/protos``.

Run ``python -m service.serving.grpc.generate`` after editing a ``.proto``; the output is committed.
protoc writes ``from eddy.v1 import inference_pb2``; the import is rewritten to
``service.serving.grpc.gen.eddy.v1`` so the stubs work without touching ``sys.path``.
"""

from __future__ import annotations

import re
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTOS = HERE / "protos"
GEN = HERE / "gen"


def generate() -> list[Path]:
    """Run protoc over every ``.proto`` and fix imports; return the files written."""
    GEN.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={GEN}", f"--pyi_out={GEN}",
            f"--grpc_python_out={GEN}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    written = sorted(GEN.rglob("*_pb2*.py*"))
    for path in written:
        text = re.sub(r"^from eddy\.v1 import", "from service.serving.grpc.gen.eddy.v1 import", path.read_text(),
                      flags=re.MULTILINE)
        path.write_text(text)
    for folder in {GEN, *(p.parent for p in written)}:
        while folder != GEN.parent:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(HERE.parents[2]))
