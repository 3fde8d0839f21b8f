"""Turn MLX's generated kernel source into a shared library: lint, translation unit, g++, cache."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from gptoss_mlx.kernels.emulator.errors import KernelCompileError, KernelLintError
from gptoss_mlx.kernels.emulator.source import Generated

HERE = Path(__file__).resolve().parent
CXX_FLAGS = [
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-w",
    "-fno-strict-aliasing",
    "-pthread",
    "-fvisibility=hidden",
]
# Headers a Metal kernel may include; they resolve to empty stubs (msl.h already provides them).
METAL_HEADERS = [
    "metal_stdlib",
    "metal_simdgroup",
    "metal_math",
    "metal_atomic",
    "metal_compute",
    "metal_integer",
    "metal_common",
    "metal_relational",
    "metal_geometric",
    "metal_types",
    "metal_type_traits",
    "metal_numeric",
    "metal_simdgroup_matrix",
    "metal_config",
]


def cache_dir() -> Path:
    d = os.environ.get("GPTOSS_MLX_EMULATOR_CACHE")
    path = Path(d) if d else Path.home() / ".cache" / "gptoss_mlx" / "emulator"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise KernelCompileError(
            "the Metal emulator needs g++ (none found on PATH; set CXX to a g++)"
        )
    return cxx


# ---------------------------------------------------------------------------------------------
# Lint: what Metal forbids but g++ would accept.

_COMMENT_OR_STRING = re.compile(
    r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S
)

_FORBIDDEN = [
    (re.compile(r"\bdouble\b"), "`double`: Metal has no 64-bit floating point; use float"),
    (re.compile(r"\b(new|delete)\b"), "`{0}`: Metal has no dynamic allocation"),
    (re.compile(r"\b(try|catch|throw)\b"), "`{0}`: Metal has no exceptions"),
    (re.compile(r"\bgoto\b"), "`goto` is not allowed in Metal"),
    (re.compile(r"\bvirtual\b"), "`virtual`: Metal has no virtual functions"),
    (re.compile(r"\b(dynamic_cast|typeid)\b"), "`{0}`: Metal has no run-time type information"),
    (re.compile(r"\b(thread_local|register)\b"), "`{0}` is not allowed in Metal"),
    (re.compile(r"\bstd::"), "`std::`: the Metal standard library lives in namespace metal"),
    (re.compile(r"\b(printf|malloc|free|calloc|realloc)\s*\("), "`{0}` does not exist in Metal"),
]
_FUNC_DEF = re.compile(
    r"\b([A-Za-z_]\w*)\s*\([^;{}()]*(?:\([^;{}()]*\)[^;{}()]*)*\)\s*(?:const\s*)?\{"
)
_NOT_FUNCS = {"if", "for", "while", "switch", "return", "sizeof", "catch", "decltype", "alignof"}


def _blank(text: str) -> str:
    """Comments and literals replaced by spaces (newlines kept, so offsets and lines stay)."""
    return _COMMENT_OR_STRING.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def lint(name: str, parts: list[tuple[str, str]]) -> None:
    """Raise KernelLintError for constructs Apple's compiler rejects. parts: (label, text)."""
    problems = []
    for label, text in parts:
        clean = _blank(text)
        for pattern, what in _FORBIDDEN:
            for m in pattern.finditer(clean):
                line = clean.count("\n", 0, m.start()) + 1
                problems.append(
                    f"{label}:{line}: {what.format(m.group(1) if m.groups() else m.group(0))}"
                )
        # direct recursion: a function whose body calls itself
        for m in _FUNC_DEF.finditer(clean):
            fname = m.group(1)
            if fname in _NOT_FUNCS:
                continue
            depth, i = 1, m.end()
            while i < len(clean) and depth:
                depth += {"{": 1, "}": -1}.get(clean[i], 0)
                i += 1
            if re.search(
                rf"(?<![\w.>:]){re.escape(fname)}\s*(<[^;{{}}]*>)?\s*\(", clean[m.end() : i]
            ):
                line = clean.count("\n", 0, m.start()) + 1
                problems.append(
                    f"{label}:{line}: `{fname}` calls itself: Metal does not allow recursion"
                )
    if problems:
        raise KernelLintError(
            f"kernel '{name}' uses what Metal forbids:\n  " + "\n  ".join(problems)
        )


# ---------------------------------------------------------------------------------------------
# Threadgroup storage: `threadgroup T name[N];` must be one object shared by the threads of a
# threadgroup, so it becomes a `static thread_local` (one OS thread runs a threadgroup's fibers)
# registered for poisoning. Pointers and references (`threadgroup T* p`) keep `threadgroup`, which
# expands to nothing. The rewrite stays on the same line, so line numbers are unchanged.

_DECL = r"[A-Za-z_]\w*(?:\s*\[[^\];]*\])*"
_TG_STORAGE = re.compile(
    r"\bthreadgroup\s+((?:(?:const|volatile)\s+)*[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+"
    rf"({_DECL}(?:\s*,\s*{_DECL})*)\s*;"
)


def rewrite_threadgroup(text: str, guarded: bool = False) -> str:
    def repl(m: re.Match) -> str:
        decls = [d.strip() for d in m.group(2).split(",")]
        names = [re.match(r"[A-Za-z_]\w*", d).group(0) for d in decls]
        regs = " ".join(f"msl::tg_register((void*)&{n}, sizeof({n}));" for n in names)
        if not guarded or not any("[" in d for d in decls):
            return f"static thread_local {m.group(1)} {m.group(2)}; {regs}"
        # guarded: arrays become checked tg_array<...> (innermost dimension last)
        out = []
        for d, n in zip(decls, names):
            dims = re.findall(r"\[([^\]]*)\]", d)
            t = m.group(1)
            for dim in reversed(dims):
                t = f"msl::tg_array<{t}, ({dim})>"
            out.append(f"static thread_local {t} {n};")
        return " ".join(out) + " " + regs

    return _TG_STORAGE.sub(repl, text)


# ---------------------------------------------------------------------------------------------
# Translation unit


def _strip_space(ctype: str) -> str:
    return " ".join(w for w in ctype.split() if w not in ("device", "constant"))


def translation_unit(gen: Generated, name: str, header: str, guarded: bool) -> str:
    """The C++ file: msl.h, then MLX's generated source with #line markers, then the entry point."""
    src = gen.source
    head_len = len(header)
    header_part = src[:head_len]
    generated_head = src[head_len : gen.body_start]
    body = src[gen.body_start : gen.body_end]
    tail = src[gen.body_end :]
    if guarded:
        for p in gen.params:
            if p.kind in ("input", "shape", "strides", "output") and p.ctype.endswith("*"):
                base = _strip_space(p.ctype[:-1])
                old = f"  {p.ctype} {p.name} [[buffer({p.index})]]"
                generated_head = generated_head.replace(
                    old, f"  msl::guarded<{base}> {p.name} [[buffer({p.index})]]", 1
                )
    out = ['#include "msl.h"\n']
    # #line markers only where MLX's text already starts a new line: inserting a line break
    # elsewhere could change what the code means.
    if header_part:
        out.append(f'#line 1 "{name}/header"\n')
    out.append(rewrite_threadgroup(header_part, guarded))
    if not header_part or header_part.endswith("\n"):
        out.append(f'#line 1 "{name}/signature"\n')
    out.append(generated_head)
    out.append(f'#line 1 "{name}/source"\n')
    out.append(rewrite_threadgroup(body, guarded))
    # tail starts with "\n}\n"
    out.append("\n")
    out.append(f'#line 1 "{name}/generated-tail"\n')
    out.append(tail[1:])
    # entry point
    args = []
    for p in gen.params:
        if p.kind == "attr":
            args.append(f"a.{p.name}")
        elif p.ctype.endswith("&"):
            args.append(f"*({_strip_space(p.ctype[:-1])}*)bufs[{p.index}]")
        elif guarded:
            base = _strip_space(p.ctype[:-1])
            args.append(
                f"msl::guarded<{base}>(({base}*)bufs[{p.index}], 0, g_launch->lo[{p.index}], "
                f"g_launch->hi[{p.index}], g_launch->names[{p.index}])"
            )
        else:
            args.append(f"({_strip_space(p.ctype)})bufs[{p.index}]")
    out.append(
        '\n#line 1 "emulator-entry"\nnamespace msl {\nstatic void kernel_entry(void** bufs, const Attrs& a) {\n'
    )
    out.append("  (void)bufs; (void)a;\n")
    out.append(
        f"  ::{gen.call_name}(\n    " + ",\n    ".join(args) + ");\n}\n}  // namespace msl\n"
    )
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Compile and cache

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def _stub_include_dir() -> Path:
    d = cache_dir() / "include"
    if not all((d / h).exists() for h in METAL_HEADERS):
        d.mkdir(parents=True, exist_ok=True)
        for h in METAL_HEADERS:
            (d / h).write_text(
                "// Metal standard header: provided by the emulator's msl.h\n#pragma once\n"
            )
    return d


def _header_digest() -> str:
    h = hashlib.sha256()
    for f in ("msl.h", "runtime.h"):
        h.update((HERE / f).read_bytes())
    return h.hexdigest()


_PATH_LINE = re.compile(
    r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:(?P<col>\d+):)?\s*(?P<kind>error|fatal error|warning|note):\s*(?P<msg>.*)$",
    re.M,
)


def _compile_error(name: str, stderr: str) -> KernelCompileError:
    errors = []
    first_line = None
    for m in _PATH_LINE.finditer(stderr):
        if m.group("kind") not in ("error", "fatal error"):
            continue
        f = m.group("file")
        part = f[len(name) + 1 :] if f.startswith(name + "/") else f
        loc = f"{part} line {m.group('line')}" + (
            f", column {m.group('col')}" if m.group("col") else ""
        )
        if first_line is None and part == "source":
            first_line = int(m.group("line"))
        errors.append(f"{loc}: {m.group('msg')}")
    summary = "\n  ".join(errors[:10]) if errors else stderr.strip()[-2000:]
    err = KernelCompileError(
        f"kernel '{name}' does not compile (lines count from the first line of the text you wrote):\n  "
        f"{summary}\n\nfull g++ output:\n{stderr.strip()[-6000:]}"
    )
    err.line = first_line
    err.compiler_output = stderr
    return err


def load(name: str, tu: str) -> ctypes.CDLL:
    """Compile the translation unit (or reuse a cached build) and load it."""
    cxx = _compiler()
    key = hashlib.sha256(
        "\0".join([tu, " ".join(CXX_FLAGS), cxx, _header_digest()]).encode()
    ).hexdigest()[:32]
    with _lock:
        lib = _loaded.get(key)
        if lib is not None:
            return lib
        d = cache_dir()
        so = d / f"{key}.so"
        if not so.exists():
            inc = _stub_include_dir()
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                cpp = Path(tmp) / f"{key}.cpp"
                cpp.write_text(tu)
                out = Path(tmp) / f"{key}.so"
                cmd = [cxx, *CXX_FLAGS, f"-I{HERE}", f"-I{inc}", str(cpp), "-o", str(out)]
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
                if r.returncode != 0:
                    raise _compile_error(name, r.stderr)
                (d / f"{key}.cpp").write_text(tu)  # kept next to the library for debugging
                os.replace(out, so)
        lib = ctypes.CDLL(str(so))
        lib.msl_launch.restype = ctypes.c_int
        _loaded[key] = lib
        return lib
