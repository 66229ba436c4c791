#!/usr/bin/env bash
# The control plane: k3s server, pinned to K3S_VERSION, flannel (VXLAN) over the private
# network. The node also runs pods (k3s does not taint its server): the second analyzer.
set -euo pipefail

: "${NODE_NAME:?}" "${NODE_IP:?}" "${CN2M_K3S_VERSION:?}" "${CN2M_K3S_TOKEN:?}"
: "${POD_CIDR:?}" "${SERVICE_CIDR:?}"

log() { printf '[k3s-server %s] %s\n' "$NODE_NAME" "$*"; }
die() { printf '[k3s-server %s] error: %s\n' "$NODE_NAME" "$*" >&2; exit 1; }

[ "$CN2M_K3S_TOKEN" != "not-made-yet" ] || die "no join token: run vagrant up or provision from the vagrant/ folder"

# The interface that holds the private-network address: flannel must tunnel over it, not
# over the NAT interface every VM has first (10.0.2.15 on each VirtualBox VM).
iface=$(ip -o -4 addr show | awk -v ip="$NODE_IP" 'index($4, ip "/") == 1 {print $2; exit}')
[ -n "$iface" ] || die "no interface has $NODE_IP"

mkdir -p /etc/rancher/k3s
cat >/etc/rancher/k3s/config.yaml <<EOF
node-name: $NODE_NAME
node-ip: $NODE_IP
advertise-address: $NODE_IP
tls-san:
  - $NODE_IP
flannel-iface: $iface
cluster-cidr: $POD_CIDR
service-cidr: $SERVICE_CIDR
token: $CN2M_K3S_TOKEN
write-kubeconfig-mode: "0644"
# Not needed by the lab; fewer pods on small VMs.
disable:
  - traefik
  - servicelb
EOF
chmod 600 /etc/rancher/k3s/config.yaml

if command -v k3s >/dev/null && k3s --version | grep -qF "k3s version $CN2M_K3S_VERSION "; then
  log "k3s $CN2M_K3S_VERSION is installed"
  systemctl restart k3s
else
  log "installing k3s $CN2M_K3S_VERSION"
  curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION="$CN2M_K3S_VERSION" INSTALL_K3S_EXEC=server sh -s -
fi

log "waiting for the API server"
for _ in $(seq 1 90); do
  if k3s kubectl get --raw /readyz >/dev/null 2>&1; then
    break
  fi
  sleep 2
done
k3s kubectl get --raw /readyz >/dev/null || die "the API server did not become ready"
k3s kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=180s

# kubectl for the vagrant user too (the kubeconfig is world-readable in this lab).
install -d -o vagrant -g vagrant /home/vagrant/.kube
install -o vagrant -g vagrant -m 600 /etc/rancher/k3s/k3s.yaml /home/vagrant/.kube/config
log "ready: $(k3s --version | head -n 1)"
