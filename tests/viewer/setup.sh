#!/usr/bin/env bash
# Unpack OHIF 3's built viewer (the dist/ shipped in the @ohif/app npm package) under
# .cache/ohif/<version>/ for the viewer integration test. Idempotent: does nothing when the
# version is already unpacked. Needs npm and a reachable npm registry the first time.
set -euo pipefail

VERSION="${OHIF_VERSION:-3.12.10}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="$ROOT/.cache/ohif"
DEST="$CACHE/$VERSION"

if [[ -f "$DEST/dist/index.html" ]]; then
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "tests/viewer/setup.sh: npm not found; cannot fetch @ohif/app@$VERSION" >&2
    exit 1
fi

mkdir -p "$CACHE"
staging="$(mktemp -d "$CACHE/.staging.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
echo "fetching @ohif/app@$VERSION"
(cd "$staging" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
tar -xzf "$staging/ohif-app-$VERSION.tgz" -C "$staging"
if [[ ! -f "$staging/package/dist/index.html" ]]; then
    echo "tests/viewer/setup.sh: @ohif/app@$VERSION has no dist/index.html" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$staging/package" "$DEST"
echo "OHIF $VERSION unpacked in ${DEST#"$ROOT"/}"
