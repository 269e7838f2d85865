#!/usr/bin/env bash
# Install Debian's PostgreSQL server binaries for the tests that need a real server.
#
# The tests (tests/postgres.py) start their own throwaway server on 127.0.0.1 with initdb/pg_ctl;
# this script only installs the package and never starts the packaged cluster service.
# Idempotent: exits 0 at once when initdb and pg_ctl are already installed.
# Quiet: apt's output goes to a log that is printed only when the install fails.
set -euo pipefail

have_server() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null
}

if have_server; then
    echo "install-postgres: already installed ($(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' '))"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-postgres: not root and no password-less sudo; cannot install PostgreSQL" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null; then
    echo "install-postgres: apt-get not found (not a Debian-based system)" >&2
    exit 1
fi

LOG="$(mktemp -t install-postgres.XXXXXX.log)"
POLICY=/usr/sbin/policy-rc.d
cleanup() {
    if [ -n "${OWN_POLICY:-}" ]; then "${SUDO[@]}" rm -f "$POLICY"; fi
    rm -f "$LOG"
}
trap cleanup EXIT

# Keep the package's postinst from starting the "main" cluster: while installing, invoke-rc.d /
# deb-systemd-invoke consult policy-rc.d, and exit 101 means "do not start services".
# An existing policy-rc.d (Docker images ship one that already says 101) is left alone.
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    OWN_POLICY=1
fi

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-qq -o DPkg::Lock::Timeout=120 -o Dpkg::Use-Pty=0)
run() {
    if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive "$@" >>"$LOG" 2>&1; then
        echo "install-postgres: '$*' failed:" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
}

echo "install-postgres: installing postgresql with apt-get (quiet)"
run apt-get "${APT_OPTS[@]}" update
run apt-get "${APT_OPTS[@]}" install -y --no-install-recommends postgresql

if ! have_server; then
    echo "install-postgres: postgresql installed but initdb/pg_ctl not found under /usr/lib/postgresql/*/bin" >&2
    exit 1
fi
echo "install-postgres: installed ($(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' '))"
