#!/usr/bin/env bash
# clang-format (Google base, .clang-format) over the C++/CUDA sources.
#   scripts/format.sh          reformat in place
#   scripts/format.sh --check  fail when a file is not formatted (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files --cached --others --exclude-standard '*.cc' '*.h' '*.cu')
if [ "${1:-}" = "--check" ]; then
  clang-format --dry-run -Werror "${files[@]}"
  echo "format: ${#files[@]} files formatted" >&2
else
  clang-format -i "${files[@]}"
fi
