"""Stage 5 — render WGSL: each kernel dataclass through its jinja2 template in shaders/.

The rendered file starts with a header comment listing the kernel's compile-time fields and its uniform layout, so a
reader of the .wgsl sees exactly what was baked in. KILN_DEBUG=1 prints every rendered shader.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import jinja2

from .kernels import Kernel

SHADER_DIR = Path(__file__).resolve().parent.parent / "shaders"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(SHADER_DIR)),
    undefined=jinja2.StrictUndefined,   # a typo in a template is an error, not an empty string
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def render(kernel: Kernel) -> str:
    body = _env.get_template(f"{kernel.template}.wgsl.j2").render(**kernel.context())
    header = [f"// kiln kernel {kernel.name} (from shaders/{kernel.template}.wgsl.j2)"]
    header += [f"//   {k} = {v!r}" for k, v in asdict(kernel).items()]
    header.append("//   uniform Params { " + ", ".join(f"{n}: {t}" for n, t in kernel.params) + " }")
    header.append("//   bindings: 0 State, 1 Params, " + ", ".join(
        f"{i + 2} {n} ({a})" for i, (n, a) in enumerate(kernel.bindings())))
    src = "\n".join(header) + "\n" + _squeeze_blank_lines(body)
    if os.environ.get("KILN_DEBUG"):
        print(src)
    return src


def _squeeze_blank_lines(s: str) -> str:
    out, blank = [], False
    for line in s.splitlines():
        if not line.strip():
            if not blank:
                out.append("")
            blank = True
        else:
            out.append(line.rstrip())
            blank = False
    return "\n".join(out).strip("\n") + "\n"
