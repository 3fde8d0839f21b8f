"""The python tool: a stateful session in a separate process, bounded in time, memory and output,
with a clean environment and a scratch directory; network and writes outside the scratch
directory denied where this machine can sandbox (the skip reasons say where it cannot)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from gptoss_mlx import GptOssError
from gptoss_mlx.tools import Python, ToolError
from gptoss_mlx.tools import python as python_module
from gptoss_mlx.tools.python import sandbox_available


@pytest.fixture
def python():
    tool = Python(timeout=5, memory_limit=256 * 1024**2, max_output_chars=2000)
    yield tool
    tool.close()


def test_output_and_state_persist(python):
    assert python.execute("x = 6 * 7\nprint('x is', x)") == "x is 42\n"
    assert python.execute("x + 1") == "43\n"  # a final expression shows its value
    assert python.execute("import math\ndef f(n): return math.factorial(n)") == ""
    assert python.execute("f(5)") == "120\n"
    error = python.execute("1 / 0")
    assert error.startswith("Traceback") and error.endswith("ZeroDivisionError: division by zero\n")
    assert "python_worker" not in error  # the worker's own frames are not shown
    assert python.execute("import sys; print('to stderr', file=sys.stderr)") == "to stderr\n"
    assert python.execute("exit(3)").endswith("SystemExit: 3\n")  # the session survives
    assert python.execute("x") == "42\n"


def test_an_infinite_loop_stops_at_the_time_limit():
    tool = Python(timeout=1.5)
    try:
        tool.execute("y = 1")
        start = time.monotonic()
        with pytest.raises(ToolError, match="time limit of 1.5 seconds") as e:
            tool.execute("print('started', flush=True)\nwhile True: pass")
        assert 1.5 <= time.monotonic() - start < 5
        assert str(e.value).startswith("started\n")  # what it printed before being stopped
        assert "NameError" in tool.execute("y")  # a fresh session: the state is gone
    finally:
        tool.close()


def test_a_memory_bomb_stops_at_the_memory_limit(python):
    bomb = "blocks = []\nwhile True: blocks.append(bytearray(10**7))"
    if python_module.RLIMIT_AS_ENFORCED:  # Linux: the allocation fails inside the code
        out = python.execute(bomb)
        assert out.rstrip().endswith("MemoryError")
        assert python.execute("del blocks; print('still alive')") == "still alive\n"
    else:  # macOS: the watchdog kills the worker
        with pytest.raises(ToolError, match="memory limit of 256 MB"):
            python.execute(bomb)


def test_the_memory_watchdog(monkeypatch):
    """The watchdog macOS relies on (no RLIMIT_AS there), checked here with the limit off."""
    monkeypatch.setattr(python_module, "RLIMIT_AS_ENFORCED", False)
    tool = Python(timeout=20, memory_limit=200 * 1024**2, sandbox="none")
    try:
        with pytest.raises(ToolError, match="memory limit of 200 MB"):
            tool.execute("blocks = []\nwhile True: blocks.append(b'x' * 10**7)")
        assert tool.execute("print('restarted')") == "restarted\n"
    finally:
        tool.close()


def test_the_parent_environment_is_not_visible(python, monkeypatch):
    monkeypatch.setenv("GPTOSS_TEST_SECRET", "hunter2")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    python.reset()  # a worker started after the variables were set
    out = python.execute("import os; print(sorted(os.environ.items()))")
    assert "hunter2" not in out and "sk-test" not in out
    env = eval(out)  # noqa: S307 (our own repr)
    names = {k for k, _ in env}
    assert names <= set(python.environment()) | {"PWD"}  # PWD: the sandbox's working dir
    assert dict(env)["HOME"] == python.scratch
    assert python.execute("import os; os.getcwd()") == repr(python.scratch) + "\n"


def test_output_is_truncated(python):
    out = python.execute("print('a' * 50_000 + 'END')")
    assert len(out) < 2200 and out.startswith("aaa") and out.rstrip().endswith("END")
    assert "characters cut" in out or "bytes cut" in out
    out = python.execute("for i in range(200_000): print(i)")  # more than the reader keeps
    assert len(out) < 2200 and out.startswith("0\n1\n") and out.rstrip().endswith("199999")


def test_a_crash_restarts_the_session(python):
    python.execute("z = 1")
    with pytest.raises(ToolError, match="exited with status 7"):
        python.execute("import os; os._exit(7)")
    assert "NameError" in python.execute("z")


def test_close_removes_the_scratch_directory():
    tool = Python()
    tool.execute("open('notes.txt', 'w').write('kept while the session lives')")
    assert os.path.exists(os.path.join(tool.scratch, "notes.txt"))
    tool.close()
    assert not os.path.exists(tool.scratch)
    with pytest.raises(ToolError, match="closed"):
        tool.execute("1")


def test_bad_settings_are_refused():
    for kwargs in [{"timeout": 0}, {"memory_limit": 1000}, {"sandbox": "docker"}]:
        with pytest.raises(GptOssError):
            Python(**kwargs)


# -- isolation ---------------------------------------------------------------------------------


def _sandbox_or_skip(name: str) -> Python:
    if not sandbox_available(name):
        pytest.skip(
            f"the {name} sandbox does not work on this machine "
            f"({'not installed or not permitted' if name != 'sandbox-exec' else 'macOS only'})"
        )
    return Python(timeout=10, sandbox=name)


@pytest.mark.parametrize("sandbox", ["bwrap", "unshare", "sandbox-exec"])
def test_network_is_denied_in_each_sandbox(sandbox):
    tool = _sandbox_or_skip(sandbox)
    server = socket.create_server(("127.0.0.1", 0))  # reachable from this process...
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print('denied', type(e).__name__)\n"
        )
        assert tool.execute(code).startswith("denied")  # ...but not from the sandbox
        assert "Internet access for this session is disabled." in tool.describe()
    finally:
        server.close()
        tool.close()


WRITE_OUTSIDE = (
    "try:\n    open({target!r}, 'w').write('x')\n    print('written')\n"
    "except OSError as e:\n    print('denied', e.errno)\n"
)


@pytest.mark.parametrize("sandbox", ["bwrap", "sandbox-exec"])
def test_writes_outside_the_scratch_directory_are_denied(sandbox, tmp_path):
    tool = _sandbox_or_skip(sandbox)
    try:
        target = tmp_path / "escaped.txt"
        assert tool.execute(WRITE_OUTSIDE.format(target=str(target))).startswith("denied")
        assert not target.exists()
        assert tool.execute("open('inside.txt', 'w').write('ok')") == "2\n"
        assert os.path.exists(os.path.join(tool.scratch, "inside.txt"))
        assert "writing anywhere else is not allowed" in tool.describe()
    finally:
        tool.close()


def test_unshare_does_not_confine_writes_and_says_so(tmp_path):
    """What the README states for the unshare fallback: network denied, writes not."""
    tool = _sandbox_or_skip("unshare")
    try:
        target = tmp_path / "outside.txt"
        assert tool.execute(WRITE_OUTSIDE.format(target=str(target))) == "written\n"
        assert "not allowed" not in tool.describe()
    finally:
        tool.close()


def test_auto_picks_the_strongest_sandbox_here():
    tool = Python()
    want = next((s for s in ("sandbox-exec", "bwrap", "unshare") if sandbox_available(s)), "none")
    assert tool.isolation.name == want
    tool.close()


def test_the_description_is_true_of_the_configuration():
    tool = Python(timeout=30, memory_limit=512 * 1024**2, max_output_chars=5000, sandbox="none")
    text = tool.describe()
    assert "time out after 30 seconds" in text and "limited to 512 MB" in text
    assert "longer than 5000 characters" in text and "stateful" in text
    assert "not blocked" in text and "not allowed" not in text  # no sandbox: no such promise
    assert "/mnt/data" not in text and "Jupyter notebook environment" not in text
    tool.close()


def test_fresh_copies_the_configuration_not_the_session(python):
    """What a server gives each request: the same limits and sandbox, its own process and
    scratch directory, and (scope "reply") a description that says the session ends there."""
    python.execute("x = 1")
    copy = python.fresh(scope="reply")
    try:
        assert copy.scratch != python.scratch and os.path.isdir(copy.scratch)
        assert (copy.timeout, copy.memory_limit, copy.max_output_chars) == (5, 256 * 1024**2, 2000)
        assert copy.isolation == python.isolation and copy.scope == "reply"
        assert "NameError" in copy.execute("x")
        assert python.execute("x") == "1\n"
        text = copy.describe()
        assert "until you answer or call a function" in text
        assert "scratch directory for this reply" in text
        assert "until you answer" not in python.describe()
    finally:
        copy.close()
    assert not os.path.exists(copy.scratch)
    with pytest.raises(GptOssError, match="scope"):
        Python(scope="forever")
