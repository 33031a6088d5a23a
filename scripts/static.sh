#!/usr/bin/env bash
# Build a fully static x86_64 Linux dflockd and put it at target/static/dflockd
# (the path the Dockerfile and tests/static/empty_root.sh use).
#
#   scripts/static.sh [extra cargo build args, e.g. --features ...]
#
# Target choice (override with STATIC_TARGET=<triple>):
#   1. x86_64-unknown-linux-musl if its rust-std is installed (or `rustup
#      target add` can fetch it now) AND a musl C compiler exists: ring (under
#      rustls) compiles C and assembly, so cc-rs needs x86_64-linux-musl-gcc
#      or musl-gcc (Debian/Ubuntu: apt-get install musl-tools). musl is static
#      by default, the binary is ~0.6 MB instead of ~1.5 MB, and its resolver
#      needs no NSS plugins (it reads /etc/hosts, which Docker provides; in
#      an empty root a --host name waits ~5 s for DNS at 127.0.0.1:53, then
#      fails with "not an address").
#   2. otherwise x86_64-unknown-linux-gnu with `-C target-feature=+crt-static`
#      against the machine's static glibc (libc.a), plus a getrandom backend
#      override (below). The linker warns that static getaddrinfo needs the
#      glibc shared libraries at run time; in practice glibc >= 2.34 reads
#      /etc/hosts without them, and in an empty root (no /etc/hosts) a name
#      such as localhost fails at once with "not an address". Numeric --host
#      values (127.0.0.1, 0.0.0.0, ::) never reach getaddrinfo on either
#      target: std parses them first.
#
# The build uses its own target dir (target/static-build) so it does not
# invalidate the normal debug/release cache. The release profile in Cargo.toml
# (LTO, one codegen unit, panic=abort, strip) applies unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
TARGET_DIR=${STATIC_TARGET_DIR:-target/static-build}
OUT_DIR=target/static
OUT=$OUT_DIR/dflockd
MUSL=x86_64-unknown-linux-musl
GNU=x86_64-unknown-linux-gnu

if [[ "$(uname -s)/$(uname -m)" != Linux/x86_64 ]]; then
    echo "static.sh: this script builds for x86_64 Linux on x86_64 Linux only (this is $(uname -s)/$(uname -m))" >&2
    exit 1
fi

have_target() {
    [[ -d "$(rustc --print sysroot)/lib/rustlib/$1/lib" ]]
}

musl_cc() {
    if [[ -n "${CC_x86_64_unknown_linux_musl:-}" ]]; then
        echo "$CC_x86_64_unknown_linux_musl"
    elif command -v x86_64-linux-musl-gcc >/dev/null 2>&1; then
        echo x86_64-linux-musl-gcc
    elif command -v musl-gcc >/dev/null 2>&1; then
        echo musl-gcc
    else
        return 1
    fi
}

target=${STATIC_TARGET:-}
if [[ -z "$target" ]]; then
    if ! musl_cc >/dev/null; then
        echo "static.sh: no musl C compiler (x86_64-linux-musl-gcc, musl-gcc; apt-get install musl-tools); using $GNU + crt-static (static glibc)" >&2
        target=$GNU
    elif have_target "$MUSL"; then
        target=$MUSL
    elif command -v rustup >/dev/null 2>&1 &&
        timeout 120 rustup target add "$MUSL" >/dev/null 2>&1 && have_target "$MUSL"; then
        target=$MUSL
    else
        echo "static.sh: rust-std for $MUSL not installed and rustup could not add it; using $GNU + crt-static (static glibc)" >&2
        target=$GNU
    fi
fi
if [[ "$target" == "$MUSL" ]]; then
    cc=$(musl_cc) || { echo "static.sh: $MUSL needs a musl C compiler (apt-get install musl-tools)" >&2; exit 1; }
    export CC_x86_64_unknown_linux_musl=$cc
fi

# With --target, RUSTFLAGS reach only the target crates, not build scripts.
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static"
if [[ "$target" == "$GNU" ]]; then
    # The getrandom crate finds glibc's getrandom() with dlsym, which returns
    # NULL in a static binary, so it falls back to opening /dev/urandom: that
    # fails in an empty root (no /dev) and the first lock grant panics. Make
    # it call getrandom() directly (glibc >= 2.25, Linux >= 3.17). musl
    # links getrandom() statically and needs nothing.
    RUSTFLAGS+=' --cfg getrandom_backend="linux_getrandom"'
fi
if [[ "$target" == "$GNU" ]] && [[ ! -e /usr/lib/x86_64-linux-gnu/libc.a && ! -e /usr/lib64/libc.a ]]; then
    echo "static.sh: static glibc (libc.a) not found; install libc6-dev (Debian/Ubuntu) or glibc-static (Fedora)" >&2
    exit 1
fi

echo "== building dflockd for $target (static) in $TARGET_DIR"
"$CARGO" build --release --bin dflockd --target "$target" --target-dir "$TARGET_DIR" "$@"

built=$TARGET_DIR/$target/release/dflockd
mkdir -p "$OUT_DIR"
cp -f "$built" "$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"

echo "== checking $OUT"
fail=0
if command -v file >/dev/null 2>&1; then
    f=$(file -b "$OUT")
    echo "file: $f"
    if [[ "$f" != *"statically linked"* && "$f" != *"static-pie linked"* ]]; then
        echo "static.sh: FAIL: file(1) does not call it static" >&2
        fail=1
    fi
    if [[ "$f" != *"x86-64"* ]]; then
        echo "static.sh: FAIL: not an x86-64 ELF" >&2
        fail=1
    fi
else
    echo "file: (not installed, skipped)"
fi
if command -v ldd >/dev/null 2>&1; then
    # ldd prints "statically linked" (static-pie) or "not a dynamic executable"
    # (classic static) and may exit non-zero for either; only a library list fails.
    l=$(ldd "$OUT" 2>&1 || true)
    echo "ldd: $(echo "$l" | tr -s '\t\n' '  ')"
    if [[ "$l" != *"statically linked"* && "$l" != *"not a dynamic executable"* ]]; then
        echo "static.sh: FAIL: ldd lists shared libraries" >&2
        fail=1
    fi
fi
if command -v readelf >/dev/null 2>&1; then
    if readelf -lW "$OUT" | grep -q 'INTERP'; then
        echo "static.sh: FAIL: has a program interpreter (PT_INTERP)" >&2
        fail=1
    fi
    if readelf -dW "$OUT" 2>/dev/null | grep -q '(NEEDED)'; then
        echo "static.sh: FAIL: has DT_NEEDED shared-library entries" >&2
        fail=1
    fi
    [[ $fail == 0 ]] && echo "readelf: no PT_INTERP, no DT_NEEDED"
fi
if ! env -i "$OUT" --version >/dev/null; then
    echo "static.sh: FAIL: $OUT --version did not run" >&2
    fail=1
fi
[[ $fail == 0 ]] || exit 1

size=$(stat -c %s "$OUT")
echo "== $OUT: $target, static, $size bytes ($(( (size + 1023) / 1024 )) KiB), $("$OUT" --version | head -n1)"
