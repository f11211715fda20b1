#!/usr/bin/env bash
# Installs Pebble 2.10+ (and pebble-challtestsrv) into .tools/pebble unless a current
# pebble is already on PATH. bookworm's pebble 2.4.0 has no ARI and no profiles, so we
# take the static binaries from Debian sid without touching the system's apt setup.
# The archive URI is read from this machine's own apt sources, never hard-coded.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest="$repo/.tools/pebble"
if [ -x "$dest/usr/bin/pebble" ]; then
  echo "pebble: $dest/usr/bin/pebble"; exit 0
fi
uri=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
  uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
fi
if [ -z "$uri" ]; then
  echo "install-pebble: no Debian archive URI found in this machine's apt sources" >&2; exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri sid main" > "$work/sources.list"
apt_opts=(-o "Dir::State::Lists=$work/lists" -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null" -o "Dir::Cache::Archives=$work/archives"
  -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" -qq update
(cd "$work" && apt-get "${apt_opts[@]}" -qq download pebble)
mkdir -p "$dest"
dpkg -x "$work"/pebble_*.deb "$dest"
"$dest/usr/bin/pebble" -version 2>/dev/null || true
echo "pebble: $dest/usr/bin/pebble"
