"""The python tool's worker process: runs the code the parent sends in one namespace that lives
as long as the process (a stateful session, like a notebook kernel).

Started as ``python -I python_worker.py REQUEST_FD MEMORY_BYTES`` with a clean environment, in
the scratch directory, possibly inside a sandbox. Each request is one JSON line
``{"code": ..., "nonce": ...}`` on REQUEST_FD; what the code prints (stdout and stderr, merged by
the parent) is followed by the line ``<nonce>`` on stdout, which tells the parent the run is
over. A statement list ending in an expression also prints that expression's ``repr``, as a
notebook cell shows its value. This file imports nothing from gptoss_mlx: it runs on its own.
"""

import ast
import json
import os
import resource
import sys
import traceback


def run(code: str, namespace: dict) -> None:
    """Execute ``code`` in ``namespace``; print the last expression's value, or the traceback
    (without this function's frame)."""
    try:
        tree = ast.parse(code, "<python>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<python>", "exec"), namespace)
        if last is not None:
            value = eval(compile(last, "<python>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the session goes on
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)


def main() -> None:
    request_fd, memory = int(sys.argv[1]), int(sys.argv[2])
    if memory > 0:  # address space: allocations past it raise MemoryError in the code
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    with os.fdopen(request_fd, "r", encoding="utf-8") as requests:
        for line in requests:
            request = json.loads(line)
            run(request["code"], namespace)
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(1, f"\n{request['nonce']}\n".encode())


if __name__ == "__main__":
    main()
