#!/bin/bash
# Prints the cache key of the kernel build: a hash of everything that decides its output.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
{ cat "$HERE/build-kernel.sh" "$HERE/smudge.config"
  dpkg-query -W -f '${Version}\n' linux-source-6.12
  /usr/bin/rustc -V; clang-19 --version | head -1; } | sha256sum | cut -c1-16
