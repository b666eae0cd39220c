#!/usr/bin/env bash
# fetch-kernel.sh - cache a Debian cloud kernel for the QEMU test guests and `ssi-pager vm` examples.
#
#   tests/guest/fetch-kernel.sh        prints the path of the cached vmlinuz on stdout
#
# Downloads the newest linux-image-6.1.0-*-cloud-amd64-unsigned that apt knows (apt-get download,
# no install), extracts /boot/vmlinuz-* with dpkg-deb and keeps it in the cache directory
# ($SSI_PAGER_GUEST_CACHE, default /var/cache/ssi-pager/guest). A cached kernel is reused.
# Falls back to a cloud kernel .deb already in apt's archive cache when the download fails.
set -euo pipefail
cache=${SSI_PAGER_GUEST_CACHE:-/var/cache/ssi-pager/guest}
if [ -s "$cache/vmlinuz" ]; then
  echo "$cache/vmlinuz"
  exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

# newest ABI first: linux-image-6.1.0-NN-cloud-amd64-unsigned, sorted on NN
pkgs=$(apt-cache pkgnames linux-image-6.1.0- 2>/dev/null \
         | grep -E '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' | sort -t- -k4,4nr || true)
deb=
for pkg in $pkgs; do
  if (cd "$work" && apt-get download -qq "$pkg" >/dev/null 2>&1); then
    deb=$(ls "$work"/*.deb | head -n1)
    break
  fi
done
if [ -z "$deb" ]; then
  deb=$(ls -t /var/cache/apt/archives/linux-image-6.1.0-*-cloud-amd64*_amd64.deb 2>/dev/null \
          | grep -v -- '-dbg_' | head -n1 || true)
fi
if [ -z "$deb" ]; then
  echo "fetch-kernel: no linux-image-6.1.0-*-cloud-amd64-unsigned package could be downloaded;" \
       "run 'apt-get update' (network needed once), then retry" >&2
  exit 1
fi
dpkg-deb -x "$deb" "$work/root"
vmlinuz=$(ls "$work"/root/boot/vmlinuz-* | head -n1)
cp "$vmlinuz" "$cache/vmlinuz.tmp"
basename "$deb" > "$cache/kernel-package"
mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"
echo "fetch-kernel: cached $(basename "$vmlinuz") from $(basename "$deb") in $cache" >&2
echo "$cache/vmlinuz"
