#!/usr/bin/env bash
# Builds static runneld and runnel binaries and the `runnel:local` image FROM scratch.
# Pulls nothing. Usage: deploy/docker/build.sh [--tag runnel:local] [--skip-cargo]
# Prints the binaries' directory on its last line.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
tag=runnel:local
skip_cargo=0
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --skip-cargo) skip_cargo=1; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

target=x86_64-unknown-linux-gnu
bin="$root/target/$target/release"
if [ "$skip_cargo" = 0 ]; then
    # Only the GNU target is installed: link glibc statically. `--target` keeps build scripts
    # and proc macros dynamic; only the shipped binaries are static.
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --manifest-path "$root/Cargo.toml" --release --locked \
        --target "$target" -p runnel-server -p runnel-cli
fi
for b in runneld runnel; do
    out=$(ldd "$bin/$b" 2>&1 || true)
    case "$out" in
        *"statically linked"* | *"not a dynamic executable"*) ;;
        *) echo "$bin/$b is not static:" >&2; echo "$out" >&2; exit 1 ;;
    esac
done

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/etc" "$ctx/data"
for b in runneld runnel; do strip -o "$ctx/bin/$b" "$bin/$b"; done
cp "$root/deploy/docker/runneld.toml" "$ctx/etc/runneld.toml"
printf 'root:x:0:0:root:/:/sbin/nologin\nrunnel:x:10001:10001:runnel:/var/lib/runnel:/sbin/nologin\n' >"$ctx/etc/passwd"
printf 'root:x:0:\nrunnel:x:10001:\n' >"$ctx/etc/group"
# The classic builder: BuildKit may want to pull its frontend; FROM scratch needs nothing.
DOCKER_BUILDKIT=0 docker build --quiet -t "$tag" -f "$root/deploy/docker/Dockerfile" "$ctx" >/dev/null
echo "built image $tag from $bin" >&2
echo "$bin"
