#!/bin/bash
# Builds Linux 6.12 with Rust for the emulated machine, into $1 (a cache directory keyed by the
# inputs: this script, smudge.config and the linux-source package version). Called by `cargo xtask kernel`.
set -euo pipefail
OUT="$1"; BINDGEN="$2"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT.tmp"; rm -rf "$OUT.tmp"/*
cd "$OUT.tmp"
echo "[kernel] unpacking /usr/src/linux-source-6.12.tar.xz"
tar xf /usr/src/linux-source-6.12.tar.xz
cd linux-source-6.12
MK=(LLVM=-19 RUSTC=/usr/bin/rustc HOSTRUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc BINDGEN="$BINDGEN")
export LIBCLANG_PATH=/usr/lib/llvm-19/lib
make "${MK[@]}" rustavailable
make "${MK[@]}" tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$HERE/smudge.config" >/dev/null
make "${MK[@]}" olddefconfig >/dev/null
for opt in RUST SMP MODULES SERIAL_8250_CONSOLE X86_MSR; do
  grep -q "^CONFIG_$opt=y" .config || { echo "[kernel] CONFIG_$opt did not stick"; exit 1; }
done
grep -q "^CONFIG_KVM_X86=m" .config || { echo "[kernel] CONFIG_KVM_X86 did not stick"; exit 1; }
for opt in HIBERNATION PM_DEBUG; do
  grep -q "^CONFIG_$opt=y" .config || { echo "[kernel] CONFIG_$opt did not stick"; exit 1; }
done
echo "[kernel] make -j$(nproc) bzImage modules"
make "${MK[@]}" -j"$(nproc)" bzImage modules >build.log 2>&1 || { tail -40 build.log; exit 1; }
cd "$OUT.tmp"
mv linux-source-6.12 linux
cd / && rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "[kernel] built: $OUT/linux/arch/x86/boot/bzImage"
