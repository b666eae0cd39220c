#!/usr/bin/env bash
# setup-host.sh - install what ssi-pager, its tests and its demo need on Debian 12 / Ubuntu.
# Idempotent; run as root (or through sudo). Non-interactive: safe for CI.
#   deploy/setup-host.sh            system packages + `pip install -e .[test]` of this checkout
# Environment: SSI_PAGER_SKIP_APT=1 skips apt (packages already there).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive
PY=${PYTHON:-python3}

if [ "${SSI_PAGER_SKIP_APT:-0}" != 1 ]; then
  apt-get update -qq
  # gcc/libc6-dev: cffi extensions, preload shim, test helpers; zlib1g-dev: the node's C lane
  # checks the zlib crc32s of stores written before crc32c; libssl-dev: TLS 1.3 of the C lanes
  # (transport/tlsc);
  # qemu + busybox: test guests;
  # prometheus: promtool and the scrape test; systemd: systemd-analyze verify of the units;
  # iproute2: network namespaces; libibverbs-dev/librdmacm-dev: headers to compile the RDMA
  # data path (transport/rdma_c, -Wall -Wextra) and rdma-core/ibverbs-providers to run it
  # (it falls back to TCP where the kernel has no RDMA, as on CI); strace: the test that sees
  # memnode --fsync sync each store; etcd-server (3.4): cluster membership, ownership and
  # fencing of several memory nodes (`--etcd URL`), and the cluster tests' own etcd;
  # etcd-client: etcdctl, which the cluster guide (deploy/README.md) checks etcd with.
  apt-get install -y -qq --no-install-recommends \
    gcc libc6-dev zlib1g-dev libssl-dev make cpio kmod iproute2 procps strace \
    qemu-system-x86 busybox-static \
    prometheus systemd etcd-server etcd-client \
    libibverbs-dev librdmacm-dev rdma-core ibverbs-providers >/dev/null
fi

# guest kernel for the QEMU tests and `ssi-pager vm` examples, cached across runs
"$here/tests/guest/fetch-kernel.sh" || echo "setup-host: guest kernel not fetched; QEMU tests will skip" >&2

cd "$here"
"$PY" -m pip install -q -e '.[test]'
echo "setup-host: ready (ssi-pager $("$PY" -c 'import pager; print(pager.__version__)'))" >&2
