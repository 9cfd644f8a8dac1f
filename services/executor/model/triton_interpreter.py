"""Runs the Triton kernels on CPU tensors, through Triton's interpreter: how CI tests them.

Call `use_interpreter()` before `triton_attention` is imported: `triton.jit` picks the
interpreter when it decorates a kernel. The interpreter of triton 3.6 turns a scalar
derived from `program_id` into a one-element array and a loop bound into a Python int with
`int(array)`, which numpy >= 2.4 refuses for arrays of one dimension; the patch reads it
with `.item()` instead. Nothing changes for a compiled kernel.
"""

from __future__ import annotations

import os
from typing import Any

INTERPRET = "TRITON_INTERPRET"


def use_interpreter() -> None:
    os.environ[INTERPRET] = "1"
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "fastswitch_patched", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.fastswitch_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched
