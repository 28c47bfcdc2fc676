"""Real servers for the tests that need one, started from the machine's installed packages and stopped after.

PostgreSQL: Debian's `postgresql` package (`apt-get install postgresql`; `.ci/run` installs it). A private
cluster is made with `initdb` in a temporary folder and started on a free port of the loopback address, as
the `postgres` user when the tests run as root (the server refuses root). Where the package is missing,
the tests that need it are skipped with that reason; under CI (`CI=true`) they fail instead, since CI must
have started what its tests need.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable(why: str) -> None:
    """Skip the test, saying why; fail it under CI, which must provide what the tests need."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must install it: .ci/run)")
    pytest.skip(why)


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own, for as long as the context lasts: yields the SQLAlchemy URL of an
    empty database (`postgresql+psycopg://dlrun@127.0.0.1:<port>/dlrun`)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        unavailable("PostgreSQL's server is not installed (apt-get install postgresql)")
    bin_dir = Path(bins[-1]).parent
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="dlrun-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    port, data = free_port(), folder / "data"

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "dlrun", "--auth=trust", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60", "start",
            "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off")
        try:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dlrun", "dlrun")
            yield f"postgresql+psycopg://dlrun@127.0.0.1:{port}/dlrun"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
