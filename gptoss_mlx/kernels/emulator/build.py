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
from collections.abc import Callable
from pathlib import Path

from gptoss_mlx.kernels.emulator.errors import KernelCompileError, KernelLintError
from gptoss_mlx.kernels.emulator.source import Generated

HERE = Path(__file__).resolve().parent
CXX_FLAGS = [
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-Werror=vla",  # Metal has no variable-length arrays; g++ accepts them as an extension
    "-Wno-literal-suffix",  # msl.h's half literals (1.0h) use Metal's suffix
    "-Wno-attributes",  # [[buffer(i)]] and the other Metal attributes mean nothing to g++
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
    "metal_matrix",
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
]
# C and C++ library functions the Metal standard library does not have (MSL spec chapter 6): a call
# is an error unless the kernel defines a function of that name itself.
NOT_IN_METAL = frozenset(
    """erf erfc erff erfcf lgamma tgamma lgammaf tgammaf hypot hypotf cbrt cbrtf expm1 expm1f log1p
    log1pf logb logbf nan nanf remainder remquo scalbn scalbln fmal
    expf exp2f exp10f logf log2f log10f powf sqrtf sinf cosf tanf asinf acosf atanf atan2f sinhf
    coshf tanhf fabsf floorf ceilf roundf truncf rintf fminf fmaxf fmodf copysignf ldexpf frexpf
    modff j0 j1 jn y0 y1 yn
    printf fprintf sprintf snprintf puts putchar malloc calloc realloc free memcpy memset memmove
    memcmp strlen strcmp strcpy abort exit assert rand srand atoi atof qsort""".split()
)
_CALL = re.compile(r"([A-Za-z_]\w*)\s*\(")
_FUNC_DEF = re.compile(
    r"\b([A-Za-z_]\w*)\s*\([^;{}()]*(?:\([^;{}()]*\)[^;{}()]*)*\)\s*(?:const\s*)?\{"
)
_NOT_FUNCS = {"if", "for", "while", "switch", "return", "sizeof", "catch", "decltype", "alignof"}
_DECL = r"[A-Za-z_]\w*(?:\s*\[[^\];]*\])*"
_TYPE = r"[A-Za-z_][\w:]*(?:\s*<[^;{}()<>]*(?:<[^;{}()<>]*>[^;{}()<>]*)*>)?"
# `static` in a function: allowed only for constant-address-space data.
_STATIC = re.compile(r"\bstatic\b(?![^;={}]*\bconstant\b)")
# threadgroup storage with an initializer (not a pointer or reference, which are thread variables)
_TG_INIT = re.compile(rf"\bthreadgroup\s+(?:(?:const|volatile)\s+)*{_TYPE}\s+{_DECL}\s*(=|\{{)")
_TG_STORAGE = re.compile(
    rf"\bthreadgroup\s+((?:(?:const|volatile)\s+)*{_TYPE})\s+({_DECL}(?:\s*,\s*{_DECL})*)\s*;"
)


def _blank(text: str) -> str:
    """Comments and literals replaced by spaces (newlines kept, so offsets and lines stay)."""
    return _COMMENT_OR_STRING.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _function_bodies(clean: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of each function body `{ ... }` defined in `clean`."""
    bodies = []
    for m in _FUNC_DEF.finditer(clean):
        if m.group(1) in _NOT_FUNCS:
            continue
        depth, i = 1, m.end()
        while i < len(clean) and depth:
            depth += {"{": 1, "}": -1}.get(clean[i], 0)
            i += 1
        bodies.append((m.group(1), m.end(), i))
    return bodies


def _qualifier(clean: str, start: int) -> str | None:
    """What precedes a name at `start`: '.' or '->' (a member), 'ns::' (qualified), or None."""
    before = clean[:start].rstrip()
    if before.endswith(".") or before.endswith("->"):
        return "."
    if before.endswith("::"):
        m = re.search(r"([A-Za-z_]\w*)\s*::$", before)
        return (m.group(1) if m else "") + "::"
    return None


def lint(name: str, parts: list[tuple[str, str]]) -> None:
    """Raise KernelLintError for constructs Apple's compiler rejects. parts: (label, text); the
    "source" part is the kernel's body (inside the kernel function), the others are at program
    scope (helper functions)."""
    problems = []
    defined = set()
    for _, text in parts:
        defined |= {fname for fname, _, _ in _function_bodies(_blank(text))}
    for label, text in parts:
        clean = _blank(text)

        def report(pos: int, what: str, label: str = label, clean: str = clean) -> None:
            problems.append(f"{label}:{clean.count(chr(10), 0, pos) + 1}: {what}")

        for pattern, what in _FORBIDDEN:
            for m in pattern.finditer(clean):
                report(m.start(), what.format(m.group(1) if m.groups() else m.group(0)))
        bodies = _function_bodies(clean)
        # direct recursion: a function whose body calls itself
        for fname, start, end in bodies:
            if re.search(
                rf"(?<![\w.>:]){re.escape(fname)}\s*(<[^;{{}}]*>)?\s*\(", clean[start:end]
            ):
                report(start, f"`{fname}` calls itself: Metal does not allow recursion")
        # functions Metal does not have
        for m in _CALL.finditer(clean):
            fname = m.group(1)
            if fname not in NOT_IN_METAL or fname in defined:
                continue
            q = _qualifier(clean, m.start())
            if q is None or q in ("metal::", "fast::", "precise::"):
                report(m.start(), f"`{fname}` is not a function of the Metal standard library")
        # static locals and threadgroup variables: in the kernel body, or in a helper's body
        scopes = [(0, len(clean))] if label == "source" else [(s, e) for _, s, e in bodies]
        for start, end in scopes:
            for m in _STATIC.finditer(clean, start, end):
                report(
                    m.start(),
                    "`static` local variable: Metal allows static variables in a function only "
                    "in the constant address space (`static constant ...`)",
                )
            for m in _TG_INIT.finditer(clean, start, end):
                report(
                    m.start(),
                    "threadgroup variables cannot have an initializer in Metal: assign them in "
                    "the kernel (then a barrier)",
                )
            if label != "source":
                for m in _TG_STORAGE.finditer(clean, start, end):
                    report(
                        m.start(),
                        "variables in the threadgroup address space cannot be declared in a "
                        "non-kernel function: declare them in the kernel and pass a pointer",
                    )
    if problems:
        raise KernelLintError(
            f"kernel '{name}' uses what Metal forbids:\n  " + "\n  ".join(problems)
        )


# ---------------------------------------------------------------------------------------------
# Rewrites of the kernel text before g++ sees it. Each keeps every line where it was (errors name
# the lines you wrote) and skips comments.


def _rewrite(text: str, pattern: re.Pattern, repl: Callable[[re.Match], str]) -> str:
    """`pattern` replaced by `repl(match)` where it matches outside comments and literals."""
    clean = _blank(text)
    out, last = [], 0
    for m in pattern.finditer(clean):
        out.append(text[last : m.start()])
        out.append(repl(m))
        last = m.end()
    out.append(text[last:])
    return "".join(out)


# Threadgroup storage: `threadgroup T name[N];` must be one object shared by the threads of a
# threadgroup, so it becomes a `static thread_local` (one OS thread runs a threadgroup's fibers)
# registered for poisoning. Pointers and references (`threadgroup T* p`) are thread variables.
def rewrite_threadgroup(text: str, guarded: bool = False) -> str:
    def repl(m: re.Match) -> str:
        decls = [d.strip() for d in m.group(2).split(",")]
        names = [re.match(r"[A-Za-z_]\w*", d).group(0) for d in decls]
        regs = " ".join(f"msl::tg_register((void*)&{n}, sizeof({n}));" for n in names)
        if not guarded or not any("[" in d for d in decls):
            return f"static thread_local {m.group(1)} {m.group(2)}; {regs}"
        # guarded: arrays become checked tg_array<...> (innermost dimension last)
        out = []
        for d, n in zip(decls, names, strict=True):
            dims = re.findall(r"\[([^\]]*)\]", d)
            t = m.group(1)
            for dim in reversed(dims):
                t = f"msl::tg_array<{t}, ({dim})>"
            out.append(f"static thread_local {t} {n};")
        return " ".join(out) + " " + regs

    return _rewrite(text, _TG_STORAGE, repl)


# Swizzles: `.zyx`, `.rg`, `->xy` (2 to 4 components of one set) become `.template swz<2, 1, 0>()`
# (msl.h: a vector, or on an lvalue a view that writes assignments back). Single components are
# members. A struct member whose name is 2-4 letters of xyzw or rgba would be taken for a swizzle.
_SWIZZLE = re.compile(r"(?<=[\w)\]])(\s*(?:\.|->)\s*)([xyzw]{2,4}|[rgba]{2,4})\b(?!\s*\()")
_COMPONENT = {c: i for s in ("xyzw", "rgba") for i, c in enumerate(s)}


def rewrite_swizzles(text: str) -> str:
    def repl(m: re.Match) -> str:
        idx = ", ".join(str(_COMPONENT[c]) for c in m.group(2))
        return f"{m.group(1)}template swz<{idx}>()"

    return _rewrite(text, _SWIZZLE, repl)


# Address spaces (guarded mode): `device T*`, `constant T*`, `threadgroup T*` become
# msl::ptr<T, AS> (msl::cptr<T, AS> when T is const), distinct types for distinct address spaces
# (runtime.h). `thread T*` stays a plain pointer; references keep erased address spaces.
_AS_POINTER = re.compile(
    rf"(\bconst\s+)?\b(device|constant|threadgroup)\s+(const\s+)?({_TYPE})(\s+const)?\s*\*"
)
_AS_NAME = {"device": "AS_DEVICE", "constant": "AS_CONSTANT", "threadgroup": "AS_THREADGROUP"}


def _typed_pointer(m: re.Match) -> str:
    const = bool(m.group(1) or m.group(3) or m.group(5))
    return f"msl::{'cptr' if const else 'ptr'}<{m.group(4)}, msl::{_AS_NAME[m.group(2)]}>"


def rewrite_address_spaces(text: str) -> str:
    return _rewrite(text, _AS_POINTER, _typed_pointer)


def _rewrite_kernel_text(text: str, guarded: bool) -> str:
    text = rewrite_swizzles(rewrite_threadgroup(text, guarded))
    return rewrite_address_spaces(text) if guarded else text


# ---------------------------------------------------------------------------------------------
# Translation unit


def _strip_space(ctype: str) -> str:
    return " ".join(w for w in ctype.split() if w not in ("device", "constant"))


def _element_type(ctype: str) -> str:
    """The element type of a buffer parameter's C type: `const device float*` -> `float`."""
    return " ".join(
        w for w in ctype.rstrip("*&").split() if w not in ("const", "device", "constant")
    )


def translation_unit(gen: Generated, name: str, header: str, guarded: bool) -> str:
    """The C++ file: msl.h, then MLX's generated source with #line markers, then the entry point."""
    src = gen.source
    head_len = len(header)
    header_part = src[:head_len]
    generated_head = src[head_len : gen.body_start]
    body = src[gen.body_start : gen.body_end]
    tail = src[gen.body_end :]
    if guarded:
        generated_head = rewrite_address_spaces(generated_head)
    out = ['#include "msl.h"\n']
    # #line markers only where MLX's text already starts a new line: inserting a line break
    # elsewhere could change what the code means.
    if header_part:
        out.append(f'#line 1 "{name}/header"\n')
    out.append(_rewrite_kernel_text(header_part, guarded))
    if not header_part or header_part.endswith("\n"):
        out.append(f'#line 1 "{name}/signature"\n')
    out.append(generated_head)
    out.append(f'#line 1 "{name}/source"\n')
    out.append(_rewrite_kernel_text(body, guarded))
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
            typed = rewrite_address_spaces(p.ctype)
            size = f"(int64_t)sizeof({_element_type(p.ctype)})"
            args.append(
                f"{typed}((char*)bufs[{p.index}], 0, g_launch->lo[{p.index}] * {size}, "
                f"g_launch->hi[{p.index}] * {size}, g_launch->names[{p.index}], {size})"
            )
        else:
            args.append(f"({_strip_space(p.ctype)})bufs[{p.index}]")
    out.append(
        '\n#line 1 "emulator-entry"\nnamespace msl {\n'
        "static void kernel_entry(void** bufs, const Attrs& a) {\n"
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
    r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:(?P<col>\d+):)?\s*"
    r"(?P<kind>error|fatal error|warning|note):\s*(?P<msg>.*)$",
    re.M,
)
# What a g++ message about the emulator's stand-ins means in Metal's terms.
_HINTS = [
    (
        re.compile(r"\bc?ptr<|tg_array<|operator U\*"),
        "address spaces: Metal does not convert device, constant, threadgroup and thread "
        "pointers into one another (MLX passes inputs of fewer than 8 elements as `constant`)",
    ),
    (
        re.compile(r"variable length array"),
        "Metal has no variable-length arrays: size arrays with compile-time constants",
    ),
    (
        re.compile(r"was not declared in this scope|has not been declared"),
        "the Metal standard library has no such name (or the kernel misspells it)",
    ),
]


def _compile_error(name: str, stderr: str) -> KernelCompileError:
    """The errors of g++'s output, each at a line of the kernel text: an error inside msl.h or
    runtime.h (a static_assert of a Metal rule) is reported where the kernel's code required it."""
    errors = []
    first_line = None
    required = re.compile(rf"^{re.escape(name)}/(\w+):(\d+):(\d+):\s+required from", re.M)
    last_required: tuple[str, str] | None = None
    events = sorted(
        [(m.start(), "error", m) for m in _PATH_LINE.finditer(stderr)]
        + [(m.start(), "required", m) for m in required.finditer(stderr)],
        key=lambda e: e[0],
    )
    for _, kind, m in events:
        if kind == "required":
            last_required = (m.group(1), m.group(2))
            continue
        if m.group("kind") not in ("error", "fatal error"):
            continue
        f = m.group("file")
        if f.startswith(name + "/"):
            part, line, col = f[len(name) + 1 :], m.group("line"), m.group("col")
        elif last_required is not None:  # inside the emulator's headers, required by the kernel
            (part, line), col = last_required, None
        else:
            part, line, col = f, m.group("line"), m.group("col")
        loc = f"{part} line {line}" + (f", column {col}" if col else "")
        if first_line is None and part == "source":
            first_line = int(line)
        errors.append(f"{loc}: {m.group('msg')}")
        last_required = None
    summary = "\n  ".join(errors[:10]) if errors else stderr.strip()[-2000:]
    hints = [hint for pattern, hint in _HINTS if pattern.search("\n".join(errors))]
    err = KernelCompileError(
        f"kernel '{name}' does not compile (lines count from the first line of the text you "
        f"wrote):\n  {summary}"
        + "".join(f"\n  ({hint})" for hint in hints)
        + f"\n\nfull g++ output:\n{stderr.strip()[-6000:]}"
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
