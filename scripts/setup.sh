#!/usr/bin/env bash
# Installs everything cn2mirror needs on a Debian 12 machine, idempotently:
# Debian packages, kernel headers for bcc, the bpffs mount and a venv with the project.
# Safe to run again: each step checks first and does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-bpfcc libbpfcc libbpf1 bpftool   # bcc to compile and load, libbpf for raw map access
  python3-venv python3-pip                 # the venv that sees Debian's bcc module
  iproute2 ethtool iputils-ping            # links, qdiscs, offloads, namespaces
  tshark tcpdump iperf3 netsniff-ng        # independent decoder, traffic, trafgen
  nftables iptables                        # the kernel's own copiers, for the benchmarks
  shellcheck vagrant vagrant-libvirt       # checks of the VM lab's Vagrantfile and scripts
  sockperf                                 # request/response latency benchmark
  python3-matplotlib                       # benchmark plots
  prometheus                               # promtool: checks the alerting rules
)

log() { printf 'setup: %s\n' "$*"; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# kubectl renders the kustomizations in the tests; Debian's kubernetes-client provides it
# where no other kubectl is installed.
if ! command -v kubectl >/dev/null 2>&1; then
  log "installing kubernetes-client (kubectl)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kubernetes-client
fi

# bcc compiles against /lib/modules/$(uname -r)/build. Prefer the running kernel's own
# headers; a kernel without a package (custom VM kernels) gets Debian's current headers,
# which serve networking programs (platform.md).
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ]; then
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    log "installing linux-headers-$kver"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$kver"
  else
    dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed" ||
      { apt-get update -q; DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-headers-amd64; }
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
    common=${hdr%-amd64}-common
    log "no headers packaged for $kver: linking $hdr"
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    ln -sfn "$common" "/lib/modules/$kver/source"
  fi
fi

# bpffs for pinned maps and programs.
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# The venv is built from Debian's python3 so that it can import bcc (python3-bpfcc).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  log "creating .venv"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.cn2mirror-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing cn2mirror into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# `cn2mirror` on PATH: a link to this checkout's venv, unless one already points at a
# working cn2mirror (another checkout's is left alone).
link=/usr/local/bin/cn2mirror
if [ ! -e "$link" ]; then  # absent, or a link whose checkout is gone
  ln -sfn "$PWD/.venv/bin/cn2mirror" "$link"
  log "linked $link -> $PWD/.venv/bin/cn2mirror"
fi
log "ready"
