#!/usr/bin/env bash
# Builds the real gateway the NAT lab tests run: miniupnpd 2.3.9 from Debian trixie's source
# package. Bookworm's 2.3.1 refuses to map ports when its WAN address is private, which a lab
# behind no real Internet always has. The system's packages stay on bookworm: the trixie source
# list lives in a private apt directory used only for `apt-get source`.
#
# Two builds, each cached under a name that carries the lab's build version ("lab2"): bump it
# whenever this script changes what it builds, so cached binaries are rebuilt.
#   miniupnpd-2.3.9-lab2        UPnP IGD, NAT-PMP and PCP (what `configure` gives; the config
#                               file says which of them answer)
#   miniupnpd-2.3.9-lab2-nopcp  the same with PCP compiled out: it answers a PCP request with
#                               NAT-PMP's "unsupported version", as a NAT-PMP-only gateway (an
#                               Apple base station, an older ISP box) does. miniupnpd has no
#                               run-time switch for this: `enable_pcp_pmp` turns both on or off.
#   miniupnpd-2.3.9-lab2-ipv6   the first with IPv6 compiled in (`--ipv6`): PCP also opens
#                               IPv6 firewall pinholes. Kept apart so the IPv4 lab runs the
#                               plain build.
# One lab change to the source: PCP's `min_lifetime` may go below RFC 6887's recommended 120 s,
# so a test can see a PCP lease renewed within seconds. Nothing else is touched.
#
# Prints the path of the first binary. Cached: a second run only prints the path.
set -euo pipefail
cache="${ISTHMUS_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/isthmus-lab}"
bin="$cache/miniupnpd-2.3.9-lab2"
nopcp="$cache/miniupnpd-2.3.9-lab2-nopcp"
ipv6="$cache/miniupnpd-2.3.9-lab2-ipv6"
if [ -x "$bin" ] && [ -x "$nopcp" ] && [ -x "$ipv6" ]; then
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
sed -i 's/if (min_lifetime < 120 *)/if (min_lifetime < 1)/' "$src/miniupnpd.c"
if ! grep -q 'if (min_lifetime < 1)' "$src/miniupnpd.c"; then
  echo "could not lift PCP's 120 s minimum lifetime in miniupnpd.c (source changed?)" >&2
  exit 1
fi

if [ ! -x "$bin" ]; then
  (cd "$src" && ./configure --firewall=nftables >&2 && make -j2 >&2)
  install -m 755 "$src/miniupnpd" "$bin"
fi
if [ ! -x "$ipv6" ]; then
  (cd "$src" && make clean >/dev/null 2>&1 || true)
  (cd "$src" && ./configure --firewall=nftables --ipv6 >&2 && make -j2 >&2)
  install -m 755 "$src/miniupnpd" "$ipv6"
fi
if [ ! -x "$nopcp" ]; then
  (cd "$src" && make clean >/dev/null 2>&1 || true)
  (cd "$src" && ./configure --firewall=nftables >&2)
  # configure always defines ENABLE_PCP; take it out of the generated header before building.
  sed -i 's|^#define ENABLE_PCP$|/* PCP compiled out for the NAT-PMP-only lab gateway */|' "$src/config.h"
  if grep -q '^#define ENABLE_PCP$' "$src/config.h"; then
    echo "could not compile PCP out of miniupnpd (config.h changed?)" >&2
    exit 1
  fi
  (cd "$src" && make -j2 >&2)
  version=$("$src/miniupnpd" --version 2>&1 || true)
  if grep -q 'PCP' <<<"$version"; then
    echo "the NAT-PMP-only miniupnpd still reports PCP: $version" >&2
    exit 1
  fi
  install -m 755 "$src/miniupnpd" "$nopcp"
fi
echo "$bin"
