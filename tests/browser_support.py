"""Helpers of the end-to-end browser test: a JupyterLab server and a headless Chromium that are always
stopped, with every process they started accounted for.

* :func:`find_chromium` / :func:`require_browser_tools`: Debian's ``chromium`` and Playwright for Python
  (installed by ``.ci/install_browser.sh``); missing tools skip the test, or fail it when ``CI=true``.
* :class:`JupyterLab`: ``jupyter lab`` from this interpreter's environment on a free localhost port with a
  random token, no browser and throw-away Jupyter config / settings / workspace folders.
* :class:`HeadlessChromium`: Playwright driving the system Chromium (never a downloaded browser).

Both are context managers. On exit they stop gracefully, then terminate and kill what is left (the
process group, and every descendant seen while running, e.g. kernels, which Jupyter starts in their own
session). ``leftovers()`` lists tracked processes still alive afterwards (the test asserts it is empty).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

INSTALL_HINT = "run `bash .ci/install_browser.sh` (Debian chromium + Playwright for Python)"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str):
    """Skip outside CI; in CI (``CI=true``) a missing prerequisite is a failure, never a silent skip."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the browser test must run in CI)", pytrace=False)
    pytest.skip(reason)


def find_chromium() -> str | None:
    """``$CALIBKIT_CHROMIUM`` when set (and only it), else ``/usr/bin/chromium``, else ``chromium`` on PATH."""
    explicit = os.environ.get("CALIBKIT_CHROMIUM")
    for cand in [explicit] if explicit else ["/usr/bin/chromium", shutil.which("chromium")]:
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def require_browser_tools() -> str:
    """Path of Chromium, after checking Playwright imports (skip / fail naming the install script)."""
    chromium = find_chromium()
    if chromium is None:
        skip_or_fail(f"Chromium not found (/usr/bin/chromium or $CALIBKIT_CHROMIUM): {INSTALL_HINT}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail(f"Playwright for Python is not installed: {INSTALL_HINT}")
    return chromium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(procs: dict[int, psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_all(procs: dict[int, psutil.Process], grace_s: float = 5.0) -> list[str]:
    """Terminate, wait ``grace_s``, kill; returns descriptions of the processes that had to be signalled."""
    alive = _alive(procs)
    signalled = []
    for p in alive:
        try:
            signalled.append(f"{p.pid} {p.name()}")
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(still, timeout=grace_s)
    return signalled


class JupyterLab:
    """``jupyter lab`` serving ``root_dir`` on ``127.0.0.1:<free port>`` with a random token.

    Args:
        root_dir: folder the server shows (the test's copy of ``notebooks/``).
        work_dir: folder for the log (``jupyter.log``) and the throw-away Jupyter folders.
        env: environment of the server and so of its kernels (``CALIBKIT_*`` parameters).
        start_timeout_s: seconds to wait for ``/api/status``.
    """

    def __init__(self, root_dir: Path, work_dir: Path, env: dict[str, str], start_timeout_s: float = 180.0):
        self.root_dir, self.work_dir = Path(root_dir), Path(work_dir)
        self.env, self.start_timeout_s = dict(env), start_timeout_s
        self.token = secrets.token_hex(16)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.work_dir / "jupyter.log"
        self.tracked: dict[int, psutil.Process] = {}
        self.forced: list[str] = []

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> "JupyterLab":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _command(self, port: int) -> list[str]:
        exe = Path(sys.executable).with_name("jupyter-lab")
        base = [str(exe)] if exe.exists() else [sys.executable, "-m", "jupyterlab"]
        return base + ["--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
                       f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
                       "--ServerApp.open_browser=False"] + (["--allow-root"] if os.geteuid() == 0 else [])

    def _isolated_env(self) -> dict[str, str]:
        env = dict(self.env)
        jdir = self.work_dir / "jupyter"
        folders = {"JUPYTER_CONFIG_DIR": "config", "JUPYTER_DATA_DIR": "data", "JUPYTER_RUNTIME_DIR": "runtime",
                   "JUPYTERLAB_SETTINGS_DIR": "lab-settings", "JUPYTERLAB_WORKSPACES_DIR": "lab-workspaces",
                   "IPYTHONDIR": "ipython"}
        for var, sub in folders.items():
            (jdir / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(jdir / sub)
        # no "fetch Jupyter news?" toast over the notebook (and no request to the internet)
        ntf = jdir / "lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        ntf.parent.mkdir(parents=True, exist_ok=True)
        ntf.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = self._isolated_env()
        for attempt in range(3):  # the free port may be taken between probing and binding
            self.port = free_port()
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(self._command(self.port), cwd=self.root_dir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            self._track()
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"jupyter lab did not start; log tail:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                self.api("status")
                return True
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"jupyter lab answered no /api/status within {self.start_timeout_s:.0f} s; log tail:\n"
                           f"{self.log_tail()}")

    def _track(self) -> None:
        """Remember the server and all its descendants (kernels run in their own session, not its group)."""
        if self.proc is None:
            return
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root] + root.children(recursive=True):
                self.tracked.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> None:
        """Shut down kernels and server through the API, then terminate / kill whatever is left."""
        if self.proc is None:
            return
        self._track()
        if self.proc.poll() is None:
            try:
                self.api("shutdown", method="POST", timeout=10)
            except Exception:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self.forced += _kill_all(self.tracked)
        self.proc = None

    def leftovers(self) -> list[str]:
        return [f"{p.pid} {p.name()}" for p in _alive(self.tracked)]

    # -- access -------------------------------------------------------------------------------------
    def url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}{sep}token={self.token}"

    def api(self, path: str, method: str = "GET", timeout: float = 5.0):
        """JSON answer of ``/api/<path>`` (``None`` for an empty body)."""
        req = urllib.request.Request(self.url(f"api/{path}"), method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body.strip() else None

    def kernel_state(self, notebook_name: str) -> str | None:
        """Execution state (``idle`` / ``busy`` / ``starting`` ...) of the kernel of ``notebook_name``."""
        self._track()
        for s in self.api("sessions"):
            if Path(s.get("path", "")).name == notebook_name and s.get("kernel"):
                return s["kernel"].get("execution_state")
        return None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class HeadlessChromium:
    """Playwright for Python driving the system Chromium headless; ``page`` is ready inside the ``with``."""

    def __init__(self, executable: str, viewport: tuple[int, int] = (1400, 1000)):
        self.executable, self.viewport = executable, viewport
        self.tracked: dict[int, psutil.Process] = {}
        self.forced: list[str] = []
        self.console_errors: list[str] = []
        self._pw = self.browser = self.context = self.page = None

    def __enter__(self) -> "HeadlessChromium":
        from playwright.sync_api import sync_playwright

        self._before = before = {p.pid for p in psutil.Process().children(recursive=False)}
        try:
            self._pw = sync_playwright().start()
            self.browser = self._pw.chromium.launch(executable_path=self.executable, headless=True, args=CHROMIUM_ARGS)
            self.context = self.browser.new_context(viewport={"width": self.viewport[0], "height": self.viewport[1]})
            self.page = self.context.new_page()
            self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
            self.page.on("pageerror", lambda e: self.console_errors.append(f"pageerror: {e}"))
        except BaseException:
            self._track(before)
            self.__exit__(None, None, None)
            raise
        self._track(before)
        return self

    def _track(self, exclude: set[int]) -> None:
        """Track the Playwright driver (a new child of this process) and all its descendants (Chromium)."""
        for root in psutil.Process().children(recursive=False):
            if root.pid in exclude:
                continue
            try:
                for p in [root] + root.children(recursive=True):
                    self.tracked.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def __exit__(self, *exc) -> None:
        self._track(getattr(self, "_before", set()))
        for close in (lambda: self.context and self.context.close(), lambda: self.browser and self.browser.close(),
                      lambda: self._pw and self._pw.stop()):
            try:
                close()
            except Exception:
                pass
        self.forced += _kill_all(self.tracked)

    def leftovers(self) -> list[str]:
        return [f"{p.pid} {p.name()}" for p in _alive(self.tracked)]
