#!/usr/bin/env bash
# Download what a GPU machine without internet needs to run `make gpu-check`: the wheels listed in
# scripts/gpu_wheels.txt (CPython 3.12, manylinux x86-64, --no-deps) and a wheel of this package.
#
#   scripts/gpu_wheels.sh OUT_DIR                    # the required set
#   scripts/gpu_wheels.sh --with-optional OUT_DIR    # plus the lines marked `# optional` (wandb's stack)
#   scripts/gpu_wheels.sh --list [--with-optional]   # print the requirements; download nothing
#
# Then, on the GPU machine: make gpu-check WHEELS=OUT_DIR
# PYTHON (default python3) runs pip; PYTHON_VERSION (default 3.12) is the target interpreter's version;
# GLIBC_MINOR (default 35: glibc 2.35, Ubuntu 22.04 and newer) is the newest manylinux_2_N tag accepted.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
LIST="$HERE/gpu_wheels.txt"
PYTHON="${PYTHON:-python3}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
GLIBC_MINOR="${GLIBC_MINOR:-35}"

usage() {
    echo "usage: $0 [--with-optional] OUT_DIR | $0 --list [--with-optional]" >&2
    exit 2
}

with_optional=0
list_only=0
out=""
for arg in "$@"; do
    case "$arg" in
        --with-optional) with_optional=1 ;;
        --list) list_only=1 ;;
        -h | --help) usage ;;
        -*) echo "error: unknown option $arg" >&2; usage ;;
        *) [[ -z "$out" ]] || usage; out="$arg" ;;
    esac
done

# One requirement per line; '#' starts a comment; a line whose comment says `optional` needs --with-optional.
requirements() {
    local line spec
    while IFS= read -r line || [[ -n "$line" ]]; do
        spec="${line%%#*}"
        spec="${spec//[[:space:]]/}"
        [[ -n "$spec" ]] || continue
        if [[ "$line" == *"#"*optional* && $with_optional -eq 0 ]]; then
            continue
        fi
        echo "$spec"
    done <"$LIST"
}

if [[ $list_only -eq 1 ]]; then
    [[ -z "$out" ]] || usage
    requirements
    exit 0
fi
[[ -n "$out" ]] || usage

mapfile -t reqs < <(requirements)
# pip matches an explicit --platform exactly (no older glibc implied) and packages publish under many
# manylinux_2_N tags (zstd: 2_4 and 2_14): list them all, newest first, up to the target's glibc.
platforms=()
for ((n = GLIBC_MINOR; n >= 4; n--)); do
    platforms+=(--platform "manylinux_2_${n}_x86_64")
done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
mkdir -p "$out"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYTHON_VERSION" "${platforms[@]}" --dest "$out" "${reqs[@]}"
# This package itself, from the working tree (pure Python: one wheel for every platform), built from a copy so
# setuptools leaves no build/ folder in the checkout.
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/llmfoundry_lite" "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel --no-deps --wheel-dir "$out" "$src"

n=$(find "$out" -maxdepth 1 -name '*.whl' | wc -l)
echo "$n wheels, $(du -sh "$out" | cut -f1) in $out; on the GPU machine: make gpu-check WHEELS=$out"
