#!/usr/bin/env bash
# Every node, first: Debian packages (image build tools, kernel headers for the agent's
# bcc, Python for the lab's helpers), bpffs, and the lab's settings in /etc/cn2mirror-lab.env.
# Idempotent: `vagrant provision` runs it again without harm.
set -euo pipefail

: "${NODE_NAME:?}" "${NODE_IP:?}" "${HOST_IP:?}" "${CONTROL_PLANE_IP:?}"
: "${CN2M_K3S_VERSION:?}" "${POD_CIDR:?}" "${SERVICE_CIDR:?}" "${AGENT_IMAGE:?}" "${ANALYZER_IMAGE:?}"

log() { printf '[common %s] %s\n' "$NODE_NAME" "$*"; }
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
  ca-certificates curl rsync   # the k3s installer; rsync for Vagrant's synced folder
  buildah runc                 # builds the images without a daemon (Debian 12: buildah 1.28)
  python3 python3-yaml         # vagrant/lib helpers and the project's own id compiler
  iproute2 iptables ethtool    # what the agent and k3s use on the node
  tcpdump                      # looking at the wire while debugging
)

updated=false
apt_update_once() {
  $updated || apt-get update -q
  updated=true
}

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_update_once
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The agent compiles its BPF programs with bcc against /lib/modules/$(uname -r)/build,
# which the DaemonSet mounts from the node. Prefer the running kernel's own headers; a box
# whose kernel is older than the archive's gets the current headers, linked in place (the
# same fallback as scripts/setup.sh; networking programs build against them).
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ]; then
  apt_update_once
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    log "installing linux-headers-$kver"
    apt-get install -y -q "linux-headers-$kver"
  else
    apt-get install -y -q linux-headers-amd64
    hdr=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' | sort -V | tail -n 1)
    log "no headers packaged for $kver any more: linking $hdr"
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    ln -sfn "${hdr%-amd64}-common" "/lib/modules/$kver/source"
  fi
fi

# bpffs, now and at every boot, for the agent's pinned maps.
if ! grep -qs '^bpffs /sys/fs/bpf ' /etc/fstab; then
  echo 'bpffs /sys/fs/bpf bpf defaults 0 0' >>/etc/fstab
fi
mountpoint -q /sys/fs/bpf || mount /sys/fs/bpf

# kubelet and swap do not mix.
swapoff -a
sed -i -E 's/^([^#].*[[:space:]]swap[[:space:]].*)$/# \1/' /etc/fstab

# buildah: unqualified image names (FROM python:3.11-slim) come from Docker Hub.
mkdir -p /etc/containers/registries.conf.d
cat >/etc/containers/registries.conf.d/50-cn2mirror-lab.conf <<'EOF'
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF

# The lab's settings, for the other scripts and for verify.sh (which reads them over ssh).
cat >/etc/cn2mirror-lab.env <<EOF
NODE_NAME=$NODE_NAME
NODE_IP=$NODE_IP
HOST_IP=$HOST_IP
CONTROL_PLANE_IP=$CONTROL_PLANE_IP
K3S_VERSION=$CN2M_K3S_VERSION
POD_CIDR=$POD_CIDR
SERVICE_CIDR=$SERVICE_CIDR
AGENT_IMAGE=$AGENT_IMAGE
ANALYZER_IMAGE=$ANALYZER_IMAGE
EOF

# The private network must be up with the address Vagrant gave it: k3s and flannel use it.
if ! ip -o -4 addr show | awk '{print $4}' | grep -qx "$NODE_IP/[0-9]*"; then
  log "no interface has $NODE_IP: the private network is not up" >&2
  exit 1
fi
log "ready"
