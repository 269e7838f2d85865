"""A throwaway PostgreSQL server on 127.0.0.1 for the tests that need a real one.

The tests start the server themselves (CI machines run no services): ``initdb`` a fresh cluster in a
temporary folder, ``pg_ctl start`` it on a free loopback port with trust authentication, and stop it
at the end. When the server binaries are missing they are installed once with
``.ci/install-postgres.sh`` (only as root, bounded by a timeout). When PostgreSQL still cannot run,
:func:`running_postgres` and the ``postgres_server`` fixture skip the test with the reason.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system user
(created by Debian's package) via ``runuser``; its folder is then owned by that user.

Usage in a test module or conftest::

    from tests.postgres import postgres_server  # noqa: F401

    def test_something(postgres_server):
        postgres_server.create_database("mydb")
        engine = sqlalchemy.create_engine(postgres_server.url("mydb"))
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / ".ci" / "install-postgres.sh"
INSTALL_TIMEOUT_S = 300
START_TIMEOUT_S = 60
SERVER_USER = "postgres"  # the OS user the server runs as (when root) and the database superuser
HOST = "127.0.0.1"
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux, with the terminating NUL).
_MAX_SOCKET_PATH = 100

_install_result: str | None = None  # "" once installed, a reason once failed; None before trying


@dataclass(frozen=True)
class PostgresServer:
    """A running server: trust authentication on ``host:port`` for the superuser ``user``."""

    host: str
    port: int
    user: str
    data_dir: Path = field(repr=False)
    socket_dir: Path = field(repr=False)
    bin_dir: Path = field(repr=False)
    run_as: tuple[str, ...] = field(default=(), repr=False)  # the command prefix that runs as the server's OS user
    cleanup_dir: Path | None = field(default=None, repr=False)  # a folder of ours to remove after stopping

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        """``CREATE DATABASE name`` (fails if it exists)."""
        cmd = [str(self.bin_dir / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, "-w", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_clean_env(), check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {proc.stderr.strip() or proc.stdout.strip()}")

    def stop(self) -> None:
        """Stop the server (fast shutdown, else immediate, else SIGKILL) and remove its files."""
        _stop_server(self.run_as, self.bin_dir, self.data_dir)
        _remove(self.cleanup_dir if self.cleanup_dir is not None else self.data_dir)


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb`` and ``pg_ctl``, else one on PATH."""

    def version(path: str) -> tuple[int, ...]:
        parts = Path(path).parent.name.split(".")
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (-1,)

    for bin_dir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if (Path(bin_dir) / "initdb").is_file() and (Path(bin_dir) / "pg_ctl").is_file():
            return Path(bin_dir)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def install_postgres() -> str:
    """Run ``.ci/install-postgres.sh`` once per process; "" on success, else the reason it failed."""
    global _install_result
    if _install_result is None:
        _install_result = _install()
    return _install_result


def _install() -> str:
    if os.geteuid() != 0:
        return f"not root, so not installing it (run {INSTALL_SCRIPT.relative_to(REPO)} as root)"
    if not INSTALL_SCRIPT.is_file():
        return f"{INSTALL_SCRIPT} is missing"
    try:
        proc = _run(["bash", str(INSTALL_SCRIPT)], timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{INSTALL_SCRIPT.name} did not finish within {INSTALL_TIMEOUT_S} s"
    except OSError as exc:
        return f"{INSTALL_SCRIPT.name} could not run: {exc}"
    if proc.returncode != 0:
        return f"{INSTALL_SCRIPT.name} failed (exit {proc.returncode}): {_last_line(proc.stdout)}"
    return ""


def start_postgres(base_dir: Path) -> PostgresServer | str:
    """Start a fresh server with its files under ``base_dir``; the server, or a one-line reason it cannot run."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        failure = install_postgres()
        bin_dir = find_bin_dir()
        if bin_dir is None:
            return f"PostgreSQL server binaries (initdb, pg_ctl) not found; {failure or 'install found none'}"

    run_as: tuple[str, ...] = ()
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} user to run the server as"
        if shutil.which("runuser"):
            run_as = ("runuser", "-u", SERVER_USER, "--")
        else:
            run_as = ("setpriv", "--reuid", SERVER_USER, "--regid", SERVER_USER, "--init-groups", "--")
            if not shutil.which("setpriv"):
                return f"running as root and neither runuser nor setpriv is there to run the server as {SERVER_USER!r}"

    root, cleanup_dir = _server_root(Path(base_dir), run_as)
    if isinstance(root, str):
        return root
    data_dir, socket_dir, log = root / "data", root / "sock", root / "server.log"

    initdb = [
        *run_as,
        str(bin_dir / "initdb"),
        "-D",
        str(data_dir),
        "-U",
        SERVER_USER,
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]
    try:
        proc = _run(initdb, timeout=120, cwd=root)
    except (subprocess.TimeoutExpired, OSError) as exc:
        _remove(cleanup_dir)
        return f"initdb did not run: {exc}"
    if proc.returncode != 0:
        _remove(cleanup_dir)
        return f"initdb failed (exit {proc.returncode}): {_last_line(proc.stdout)}"

    settings = {
        "listen_addresses": f"'{HOST}'",
        "unix_socket_directories": f"'{socket_dir}'",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "32MB",
        "max_connections": "100",
    }
    try:
        with open(data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# tests/postgres.py: a throwaway server on loopback\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    except OSError as exc:
        _remove(cleanup_dir)
        return f"could not configure the server: {exc}"

    reason = "pg_ctl start was not tried"
    for _attempt in range(3):  # a port picked free can be taken before the server binds it: retry with another
        port = _free_port()
        server = PostgresServer(HOST, port, SERVER_USER, data_dir, socket_dir, bin_dir, run_as, cleanup_dir)
        pg_ctl = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log)]
        try:
            proc = _run(
                [*pg_ctl, "-w", "-t", str(START_TIMEOUT_S), "-o", f"-p {port}", "start"], START_TIMEOUT_S + 30, root
            )
        except (subprocess.TimeoutExpired, OSError) as exc:
            proc, reason = None, f"pg_ctl start did not finish: {exc}"
        if proc is not None and proc.returncode == 0 and _accepts_connections(port):
            return server
        log_text = log.read_text(errors="replace") if log.exists() else ""
        if proc is not None and proc.returncode == 0:
            reason = f"the server started but does not accept TCP connections on {HOST}:{port}"
        elif proc is not None:
            reason = f"pg_ctl start failed (exit {proc.returncode}): {_last_line(log_text or proc.stdout)}"
        _stop_server(run_as, bin_dir, data_dir)
        if "could not bind" not in log_text and "already in use" not in log_text:
            break
        log.unlink(missing_ok=True)
    _remove(cleanup_dir)
    return reason


@contextlib.contextmanager
def running_postgres(base_dir: Path) -> Iterator[PostgresServer]:
    """A running server for the ``with`` block, stopped at its end; ``pytest.skip`` when PostgreSQL cannot run."""
    t0 = time.monotonic()
    server = start_postgres(base_dir)
    if isinstance(server, str):
        pytest.skip(f"PostgreSQL unavailable: {server}")
    print(f"\n[postgres] server on {server.host}:{server.port} started in {time.monotonic() - t0:.1f} s")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (per xdist worker); tests create their own databases."""
    with running_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


# ----------------------------------------------------------------------------------------------- helpers


def _clean_env() -> dict[str, str]:
    """The environment without PG* variables (PGHOST, PGDATA, ...) that could point the tools elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (stdout and stderr together) in its own process group, killed as a whole on timeout."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or "/",
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a grandchild outside the group may hold the pipe
            proc.communicate(timeout=10)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _server_root(base_dir: Path, run_as: tuple[str, ...]) -> tuple[Path | str, Path | None]:
    """A fresh folder for the cluster, owned by the server's user, plus the folder to remove at the end.

    ``base_dir/pg`` when the server's user can reach it and the socket path is short enough; otherwise
    (e.g. root's 0700 pytest temp folders) a private folder in the system temp dir.
    """
    candidate = base_dir / "pg"
    if len(str(candidate / "sock" / ".s.PGSQL.65535")) <= _MAX_SOCKET_PATH:
        try:
            _prepare(candidate, run_as)
            if not run_as or _run([*run_as, "test", "-w", str(candidate)], timeout=30).returncode == 0:
                return candidate, None
        except (OSError, subprocess.SubprocessError):
            pass
        _remove(candidate)
    try:
        root = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))
        _prepare(root, run_as)
    except (OSError, KeyError) as exc:
        return f"could not prepare a folder for the server: {exc}", None
    return root, root


def _prepare(root: Path, run_as: tuple[str, ...]) -> None:
    (root / "sock").mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if run_as:
        user = pwd.getpwnam(SERVER_USER)
        for path in (root, root / "sock"):
            os.chown(path, user.pw_uid, user.pw_gid)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _accepts_connections(port: int) -> bool:
    """Whether the server answers on the loopback TCP port (pg_ctl -w may only have checked the socket)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=2):
            return True
        time.sleep(0.1)
    return False


def _kill_postmaster(data_dir: Path) -> None:
    """SIGKILL the postmaster (and so its children) if it is still there after pg_ctl stop."""
    pid_file = data_dir / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        # only the process whose command line says postgres: the pid may have been reused
        if "postgres" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)


def _stop_server(run_as: tuple[str, ...], bin_dir: Path, data_dir: Path) -> None:
    pg_ctl = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-w", "-t", "30"]
    for mode in ("fast", "immediate"):
        if not (data_dir / "postmaster.pid").exists():
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            if _run([*pg_ctl, "-m", mode, "stop"], timeout=45, cwd=data_dir.parent).returncode == 0:
                return
    _kill_postmaster(data_dir)


def _remove(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


__all__ = [
    "PostgresServer",
    "find_bin_dir",
    "install_postgres",
    "postgres_server",
    "running_postgres",
    "start_postgres",
]
