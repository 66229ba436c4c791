#!/usr/bin/env bash
# Every node: build the agent image from the repository's Dockerfile and the analyzer
# image (Debian + tshark) with buildah, here on the node, and hand both to k3s'
# containerd. Nothing is pushed or pulled from a registry: the pods use
# imagePullPolicy: Never.
#
# Before k3s is installed the archives only land in /var/lib/rancher/k3s/agent/images/,
# which k3s imports when it starts; when k3s already runs (`vagrant provision --provision-with
# images` after `vagrant rsync`) they are imported at once with `k3s ctr images import`.
set -euo pipefail

: "${NODE_NAME:?}" "${AGENT_IMAGE:?}" "${ANALYZER_IMAGE:?}"
REPO=/vagrant
IMAGES_DIR=/var/lib/rancher/k3s/agent/images

log() { printf '[images %s] %s\n' "$NODE_NAME" "$*"; }
die() { printf '[images %s] error: %s\n' "$NODE_NAME" "$*" >&2; exit 1; }

[ -f "$REPO/Dockerfile" ] || die "no $REPO/Dockerfile: the agent image is built from the repository's Dockerfile (is the repo synced? vagrant rsync)"
[ -f "$REPO/vagrant/images/analyzer/Containerfile" ] || die "no analyzer Containerfile under $REPO/vagrant/images"

mkdir -p "$IMAGES_DIR"

# build TAG CONTAINERFILE CONTEXT ARCHIVE
build() {
  local tag=$1 file=$2 context=$3 archive=$4
  log "building $tag from ${file#"$REPO"/}"
  # --layers keeps intermediate layers, so a rebuild after a small change is quick.
  # --network host: RUN steps (apt-get, pip) use the node's network, no container network
  # stack to set up.
  buildah build --layers --network host --format docker -t "localhost/$tag" -f "$file" "$context"
  # Kubernetes asks containerd for docker.io/library/<name>:<tag> when a pod says <name>:<tag>.
  rm -f "$archive.tmp"
  buildah push "localhost/$tag" "docker-archive:$archive.tmp:docker.io/library/$tag"
  mv "$archive.tmp" "$archive"
  if systemctl is-active --quiet k3s || systemctl is-active --quiet k3s-agent; then
    log "importing $tag into k3s' containerd"
    k3s ctr --namespace k8s.io images import "$archive"
  fi
}

build "$AGENT_IMAGE" "$REPO/Dockerfile" "$REPO" "$IMAGES_DIR/cn2mirror-agent.tar"
build "$ANALYZER_IMAGE" "$REPO/vagrant/images/analyzer/Containerfile" \
  "$REPO/vagrant/images/analyzer" "$IMAGES_DIR/cn2mirror-analyzer.tar"
log "ready"
