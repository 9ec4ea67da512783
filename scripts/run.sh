#!/usr/bin/env bash
# Run a command with Debian's OpenBLAS preloaded when it is installed, so that the MLX CPU wheel's
# matmuls use it instead of the reference BLAS. Elsewhere (macOS, no OpenBLAS) the command runs as is.
set -euo pipefail
if [[ "$(uname -s)" == Linux && -z "${MLX_SPARSE_NO_OPENBLAS:-}" ]]; then
  for lib in /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3; do
    if [[ -e "$lib" ]]; then
      export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
      break
    fi
  done
fi
exec "$@"
