"""The kernel source MLX 0.32 generates for ``mx.fast.metal_kernel`` (without its JIT prelude).

Rules (from mlx/backend/common/metal_kernel.cpp at v0.32.1, checked against mlx 0.32.4's own
output in tests/test_emulator.py):

- source = header + optional ``template <typename T, int N, bool B>\\n`` line + ``[[kernel]] void
  <kernel_name>(\\n`` + one line per parameter + body + ``\\n}\\n``, then for templated kernels
  ``\\ntemplate [[host_name("<kernel_name>")]] [[kernel]] decltype(<kernel_name><args>)
  <kernel_name><args>;\\n``.
- kernel_name = ``custom_kernel_<name>``, then ``_`` + the template hash (template args written
  ``<float, 3, 1>`` with ``<``/``>`` and ``, `` turned into ``_``, last char dropped) when there are
  template args, then ``_<dtype>`` per input (suffix ``s`` for a 0-d input, ``c`` for fewer than 8
  elements), then ``_<dtype>`` per output.
- inputs: ``  const device T* name [[buffer(i)]],`` (``constant`` when size < 8; ``T&`` when 0-d);
  then, for inputs with ndim > 0 whose ``name_shape`` / ``name_strides`` / ``name_ndim`` appears in
  the body, ``const constant int* name_shape``, ``const constant int64_t* name_strides``, ``const
  constant int& name_ndim`` buffers, in that order.
- outputs: ``  device T* name [[buffer(i)]]`` (``device atomic<T>*`` with atomic_outputs); the
  separator after an output is ``,\\n`` when ``buffer index < n_inputs + n_outputs - 1`` or any
  attribute follows, else ``) {\\n`` -- MLX compares the buffer index (which counts shape buffers)
  with the argument count, and we reproduce that literally.
- thread attributes: every name of METAL_ATTRIBUTES found as a substring of the body, in that
  (alphabetical) order, as ``  uint3 name [[name]]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

MAX_CONSTANT_ARRAY_SIZE = 8

METAL_ATTRIBUTES: list[tuple[str, str]] = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

_TYPE_STRINGS = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float64: "double",
    mx.complex64: "complex64_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}


def type_string(dtype: mx.Dtype) -> str:
    """MLX's ``get_type_string``: the Metal spelling of a dtype in generated kernels."""
    try:
        return _TYPE_STRINGS[dtype]
    except KeyError:
        raise ValueError(f"Unsupported compilation type {dtype}") from None


@dataclass
class InputInfo:
    """How one input is passed: dtype, ndim and size decide the parameter's spelling."""

    name: str
    dtype: mx.Dtype
    ndim: int
    size: int

    @property
    def is_scalar(self) -> bool:
        return self.ndim == 0

    @property
    def is_constant(self) -> bool:
        return self.size < MAX_CONSTANT_ARRAY_SIZE


@dataclass
class Param:
    """One kernel parameter as generated: its text and what the emulator must pass for it."""

    kind: str  # "input", "shape", "strides", "ndim", "output", "attr"
    name: str
    ctype: str  # the C++ type as written in the signature (address spaces included)
    index: int = -1  # buffer index, -1 for attributes
    input_index: int = -1
    output_index: int = -1


@dataclass
class Generated:
    kernel_name: str
    source: str  # exactly what MLX generates (no prelude)
    signature_start: int  # offset of "[[kernel]]" in source
    body_start: int  # offset of the body in source
    body_end: int
    call_name: str  # kernel_name with template args, to call it
    params: list[Param] = field(default_factory=list)


def shape_infos(source: str, input_names: list[str]) -> list[tuple[bool, bool, bool]]:
    return [
        (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
        for n in input_names
    ]


def attributes(source: str) -> list[tuple[str, str]]:
    return [(a, t) for a, t in METAL_ATTRIBUTES if a in source]


def template_def(template: list[tuple[str, object]]) -> str:
    parts = []
    for _, arg in template:
        if isinstance(arg, bool):
            parts.append("1" if arg else "0")
        elif isinstance(arg, int):
            parts.append(str(arg))
        elif isinstance(arg, mx.Dtype):
            parts.append(type_string(arg))
        else:
            raise ValueError(
                f"[metal_kernel] Invalid template argument {arg!r}: must be int, bool or mx.Dtype."
            )
    return "<" + ", ".join(parts) + ">"


def template_hash(tdef: str) -> str:
    out = []
    i = 0
    while i < len(tdef):
        c = tdef[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(tdef) and tdef[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


def generate(
    name: str,
    input_names: list[str],
    output_names: list[str],
    source: str,
    header: str,
    inputs: list[InputInfo],
    output_dtypes: list[mx.Dtype],
    template: list[tuple[str, object]] | None,
    atomic_outputs: bool,
) -> Generated:
    """The full kernel source MLX would compile after its prelude, plus how to call it."""
    template = list(template or [])
    kernel_name = f"custom_kernel_{name}"
    tdef = ""
    if template:
        tdef = template_def(template)
        kernel_name += "_" + template_hash(tdef)
    for inp in inputs:
        kernel_name += "_" + type_string(inp.dtype)
        if inp.is_scalar:
            kernel_name += "s"
        elif inp.is_constant:
            kernel_name += "c"
    for dt in output_dtypes:
        kernel_name += "_" + type_string(dt)

    infos = shape_infos(source, input_names)
    attrs = attributes(source)
    params: list[Param] = []
    s = header
    if template:
        kinds = []
        for tname, arg in template:
            kind = (
                "bool" if isinstance(arg, bool) else "int" if isinstance(arg, int) else "typename"
            )
            kinds.append(f"{kind} {tname}")
        s += "template <" + ", ".join(kinds) + ">\n"
    signature_start = len(s)
    s += f"[[kernel]] void {kernel_name}(\n"
    index = 0
    for i, inp in enumerate(inputs):
        loc = "constant" if inp.is_constant else "device"
        ref = "&" if inp.is_scalar else "*"
        ctype = f"const {loc} {type_string(inp.dtype)}{ref}"
        s += f"  {ctype} {inp.name} [[buffer({index})]],\n"
        params.append(Param("input", inp.name, ctype, index, input_index=i))
        index += 1
        if inp.ndim > 0:
            has_shape, has_strides, has_ndim = infos[i]
            for flag, suffix, ctype in (
                (has_shape, "shape", "const constant int*"),
                (has_strides, "strides", "const constant int64_t*"),
                (has_ndim, "ndim", "const constant int&"),
            ):
                if flag:
                    s += f"  {ctype} {inp.name}_{suffix} [[buffer({index})]],\n"
                    params.append(
                        Param(suffix, f"{inp.name}_{suffix}", ctype, index, input_index=i)
                    )
                    index += 1
    for i, (oname, dt) in enumerate(zip(output_names, output_dtypes, strict=True)):
        t = type_string(dt)
        ctype = f"device atomic<{t}>*" if atomic_outputs else f"device {t}*"
        s += f"  {ctype} {oname} [[buffer({index})]]"
        params.append(Param("output", oname, ctype, index, output_index=i))
        if index < len(inputs) + len(output_names) - 1 or attrs:
            s += ",\n"
        else:
            s += ") {\n"
        index += 1
    for j, (attr, t) in enumerate(attrs):
        s += f"  {t} {attr} [[{attr}]]"
        s += ",\n" if j < len(attrs) - 1 else ") {\n"
        params.append(Param("attr", attr, t))
    body_start = len(s)
    s += source
    body_end = len(s)
    s += "\n}\n"
    call_name = kernel_name
    if template:
        call_name = kernel_name + tdef
        s += (
            f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] '
            f"decltype({call_name}) {call_name};\n"
        )
    return Generated(kernel_name, s, signature_start, body_start, body_end, call_name, params)
