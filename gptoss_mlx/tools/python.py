"""The ``python`` built-in tool: the model's code in a separate, limited process.

One worker process per tool (per chat session) keeps its variables between calls, like a notebook
kernel (:mod:`.python_worker`); with ``scope="reply"`` (a server: one tool per request, see
:meth:`Python.fresh`) the description says that the session lasts until the model answers or calls
a function. Every run is bounded:

* **time**: ``timeout`` seconds of wall-clock time per call; past it the worker is killed (its
  children too) and the next call starts a fresh one, so the state is lost, and the model is told;
* **memory**: ``memory_limit`` bytes. On Linux the worker's address space is capped
  (``RLIMIT_AS``): an allocation past it raises ``MemoryError`` in the code. macOS does not
  enforce that limit, so there the parent polls the worker's resident memory and kills it past
  the limit (processes the code starts itself are not counted);
* **output**: stdout and stderr, merged, cut to ``max_output_chars`` (head and tail kept);
* **files**: the working directory, ``HOME`` and ``TMPDIR`` are a scratch directory made for the
  tool and removed by :meth:`Python.close`;
* **environment**: the worker gets a fixed, minimal one (``PATH``, ``HOME``, ``TMPDIR``,
  ``LANG``, plus what ``env=`` adds): no variable of the parent (API keys, tokens) reaches it.

Isolation (``sandbox=``), the strongest available unless named:

* ``"bwrap"`` (Linux, bubblewrap installed): a read-only view of the file system with only the
  scratch directory writable, no network (its own empty network namespace), its own process
  namespace;
* ``"unshare"`` (Linux, util-linux, user namespaces allowed): no network; writes are *not*
  restricted beyond the user's own permissions;
* ``"sandbox-exec"`` (macOS): no network, writes only in the scratch directory (and
  ``/dev/null``);
* ``"none"``: the limits above only: the code can use the network and write wherever the user
  can.

Reading files is not restricted by any of them: the code can read what the user can read.
The tool's description tells the model exactly what applies (``describe()``).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import GptOssError
from ..harmony import ToolNamespace
from .base import BuiltinTool, ToolCall, ToolError

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python_worker.py")
SANDBOXES = ("auto", "bwrap", "unshare", "sandbox-exec", "none")
# How long a session lasts, as the description tells the model: the whole conversation (a chat
# session's tool), or one reply (a server's tool, made for each request).
SCOPES = ("conversation", "reply")
# Where the kernel enforces RLIMIT_AS; elsewhere (macOS) a watchdog polls resident memory.
RLIMIT_AS_ENFORCED = sys.platform.startswith("linux")
_POLL = 0.05  # seconds between checks of a running call (done? memory?)


@dataclass(frozen=True)
class Isolation:
    """What a sandbox denies the code."""

    name: str
    network: bool  # network access denied
    writes: bool  # writes outside the scratch directory denied


ISOLATION = {
    "bwrap": Isolation("bwrap", network=True, writes=True),
    "unshare": Isolation("unshare", network=True, writes=False),
    "sandbox-exec": Isolation("sandbox-exec", network=True, writes=True),
    "none": Isolation("none", network=False, writes=False),
}


@functools.cache
def sandbox_available(name: str) -> bool:
    """Whether sandbox ``name`` works here (its program exists and a trial run succeeds)."""
    if name == "none":
        return True
    probe = {
        "bwrap": ["bwrap", "--ro-bind", "/", "/", "--unshare-net", "--die-with-parent", "true"],
        "unshare": ["unshare", "--user", "--map-root-user", "--net", "true"],
        "sandbox-exec": ["sandbox-exec", "-p", "(version 1)(allow default)", "true"],
    }[name]
    if shutil.which(probe[0]) is None:
        return False
    try:
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _sandbox_command(name: str, scratch: str) -> list[str]:
    """The command prefix that runs a program inside sandbox ``name``."""
    if name == "bwrap":
        return [
            "bwrap",
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--bind", scratch, scratch,
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--new-session",
            "--chdir", scratch,
        ]  # fmt: skip
    if name == "unshare":
        return ["unshare", "--user", "--map-root-user", "--net"]
    if name == "sandbox-exec":
        profile = (
            "(version 1)(allow default)(deny network*)(deny file-write*)"
            f'(allow file-write* (subpath "{os.path.realpath(scratch)}") (literal "/dev/null"))'
        )
        return ["sandbox-exec", "-p", profile]
    return []


def _resident_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (0 when it cannot be read)."""
    try:
        if sys.platform.startswith("linux"):
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
        return int(out.stdout.strip() or 0) * 1024
    except (OSError, ValueError):
        return 0


def _shorten(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, its head and tail kept."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit // 2], text[len(text) - limit // 2 :]
    return f"{head}\n[... {len(text) - len(head) - len(tail)} characters cut ...]\n{tail}"


class _Worker:
    """A running worker process, its request pipe and its collected output."""

    def __init__(self, command: list[str], env: dict, scratch: str, memory: int) -> None:
        read_fd, self.request_fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                [*command, sys.executable, "-I", WORKER, str(read_fd), str(memory)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=scratch,
                env=env,
                pass_fds=(read_fd,),
                start_new_session=True,  # a process group to kill, away from the terminal's ^C
            )
        finally:
            os.close(read_fd)
        self.output = bytearray()
        self.cut = 0  # bytes dropped from the middle of the output
        self.limit = 0
        self.eof = False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stream = self.process.stdout
        while chunk := stream.read1(65536):
            with self.changed:
                self.output += chunk
                excess = len(self.output) - 2 * self.limit
                if self.limit and excess > 65536:  # keep head and tail, bounded
                    del self.output[self.limit : self.limit + excess]
                    self.cut += excess
                self.changed.notify_all()
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    def start_call(self, code: str, limit: int) -> bytes:
        nonce = secrets.token_hex(16)
        with self.changed:
            self.output, self.cut, self.limit = bytearray(), 0, limit
        os.write(self.request_fd, (json.dumps({"code": code, "nonce": nonce}) + "\n").encode())
        return f"\n{nonce}\n".encode()

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.kill()
        self.process.wait()
        try:
            os.close(self.request_fd)
        except OSError:
            pass


class Python(BuiltinTool):
    """harmony's ``python`` tool: a stateful Python session in a limited, separate process.

    ``timeout`` seconds per call, ``memory_limit`` bytes, ``max_output_chars`` of output,
    ``sandbox`` one of ``"auto"`` (the strongest that works here), ``"bwrap"``, ``"unshare"``,
    ``"sandbox-exec"``, ``"none"``; ``env`` extra environment variables for the code
    (nothing of the parent's environment is passed otherwise). See the module docstring for what
    each limit and sandbox does on each platform. ``scope`` says how long the session lasts:
    ``"conversation"`` (as long as this tool) or ``"reply"`` (a server making one tool per
    request with :meth:`fresh`: the session ends when the model answers or calls a function).
    """

    name = "python"

    def __init__(
        self,
        *,
        timeout: float = 120.0,
        memory_limit: int = 2 * 1024**3,
        max_output_chars: int = 10_000,
        sandbox: str = "auto",
        env: Mapping[str, str] | None = None,
        scope: str = "conversation",
    ) -> None:
        if not timeout > 0:
            raise GptOssError(f"the python tool's timeout must be > 0 seconds, got {timeout!r}")
        if memory_limit < 64 * 1024**2:
            raise GptOssError("the python tool needs a memory_limit of at least 64 MB")
        if max_output_chars < 100:
            raise GptOssError("the python tool's max_output_chars must be at least 100")
        if sandbox not in SANDBOXES:
            raise GptOssError(f"sandbox must be one of {', '.join(SANDBOXES)}, got {sandbox!r}")
        if scope not in SCOPES:
            raise GptOssError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if sandbox == "auto":
            candidates = ["sandbox-exec"] if sys.platform == "darwin" else ["bwrap", "unshare"]
            sandbox = next((s for s in candidates if sandbox_available(s)), "none")
        elif not sandbox_available(sandbox):
            raise GptOssError(
                f"the {sandbox} sandbox does not work on this machine; install it, or choose "
                "sandbox='auto' to use the strongest that does"
            )
        self.isolation = ISOLATION[sandbox]
        self.timeout = float(timeout)
        self.memory_limit = int(memory_limit)
        self.max_output_chars = int(max_output_chars)
        self.extra_env = dict(env or {})
        self.scope = scope
        self.scratch = tempfile.mkdtemp(prefix="gptoss-python-")
        self._worker: _Worker | None = None
        self._finalizer = weakref.finalize(self, Python._cleanup, [None], self.scratch)

    # -- declaration ---------------------------------------------------------------------------

    def describe(self) -> str:
        """The tool's description for the model: exactly what this configuration does."""
        network = (
            "Internet access for this session is disabled."
            if self.isolation.network
            else "Internet access for this session is not blocked."
        )
        files = (
            f"The current working directory is a scratch directory for this {self.scope}: save "
            "files there"
            + ("; writing anywhere else is not allowed." if self.isolation.writes else ".")
        )
        lasting = (
            "like in a Jupyter notebook"
            if self.scope == "conversation"
            else "like in a Jupyter notebook, until you answer or call a function: after that a "
            "fresh session starts, with nothing defined and an empty working directory"
        )
        return (
            "Use this tool to execute Python code in your chain of thought. This tool should be "
            "used for internal reasoning, but not for code that is intended to be visible to the "
            "user (e.g. when creating plots, tables, or files).\n\n"
            "When you send a message containing Python code to python, it will be executed in a "
            "stateful Python session: variables, functions and imports persist between calls, "
            f"{lasting}. python will respond with the output of the execution "
            "(stdout, stderr and the value of a final expression) or time out after "
            f"{self.timeout:g} seconds, which restarts the session and loses its state. "
            f"Memory is limited to {self.memory_limit // 1024**2} MB. Output longer than "
            f"{self.max_output_chars} characters is shortened. {files} {network}"
        )

    def namespace(self) -> ToolNamespace:
        return ToolNamespace("python", self.describe())

    def fresh(self, *, scope: str | None = None) -> Python:
        """A new tool with this one's limits and sandbox (``scope`` changed if given): its own
        scratch directory, no session yet."""
        return Python(
            timeout=self.timeout,
            memory_limit=self.memory_limit,
            max_output_chars=self.max_output_chars,
            sandbox=self.isolation.name,
            env=self.extra_env,
            scope=scope or self.scope,
        )

    # -- running ---------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The worker's whole environment."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.scratch,
            "TMPDIR": self.scratch,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "MPLBACKEND": "Agg",
            **self.extra_env,
        }

    def _start(self) -> _Worker:
        if self._finalizer.alive is False:
            raise ToolError("the python tool was closed")
        worker = _Worker(
            _sandbox_command(self.isolation.name, self.scratch),
            self.environment(),
            self.scratch,
            self.memory_limit if RLIMIT_AS_ENFORCED else 0,
        )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, Python._cleanup, [worker], self.scratch)
        return worker

    def run(self, call: ToolCall) -> str:
        """Run the call's code; its output. A timeout, the memory limit or a crash is a
        :class:`ToolError` carrying the output so far."""
        return self.execute(call.arguments)

    def execute(self, code: str) -> str:
        """Run ``code`` in the session (starting the worker if needed); its output."""
        if self._worker is None or self._worker.process.poll() is not None:
            self._worker = self._start()
        worker = self._worker
        try:
            marker = worker.start_call(code, self.max_output_chars)
        except OSError:  # the worker died between calls
            self._stop()
            return self.execute(code)
        deadline = time.monotonic() + self.timeout
        problem = None
        try:
            with worker.changed:
                while marker not in worker.output[-len(marker) - 1 :]:
                    if worker.eof:
                        problem = self._death_note(worker)
                        break
                    if time.monotonic() > deadline:
                        problem = (
                            f"the code ran past the time limit of {self.timeout:g} seconds and "
                            "was stopped; the Python session was restarted (variables and "
                            "imports are lost)"
                        )
                        break
                    if not RLIMIT_AS_ENFORCED and (
                        _resident_bytes(worker.process.pid) > self.memory_limit
                    ):
                        problem = (
                            f"the code went past the memory limit of "
                            f"{self.memory_limit // 1024**2} MB and was stopped; the Python "
                            "session was restarted (variables and imports are lost)"
                        )
                        break
                    worker.changed.wait(_POLL)
                output = self._text(worker, marker)
        except BaseException:  # Ctrl-C while waiting: never leave the code running
            self._stop()
            raise
        if problem is not None:
            self._stop()
            raise ToolError(f"{output}\n{problem}" if output else problem)
        return output

    def _text(self, worker: _Worker, marker: bytes) -> str:
        raw = bytes(worker.output)
        if raw.endswith(marker):
            raw = raw[: -len(marker)]
        text = raw.decode("utf-8", errors="replace")
        if worker.cut:
            head, tail = text[: self.max_output_chars], text[self.max_output_chars :]
            text = f"{head}[... {worker.cut} bytes cut ...]{tail}"
        return _shorten(text, self.max_output_chars)

    def _death_note(self, worker: _Worker) -> str:
        code = worker.process.wait()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return (
            f"the Python process {how}; the session was restarted (variables and imports are lost)"
        )

    def _stop(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None

    def reset(self) -> None:
        """Forget the session's variables (a new worker on the next call); files stay."""
        self._stop()

    def close(self) -> None:
        """Stop the worker and remove the scratch directory."""
        self._stop()
        self._finalizer()

    @staticmethod
    def _cleanup(workers: list, scratch: str) -> None:
        for worker in workers:
            if worker is not None and worker.process.poll() is None:
                worker.kill()
        shutil.rmtree(scratch, ignore_errors=True)
