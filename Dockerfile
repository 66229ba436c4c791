# The cn2mirror node agent (manifests/deploy/daemonset.yaml runs it).
#
#   make image IMAGE=registry.example/cn2mirror:0.1.0     (docker or podman build)
#
# bcc comes from Debian (python3-bpfcc); the venv is made with --system-site-packages so
# that it imports it (reference/platform.md). Kernel headers are the node's: the
# DaemonSet mounts /lib/modules and /usr/src from the host.
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip \
        python3-bpfcc libbpfcc libbpf1 \
        iproute2 ethtool util-linux ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY cn2mirror ./cn2mirror
COPY agent ./agent
COPY cli ./cli
COPY bpf ./bpf
COPY manifests/crds ./manifests/crds
RUN python3 -m venv --system-site-packages /opt/cn2mirror \
    && /opt/cn2mirror/bin/pip install --no-cache-dir /src \
    && /opt/cn2mirror/bin/python -c "import bcc, cn2mirror.agent.kube" \
    && rm -rf /src

ENV PATH=/opt/cn2mirror/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /
ENTRYPOINT ["cn2mirror"]
CMD ["agent", "--kubernetes", "--metrics-address=:9464"]
