#!/usr/bin/env bash
# Regenerates the Python stubs in client/rstitch/v1 from proto/. The one way to make them.
#   scripts/gen_protos.sh            write the stubs
#   scripts/gen_protos.sh --check    fail if the checked-in stubs differ from what proto/ gives
set -euo pipefail
cd "$(dirname "$0")/.."
out=client
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
python -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/rstitch/v1/*.proto
if [[ "${1:-}" == "--check" ]]; then
  for f in "$out"/rstitch/v1/*; do
    if ! cmp -s "$f" "client/rstitch/v1/$(basename "$f")"; then
      echo "generated stubs drift from proto/: $(basename "$f") differs; run scripts/gen_protos.sh" >&2
      exit 1
    fi
  done
  echo "generated stubs match proto/"
fi
