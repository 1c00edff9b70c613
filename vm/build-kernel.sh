#!/usr/bin/env bash
# Builds (once) the guest kernel for the iommufd run of the VM test and prints the bzImage's path on the
# last line of stdout. No Debian kernel enables CONFIG_IOMMUFD, so this one comes from Debian's
# linux-source-6.12 (bookworm-security / bookworm-backports): `make tinyconfig` + vm/kernel/iommufd.config.
#
# Cached under ${MMB_VM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/memmap-broker}/kernel/, keyed by the package
# version and a hash of the fragment and this recipe:  bzImage-<version>-<hash>. A cache hit needs
# neither apt nor the source. About 8 minutes of `make -j2` on 2 cores when the cache is empty.
#
# Needs: apt-get (to download linux-source-6.12 once), make gcc libc6-dev bc bison flex libelf-dev libssl-dev
# xz-utils. Options:  --print-key  (print the cache key and exit)   --check-only (exit 3 if not cached)
# Environment: MMB_VM_CACHE (the cache directory), MMB_VM_KEEP_TREE=1 (keep the source and build trees).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${MMB_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/memmap-broker}"
pkg=linux-source-6.12
fragment="$here/kernel/iommufd.config"
# Bump when the recipe below changes in a way that changes the image.
recipe=1
log() { printf '[build-kernel] %s\n' "$*" >&2; }

hash="$( (cat "$fragment"; echo "recipe=$recipe") | sha256sum | cut -c1-16)"
mkdir -p "$cache/kernel" "$cache/src"

# The version to build: apt's candidate if apt knows the package, else the newest .deb already cached.
version="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2 }')"
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
  deb="$(ls -1 "$cache/src/${pkg}_"*_all.deb 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$deb" ]; then
    version="$(basename "$deb" | sed -e "s/^${pkg}_//" -e 's/_all\.deb$//' -e 's/%3a/:/g')"
  else
    # Nothing to build from; any cached image of this configuration will do.
    img="$(ls -1 "$cache/kernel/bzImage-"*"-$hash" 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$img" ]; then
      if [ "${1:-}" = "--print-key" ]; then basename "$img" | sed 's/^bzImage-//'; else echo "$img"; fi
      exit 0
    fi
    log "apt has no $pkg and none is cached. It is in bookworm-security and bookworm-backports: enable one with"
    log "  the archive URI your existing bookworm source uses (.ci/run does this), then apt-get update."
    exit 2
  fi
fi
safe_version="${version//[^A-Za-z0-9.+~-]/_}"
key="${safe_version}-${hash}"
image="$cache/kernel/bzImage-$key"
if [ "${1:-}" = "--print-key" ]; then echo "$key"; exit 0; fi
if [ -s "$image" ]; then log "cached: $image"; echo "$image"; exit 0; fi
if [ "${1:-}" = "--check-only" ]; then log "not cached: $image"; exit 3; fi

start=$SECONDS
# 1. The source package (153 MB), downloaded once.
deb="$(ls -1 "$cache/src/${pkg}_${version//:/%3a}_all.deb" 2>/dev/null || true)"
if [ -z "$deb" ]; then
  log "downloading $pkg $version"
  tmp="$(mktemp -d)"
  chmod 755 "$tmp" # apt's _apt user downloads into it
  (cd "$tmp" && apt-get download "$pkg=$version" >&2)
  mv "$tmp"/*.deb "$cache/src/"
  rmdir "$tmp"
  deb="$(ls -1 "$cache/src/${pkg}_${version//:/%3a}_all.deb")"
fi
for tool in make gcc bc bison flex xz; do
  command -v "$tool" >/dev/null || { log "missing $tool: apt-get install --no-install-recommends make gcc libc6-dev bc bison flex libelf-dev libssl-dev xz-utils"; exit 2; }
done

# 2. The source tree (1.6 GB), unpacked once per version.
src="$cache/src/$pkg-$safe_version"
if [ ! -f "$src/.unpacked" ]; then
  log "unpacking $deb"
  rm -rf "$src" && mkdir -p "$src"
  dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards "./usr/src/$pkg.tar.xz" | tar -xJ -C "$src" --strip-components=1
  touch "$src/.unpacked"
fi

# 3. Configure: tinyconfig + the fragment; every =y of the fragment must have survived olddefconfig.
out="$cache/kernel/build-$key"
mkdir -p "$out"
# (Appending to .config makes olddefconfig warn about every overridden symbol: kept in config.log.)
make -s -C "$src" O="$out" ARCH=x86_64 tinyconfig > "$out/config.log" 2>&1 || { cat "$out/config.log" >&2; exit 1; }
cat "$fragment" >> "$out/.config"
make -s -C "$src" O="$out" ARCH=x86_64 olddefconfig >> "$out/config.log" 2>&1 || { cat "$out/config.log" >&2; exit 1; }
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=y) grep -qx "$line" "$out/.config" || { log "not set after olddefconfig: $line"; missing=1; } ;; esac
done < "$fragment"
[ "$missing" = 0 ] || { log "the fragment does not apply to $pkg $version"; exit 1; }

# 4. Build.
log "building bzImage ($(nproc) jobs; about 8 minutes on 2 cores)"
make -s -C "$src" O="$out" ARCH=x86_64 -j"$(nproc)" bzImage >&2
cp "$out/arch/x86/boot/bzImage" "$image.tmp"
cp "$out/.config" "$image.config"
mv "$image.tmp" "$image"
log "built $image in $((SECONDS - start)) s"
# The trees are only needed to build this one image (another configuration gets another build tree):
# keep the 153 MB .deb, drop the 1.8 GB of source and objects unless MMB_VM_KEEP_TREE=1.
if [ "${MMB_VM_KEEP_TREE:-0}" != 1 ]; then rm -rf "$out" "$src"; fi
echo "$image"
