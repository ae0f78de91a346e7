#!/usr/bin/env bash
# Builds the real UPnP gateway the NAT lab tests run: miniupnpd 2.3.9 from Debian trixie's
# source package. Bookworm's 2.3.1 refuses to map ports when its WAN address is private, which a
# lab behind no real Internet always has. The system's packages stay on bookworm: the trixie
# source list lives in a private apt directory used only for `apt-get source`.
#
# Prints the path of the binary. Cached: a second run only prints the path.
set -euo pipefail
cache="${ISTHMUS_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/isthmus-lab}"
bin="$cache/miniupnpd-2.3.9"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"

need=()
for p in libmnl-dev libnftnl-dev libssl-dev uuid-dev dpkg-dev nftables iproute2 make gcc; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

apt_dir=$(mktemp -d)
work=$(mktemp -d)
trap 'rm -rf "$apt_dir" "$work"' EXIT
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
  >"$apt_dir/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache::Archives=$apt_dir/archives"
)
apt-get "${apt_opts[@]}" update -qq >&2
# Ask for 2.3.9 first; if the archive has moved on, take trixie's current version instead. The
# first attempt's "E: Can not find version" is an expected fallback, not an error: keep it quiet.
(cd "$work" && apt-get "${apt_opts[@]}" source -qq "miniupnpd=2.3.9*" >/dev/null 2>&1) || \
  (cd "$work" && apt-get "${apt_opts[@]}" source -qq miniupnpd >&2)
src=$(find "$work" -maxdepth 1 -type d -name 'miniupnp*' | head -1)
# The Debian source package keeps the daemon in a subdirectory in some versions.
[ -f "$src/configure" ] || src=$(dirname "$(find "$work" -name configure -path '*miniupnpd*' | head -1)")
(cd "$src" && ./configure --firewall=nftables >&2 && make -j2 >&2)
install -m 755 "$src/miniupnpd" "$bin"
echo "$bin"
