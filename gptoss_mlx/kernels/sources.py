"""The kernel sources in `metal/*.metal`: one file per kernel family, cut into a shared header and
named kernel bodies (what `mx.fast.metal_kernel` takes as `header=` and `source=`).

A file is split at lines `// ===== header =====` and `// ===== kernel: NAME =====`; text before the
first marker is a comment for readers. The one copy in git is the top-level `metal/` folder of a
source checkout; a wheel carries it as `gptoss_mlx/metal/` (setup.py copies it at build time).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

_MARKER = re.compile(r"^// =+ (header|kernel: (\w+)) =+\s*$")
_PACKAGE = Path(__file__).resolve().parents[1]  # gptoss_mlx/


def source_dir() -> Path:
    """`metal/` of the source checkout when there is one, else the copy installed in the package."""
    for d in (_PACKAGE.parent / "metal", _PACKAGE / "metal"):
        if d.is_dir() and any(d.glob("*.metal")):
            return d
    raise FileNotFoundError(f"no Metal kernel sources next to {_PACKAGE} (metal/*.metal)")


@functools.cache
def family(name: str) -> tuple[str, dict[str, str]]:
    """(header, {kernel name: body}) of `metal/<name>.metal`."""
    text = (source_dir() / f"{name}.metal").read_text()
    header, bodies, current = [], {}, None
    for line in text.splitlines(keepends=True):
        m = _MARKER.match(line)
        if m:
            current = "header" if m.group(1) == "header" else m.group(2)
            if current != "header":
                bodies[current] = []
            continue
        if current == "header":
            header.append(line)
        elif current is not None:
            bodies[current].append(line)
    return "".join(header), {k: "".join(v) for k, v in bodies.items()}
