#!/usr/bin/env bash
# Install Debian's OpenBLAS when running as root on Debian or Ubuntu and it is missing.
# Anywhere else, print how to get it and carry on: the project still works, only slower.
set -uo pipefail
[[ "$(uname -s)" == Linux ]] || exit 0
if compgen -G "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3" >/dev/null; then
  exit 0
fi
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "Installing libopenblas0-pthread for fast MLX CPU matmuls"
  (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
    || echo "warning: apt-get install libopenblas0-pthread failed; MLX will use the slow reference BLAS"
else
  echo "note: OpenBLAS not found; 'sudo apt-get install libopenblas0-pthread' makes MLX CPU matmuls about 60x faster"
fi
exit 0
