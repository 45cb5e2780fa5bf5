#!/usr/bin/env bash
# Put CPython's executor test module (test_concurrent_futures.py) for one Python version into
# a cache dir and print its path. It comes from Debian's libpythonX.Y-testsuite package, which
# is downloaded (not installed: nothing outside the cache dir changes) and unpacked there.
#
# usage: fetch_suite.sh [X.Y] [CACHE_DIR]     (defaults: 3.11, <repo>/.cache/cpython-tests)
#
# Exit status: 0 with the file's path on stdout; 3 when the file can't be had here (no apt,
# no network, no such package), with the reason on stderr; anything else is a bug.
set -euo pipefail

version=${1:-3.11}
here=$(cd "$(dirname "$0")" && pwd)
cache=${2:-${here}/../../.cache/cpython-tests}
package=libpython${version}-testsuite
member=./usr/lib/python${version}/test/test_concurrent_futures.py

unavailable() {
    echo "fetch_suite: $*" >&2
    exit 3
}

mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
target=${cache}/${version}/test_concurrent_futures.py
if [[ -s $target ]]; then
    echo "$target"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb tar; do
    command -v "$tool" >/dev/null || unavailable "$tool not found: not a Debian-like system"
done

# Only refresh the package lists when they don't know the package (a fresh machine).
if ! apt-cache show "$package" >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
        unavailable "apt doesn't know $package and 'apt-get update' needs root"
    fi
    echo "fetch_suite: apt doesn't know $package yet: apt-get update" >&2
    apt-get update -qq >&2 || unavailable "apt-get update failed (offline?)"
    apt-cache show "$package" >/dev/null 2>&1 ||
        unavailable "apt still doesn't know $package after apt-get update (offline, or not in this system's apt sources)"
fi

work=$(mktemp -d "${cache}/download.XXXXXX")
trap 'rm -rf "$work"' EXIT
# apt-get download warns that it can't drop privileges to _apt in a dir _apt can't write, and
# downloads as the current user: harmless.
(cd "$work" && apt-get download -qq "$package" >&2 2>&1) ||
    unavailable "apt-get download $package failed (offline?)"
deb=$(echo "$work"/*.deb)
[[ -f $deb ]] || unavailable "apt-get download $package left no .deb"
echo "fetch_suite: unpacking $member from $(basename "$deb")" >&2
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" "$member" ||
    unavailable "$(basename "$deb") has no $member"
mkdir -p "$(dirname "$target")"
# Which package version the file came from, for the report.
basename "$deb" .deb >"${target%.py}.source"
mv "$work/$member" "$target.tmp.$$"
mv "$target.tmp.$$" "$target"
echo "$target"
