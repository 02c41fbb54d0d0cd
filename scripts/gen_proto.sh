#!/usr/bin/env bash
# The one way generated protobuf code is made: proto/ -> gateway/pb/ (checked in).
# `-I gateway/pb=proto` maps the proto tree under the Python package so the generated imports
# (`from gateway.pb.gateway.v1 import ...`) are right without rewriting them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# protoc comes from grpcio-tools in its own venv (scripts/proto-tools.txt); the mypy plugins from the project's.
PROTOC_PY=${PROTOC_PYTHON:-$PY}
export PATH="$(cd "$(dirname "$(command -v "$PY")")" && pwd):$PATH"  # protoc-gen-mypy lives beside the interpreter
rm -rf gateway/pb/gateway gateway/pb/grpc gateway/pb/inference
mapfile -t protos < <(find proto -name '*.proto' | sort)
"$PROTOC_PY" -m grpc_tools.protoc -Igateway/pb=proto \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  "${protos[@]}" 2> >(grep -v "^Writing mypy to" >&2)
# Packages for the generated modules.
find gateway/pb -type d -exec sh -c 'f="$1/__init__.py"; [ -f "$f" ] || : > "$f"' _ {} \;
