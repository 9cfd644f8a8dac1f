"""The executor's named choices, importable without torch: what its flags, and those of
the launchers and benchmarks that start it, offer."""

from __future__ import annotations

from typing import Literal

Backend = Literal["cpu", "cupy"]
BACKENDS: tuple[Backend, ...] = ("cpu", "cupy")  # where the model and its KV cache live

AUTO_DTYPE = "auto"  # the dtype the checkpoint's config names (float32 if none)
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # torch dtypes, by name, of weights and KV
