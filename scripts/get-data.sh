#!/usr/bin/env bash
# Install the two corpora refformer trains on (Debian/Ubuntu, run as root):
#   trans-de-en  German-English dictionary with example sentences -> /usr/share/trans/de-en
#   python3-doc  the Python documentation, reST sources under /usr/share/doc/python3*/html/_sources
# Idempotent: does nothing when both packages are already installed.
set -euo pipefail

packages=(trans-de-en python3-doc)

if [ "$#" -ne 0 ]; then
    echo "get-data: takes no arguments (usage: $0)" >&2
    exit 2
fi
if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
    echo "get-data: needs Debian or Ubuntu (dpkg-query and apt-get); install ${packages[*]} by other means" >&2
    exit 1
fi

missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "get-data: ${packages[*]} already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "get-data: installing ${missing[*]} needs root; run: sudo $0" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"
echo "get-data: installed ${missing[*]}"
