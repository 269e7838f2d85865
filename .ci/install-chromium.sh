#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver for the browser tests of the MLflow UI (tests/test_mlflow_ui.py).
#
# The tests drive /usr/bin/chromium through /usr/bin/chromedriver with Selenium, offline: nothing is
# downloaded by Selenium Manager or any browser installer, only these two Debian packages.
# Idempotent: exits 0 at once when both binaries are already installed.
# Quiet: apt's output goes to a log that is printed only when the install fails.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

have_browser() {
    [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]
}

versions() {
    echo "$("$CHROMIUM" --version 2>/dev/null | head -n1 || echo chromium), $("$CHROMEDRIVER" --version 2>/dev/null | head -n1 | cut -d' ' -f1-2 || echo chromedriver)"
}

if have_browser; then
    echo "install-chromium: already installed ($(versions))"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-chromium: not root and no password-less sudo; cannot install Chromium" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null; then
    echo "install-chromium: apt-get not found (not a Debian-based system)" >&2
    exit 1
fi

LOG="$(mktemp -t install-chromium.XXXXXX.log)"
trap 'rm -f "$LOG"' EXIT

APT_OPTS=(-qq -o DPkg::Lock::Timeout=120 -o Dpkg::Use-Pty=0)
run() {
    if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive "$@" >>"$LOG" 2>&1; then
        echo "install-chromium: '$*' failed:" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
}

echo "install-chromium: installing chromium and chromium-driver with apt-get (quiet)"
START=$SECONDS
run apt-get "${APT_OPTS[@]}" update
run apt-get "${APT_OPTS[@]}" install -y --no-install-recommends chromium chromium-driver

if ! have_browser; then
    echo "install-chromium: packages installed but $CHROMIUM or $CHROMEDRIVER is missing" >&2
    exit 1
fi
echo "install-chromium: installed in $((SECONDS - START)) s ($(versions))"
