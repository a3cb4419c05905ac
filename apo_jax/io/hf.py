"""Hugging Face interchange: `config.json` + safetensors in and out, through the family's key table.

Reading accepts a local directory (single `model.safetensors` or sharded with
`model.safetensors.index.json`) or a hub id (fetched with `huggingface_hub`). Only safetensors
are read: pickled `.bin` checkpoints are refused, never unpickled.

Every family of `models.FAMILIES` (LLaMA, Qwen2/2.5, Qwen3, Mistral, Gemma 2, Gemma 3 text) is
read and written the same way: the family file gives the `config.json` mapping and the weight-key
table; the tensors' shapes come from the parameters the config implies (`jax.eval_shape` of
`models.init_params`). Writing produces what `transformers` loads with no missing or unexpected
keys: the family's causal-LM class (e.g. `Qwen2ForCausalLM`) for a policy (params without
`score`) and its `*ForSequenceClassification(num_labels=1)` for a reward model (params with `score`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from apo_jax import models, sharding
from apo_jax.io import fileio
from apo_jax.models import ModelConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a supported model (message names the file/key)."""


# --------------------------------------------------------------------------------------------
# The key table (`models.Family.keys`): HF key pattern ({i} = layer), our param path, layout kind.

# Keys some checkpoints carry that hold no parameters (recomputed buffers).
_IGNORED_KEYS = re.compile(r"rotary_emb\.inv_freq$")


def _hf_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The tensor shape transformers stores for one layer's parameter of our shape `ours`."""
    if kind == "same":
        return ours
    if kind == "linear":  # torch stores [out, in]
        return ours[::-1]
    if kind == "qkv":  # ours [D, heads, h]
        return (ours[1] * ours[2], ours[0])
    if kind == "o":  # ours [heads, h, D]
        return (ours[2], ours[0] * ours[1])
    if kind == "heads_bias":  # ours [heads, h]
        return (ours[0] * ours[1],)
    raise KeyError(kind)


def _to_ours(kind: str, w: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    if kind == "same":
        return w
    if kind in ("qkv", "o"):
        return w.T.reshape(ours)
    if kind == "heads_bias":
        return w.reshape(ours)
    return w.T  # "linear"


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "same":
        return w
    if kind == "qkv":
        return w.reshape(w.shape[0], -1).T
    if kind == "o":
        return w.reshape(-1, w.shape[-1]).T
    if kind == "heads_bias":
        return w.reshape(-1)
    return w.T


def param_shapes(config: ModelConfig, *, lm_head: bool, reward_head: bool) -> dict[str, Any]:
    """The parameter tree `config` implies, as ShapeDtypeStructs (nothing is allocated)."""
    return jax.eval_shape(lambda: models.init_params(config, jax.random.PRNGKey(0), lm_head=lm_head,
                                                     reward_head=reward_head))


def _entries(config: ModelConfig, shapes: Mapping[str, Any]):
    """(HF key pattern, our path, kind, our shape of one layer) for every parameter in `shapes`."""
    for hf_key, path, kind in models.family_for(config.model_type).keys:
        like = _get_path(shapes, path)
        if like is None:
            continue  # a parameter this config does not have (a bias, a q/k norm, the LM head of an RM)
        shape = tuple(like.shape[1:]) if "{i}" in hf_key else tuple(like.shape)
        yield hf_key, path, kind, shape


# --------------------------------------------------------------------------------------------
# Reading.


def _download_remote(url: str) -> str:
    """A local copy (`fileio.local_copy`) of the checkpoint directory at `url` (gs://...)."""
    if not is_saved(url):
        what = "no such checkpoint" if not fileio.exists(url) else f"no {CONFIG_NAME} with safetensors weights"
        raise CheckpointError(f"{url}: {what}")
    return fileio.local_copy(url)


def resolve_checkpoint_dir(path_or_hub_id: str) -> str:
    """A local directory for a path, `gs://` URL or hub id; hub ids go through `huggingface_hub`,
    object-store checkpoints are copied once into a local cache."""
    if fileio.is_remote(path_or_hub_id):
        return _download_remote(path_or_hub_id)
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id}: expected a checkpoint directory, found a file")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id}: no such directory, and not a valid hub id")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id=path_or_hub_id,
            allow_patterns=[CONFIG_NAME, "*.safetensors", INDEX_NAME, *TOKENIZER_FILES],
        )
    except Exception as e:  # Offline mode, no network, gated repo, typo...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            "HF_HUB_OFFLINE is set, so nothing can be downloaded; "
            if offline
            else "the hub could not be reached or the repo is not available; "
        )
        raise CheckpointError(
            f"{path_or_hub_id}: not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}). {hint}download it where you have network access and pass the local "
            f"directory instead."
        ) from None


def read_config(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, CONFIG_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing (every HF checkpoint directory has a config.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def safetensors_header(path: str) -> dict[str, Any]:
    """Tensor name -> {dtype, shape, data_offsets} of a safetensors file, from its header alone.

    Raises CheckpointError naming the file when the header is cut, not JSON, or describes
    tensors beyond the end of the file (a truncated download or copy).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: not a safetensors file (corrupt or truncated header; {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (its header is not valid JSON: {e})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v.get("data_offsets", (0, 0))[1]) for v in tensors.values() if isinstance(v, dict)), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes; its tensors need {8 + n + end})")
    return tensors


def safetensors_files(ckpt_dir: str) -> dict[str, str]:
    """Map tensor name -> file holding it (headers checked; pickled weights refused)."""
    index = os.path.join(ckpt_dir, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map' object")
        return {k: os.path.join(ckpt_dir, v) for k, v in weight_map.items()}
    single = os.path.join(ckpt_dir, WEIGHTS_NAME)
    if os.path.exists(single):
        return {k: single for k in safetensors_header(single)}
    pickled = [n for n in os.listdir(ckpt_dir) if n.endswith((".bin", ".pt", ".pth"))]
    if pickled:
        raise CheckpointError(
            f"{ckpt_dir}: holds only pickled weights ({', '.join(sorted(pickled)[:3])}); apo_jax never unpickles "
            "files. Convert them once with transformers: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
        )
    raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def load_pretrained(
    path_or_hub_id: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    adapter: str | None = None,
    lora_seed: int = 0,
    **runtime: Any,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a HF checkpoint of a supported family (`models.FAMILIES`) into (config, params).

    `runtime` sets ModelConfig's run fields (param_dtype, dtype, remat_policy, lora_*, ...); weights
    are cast to `param_dtype`. With a `mesh`, each parameter is placed on it by the rules table as
    soon as it is read, so the host holds at most one (layer-stacked) tensor at a time.
    The params hold `score` (the reward head) when the checkpoint has `score.weight`.

    `adapter`: a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`,
    as `peft`'s `save_pretrained` writes) put on top of the base: its rank, alpha and targets set
    the config's `lora_*` fields, and a reward head saved in `modules_to_save` form
    (`score.weight`) replaces the base's. Without one, `lora_rank > 0` in `runtime` adds fresh
    adapters (A kaiming-uniform from `lora_seed`, B zero: the base's outputs, unchanged).
    `quantization` ("int8", "int4", "nf4"; with adapters) stores the frozen projections quantized
    (QLoRA, `models.quant`).
    """
    quantization = runtime.pop("quantization", "")
    config, params = _load_base(path_or_hub_id, mesh=mesh, **runtime)
    if adapter is not None:
        config, params = load_adapter(adapter, config, params)
    if quantization:
        try:
            config = config.replace(quantization=quantization)
        except ValueError as e:
            raise CheckpointError(f"{path_or_hub_id}: {e}") from None
    if adapter is None and config.lora_rank:
        try:  # fresh adapters (and, with `quantization`, the base quantized: QLoRA)
            params = models.lora.add_adapters(config, params, jax.random.PRNGKey(lora_seed))
        except ValueError as e:
            raise CheckpointError(f"{path_or_hub_id}: {e}") from None
    elif quantization:
        params = models.quant.quantize_base(config, params, quantization)
    if mesh is not None and (adapter is not None or config.lora_rank):
        params = sharding.shard_tree(params, mesh)
    return config, params


def _load_base(
    path_or_hub_id: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    **runtime: Any,
) -> tuple[ModelConfig, dict[str, Any]]:
    """`load_pretrained` without an adapter: the checkpoint's own parameters."""
    ckpt_dir = resolve_checkpoint_dir(path_or_hub_id)
    hf_config = read_config(ckpt_dir)
    try:
        config = models.config_from_hf(hf_config, **runtime)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(ckpt_dir, CONFIG_NAME)}: {e}") from None
    files = safetensors_files(ckpt_dir)
    keys = set(files)
    handles: dict[str, Any] = {}

    def get(key: str) -> np.ndarray:
        fname = files[key]
        if fname not in handles:
            if not os.path.exists(fname):
                raise CheckpointError(f"{fname}: listed in {INDEX_NAME} for {key} but missing")
            safetensors_header(fname)  # a clear message for a corrupt shard, before safe_open's
            handles[fname] = safe_open(fname, framework="numpy")
        return handles[fname].get_tensor(key)

    # An LM checkpoint carries its LM head (unless tied); an RM may carry one beside `score`.
    shapes = param_shapes(config, lm_head="lm_head.weight" in keys or "score.weight" not in keys,
                          reward_head="score.weight" in keys)
    params: dict[str, Any] = {}
    used: set[str] = set()
    try:
        for hf_key, path, kind, ours in _entries(config, shapes):
            per_layer = "{i}" in hf_key
            layer_keys = [hf_key.format(i=i) for i in range(config.num_hidden_layers)] if per_layer else [hf_key]
            expected = _hf_shape(kind, ours)
            tensors = []
            for key in layer_keys:
                if key not in keys:
                    raise CheckpointError(f"{ckpt_dir}: missing tensor {key} (expected shape {list(expected)})")
                w = get(key)
                if tuple(w.shape) != expected:
                    raise CheckpointError(
                        f"{files[key]}: tensor {key} has shape {list(w.shape)}, expected {list(expected)} "
                        "from config.json"
                    )
                tensors.append(_to_ours(kind, w, ours).astype(config.weight_dtype))
                used.add(key)
            value = np.stack(tensors) if per_layer else tensors[0]
            if mesh is not None:
                axes = sharding.logical_axes_for("/".join(path), value.ndim)
                spec = sharding.logical_to_spec(axes, mesh, value.shape)
                value = jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))
            _set_path(params, path, value)
    finally:
        for h in handles.values():
            if hasattr(h, "__exit__"):
                h.__exit__(None, None, None)
    # A tied checkpoint may still store lm_head.weight (a copy of the embedding).
    unexpected = sorted(k for k in keys - used if not _IGNORED_KEYS.search(k)
                        and not (k == "lm_head.weight" and config.tie_word_embeddings))
    if unexpected:
        raise CheckpointError(
            f"{ckpt_dir}: unexpected tensors for a {config.model_type} model: {', '.join(unexpected[:5])}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    return config, params


# --------------------------------------------------------------------------------------------
# PEFT LoRA adapters.

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _adapter_keys(config: ModelConfig) -> dict[str, tuple[str, int]]:
    """Target module name -> (its HF weight key pattern with {i}, n_in), from the family's table."""
    out = {}
    for hf_key, path, _ in models.family_for(config.model_type).keys:
        if len(path) == 5 and path[-1] == "kernel" and path[3] in models.lora.LORA_MODULES:
            out[path[3]] = (hf_key, models.lora.LORA_MODULES[path[3]][1])
    return out


def load_adapter(adapter_dir: str, config: ModelConfig, params: Mapping[str, Any]
                 ) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) of a base with the PEFT LoRA adapter in `adapter_dir` on top (see
    `load_pretrained`). Options apo_jax's adapters cannot express (DoRA, rsLoRA, per-module ranks
    or alphas, a subset of layers, biases, fan_in_fan_out) are refused naming the field."""
    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    for path in (cfg_path, weights_path):
        if not os.path.exists(path):
            raise CheckpointError(f"{adapter_dir}: no {os.path.basename(path)} (not a PEFT adapter directory)")
    with open(cfg_path) as f:
        peft_cfg = json.load(f)
    if peft_cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type={peft_cfg.get('peft_type')!r}; only LORA adapters are read")
    for field, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none"),
                      ("rank_pattern", {}), ("alpha_pattern", {}), ("layers_to_transform", None)):
        value = peft_cfg.get(field)
        if not (value is None or value == ok or (isinstance(ok, dict) and not value)):
            raise CheckpointError(f"{cfg_path}: {field}={value!r} is not supported (expected {ok!r})")
    rank, alpha = int(peft_cfg["r"]), float(peft_cfg["lora_alpha"])
    tensors: dict[str, np.ndarray] = {}
    with safe_open(weights_path, framework="numpy") as f:
        for key in f.keys():
            tensors[key.replace(".default.", ".")] = f.get_tensor(key)
    keys = _adapter_keys(config)
    targets = tuple(name for name, (hf_key, _) in keys.items()
                    if _PEFT_PREFIX + hf_key.format(i=0).replace(".weight", ".lora_A.weight") in tensors)
    if not targets:
        raise CheckpointError(f"{weights_path}: no lora_A tensor of a {config.model_type} projection")
    config = config.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    try:
        models.lora.check(config)
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    params = models.lora.merge_adapters(config, params)  # an adapter already there is folded in first
    used: set[str] = set()
    model = dict(params["model"])
    layers = dict(model["layers"])
    for name in targets:
        hf_key, n_in = keys[name]
        group = models.lora.LORA_MODULES[name][0]
        shape = models.lora.module_shape(config, name)
        a_layers, b_layers = [], []
        for i in range(config.num_hidden_layers):
            base = _PEFT_PREFIX + hf_key.format(i=i)
            a_key, b_key = base.replace(".weight", ".lora_A.weight"), base.replace(".weight", ".lora_B.weight")
            for key, want in ((a_key, (rank, int(np.prod(shape[:n_in])))), (b_key, (int(np.prod(shape[n_in:])), rank))):
                if key not in tensors:
                    raise CheckpointError(f"{weights_path}: missing {key} (adapters on every layer are required)")
                if tuple(tensors[key].shape) != want:
                    raise CheckpointError(f"{weights_path}: {key} has shape {list(tensors[key].shape)}, expected "
                                          f"{list(want)}")
                used.add(key)
            a_layers.append(tensors[a_key].T.reshape(shape[:n_in] + (rank,)))
            b_layers.append(tensors[b_key].T.reshape((rank,) + shape[n_in:]))
        grp = dict(layers[group])
        grp[name] = dict(grp[name], lora_a=np.stack(a_layers).astype(np.float32),
                         lora_b=np.stack(b_layers).astype(np.float32))
        layers[group] = grp
    model["layers"] = layers
    params["model"] = model
    score_key = _PEFT_PREFIX + "score.weight"
    if score_key in tensors:
        w = tensors[score_key]
        if tuple(w.shape) != (1, config.hidden_size):
            raise CheckpointError(f"{weights_path}: {score_key} has shape {list(w.shape)}, expected "
                                  f"[1, {config.hidden_size}]")
        params["score"] = {"kernel": w.T.astype(np.float32)}
        used.add(score_key)
    elif "score" in params:
        params["score"] = {"kernel": np.asarray(sharding.to_host(params["score"]["kernel"]), np.float32)}
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise CheckpointError(f"{weights_path}: tensors apo_jax cannot place: {', '.join(unexpected[:5])}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    return config, params


def save_adapter(path: str, config: ModelConfig, params: Mapping[str, Any], *,
                 base_model_name_or_path: str | None = None) -> str:
    """Writes the LoRA adapters of `params` (and a reward head, in PEFT's `modules_to_save` form)
    as a PEFT adapter directory that `peft.PeftModel.from_pretrained(base, path)` loads: the base
    is the family's causal-LM class for a policy, its `*ForSequenceClassification(num_labels=1)`
    for a reward model. Tensors are float32. Every process must call it; process 0 writes."""
    if not models.lora.has_adapters(params):
        raise CheckpointError(f"{path}: the params hold no LoRA adapters (lora.rank is 0?)")
    keys = _adapter_keys(config)
    tensors: dict[str, np.ndarray] = {}
    targets, rank = [], None
    for name, (hf_key, n_in) in keys.items():
        group = models.lora.LORA_MODULES[name][0]
        mod = _get_path(params, ("model", "layers", group, name))
        if mod is None or "lora_a" not in mod:
            continue
        targets.append(name)
        a = np.asarray(sharding.to_host(mod["lora_a"]), np.float32)
        b = np.asarray(sharding.to_host(mod["lora_b"]), np.float32)
        rank = a.shape[-1]
        for i in range(config.num_hidden_layers):
            base = _PEFT_PREFIX + hf_key.format(i=i)
            tensors[base.replace(".weight", ".lora_A.weight")] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            tensors[base.replace(".weight", ".lora_B.weight")] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    is_rm = _get_path(params, ("score", "kernel")) is not None
    if is_rm:
        tensors[_PEFT_PREFIX + "score.weight"] = np.ascontiguousarray(
            np.asarray(sharding.to_host(params["score"]["kernel"]), np.float32).T)
    if jax.process_index() != 0:
        return path
    peft_cfg = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if is_rm else "CAUSAL_LM", "r": int(rank),
        "lora_alpha": config.lora_alpha, "lora_dropout": 0.0, "target_modules": sorted(targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": ["score"] if is_rm else None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path, "rank_pattern": {}, "alpha_pattern": {},
    }
    out = fileio.path(path)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apo_jax-adapter-") as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (out / ADAPTER_WEIGHTS_NAME).write_bytes(open(os.path.join(tmp, ADAPTER_WEIGHTS_NAME), "rb").read())
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2, sort_keys=True))
    return path


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


# --------------------------------------------------------------------------------------------
# Writing.


def save_pretrained(
    path: str,
    config: ModelConfig,
    params: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 1024**3,
    reward_position: str = "last_token",
    prompt_format: str = "hh",
    reward_stats: dict[str, float] | None = None,
) -> str:
    """Writes `config.json` + safetensors (sharded above `max_shard_bytes`) that transformers loads.

    Params with a `score` head are written as the family's `*ForSequenceClassification(num_labels=1)`
    (the LM head, if any, is left out); otherwise as its causal-LM class (`LlamaForCausalLM`, ...). Tensors keep the dtype
    of `config.param_dtype`. The directory is written under a temporary name and renamed into
    place, so an interrupted save never leaves a half-written checkpoint at `path`. In a
    multi-process run every process must call this (arrays are gathered) and only process 0 writes.

    A reward model with a `tokenizer` is written so that the standard transformers usage,
    `model(**tokenizer(prompt + " " + response, return_tensors="pt"))` (single or `padding=True`
    batches), scores what apo_jax scores: `config.json`'s `pad_token_id` is the tokenizer's pad id
    (transformers pools the last non-pad token), and with `reward_position="eos"` the tokenizer's
    post-processor appends EOS, as apo_jax's RM inputs do (see `export_tokenizer`). The RM's
    scoring settings (`reward_position`, `prompt_format`: the run's `data.*`) are recorded in
    `apo_jax_scoring.json`, which `evaluation.score_texts` follows, with `reward_stats`
    ({reward_mean, reward_std, reward_count}) when given (`score_texts(normalize=True)`).
    Files are readable by other users (0644/0755 under the usual umask).
    """
    if reward_position not in REWARD_POSITIONS:
        raise ValueError(f"reward_position: {reward_position!r}; expected one of {REWARD_POSITIONS}")
    # LoRA adapters folded into their kernels, a quantized (QLoRA) base dequantized.
    params = models.quant.dequantize_tree(models.lora.merge_adapters(config, params))
    is_rm = _get_path(params, ("score", "kernel")) is not None
    family = models.family_for(config.model_type)
    try:
        hf_config = models.config_to_hf(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot export: {e}") from None
    tensors: dict[str, np.ndarray] = {}
    for hf_key, tree_path, kind, _ in _entries(config, param_shapes(config, lm_head=not is_rm, reward_head=is_rm)):
        value = _get_path(params, tree_path)
        if value is None:
            raise CheckpointError(f"params lack {'/'.join(tree_path)} needed for {hf_key}")
        value = sharding.to_host(value).astype(config.weight_dtype)
        if "{i}" in hf_key:
            for i in range(config.num_hidden_layers):
                tensors[hf_key.format(i=i)] = np.ascontiguousarray(_to_hf(kind, value[i]))
        else:
            tensors[hf_key] = np.ascontiguousarray(_to_hf(kind, value))
    if jax.process_index() != 0:
        return path

    if is_rm:
        hf_config.update(
            architectures=[family.sequence_classification],
            num_labels=1,
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
            problem_type="regression",
        )
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is not None:
            hf_config["pad_token_id"] = int(pad)  # the id the exported tokenizer pads with
        elif config.pad_token_id is None:
            logging.warning("%s: reward model exported without pad_token_id; HF pools the last token", path)
        if reward_position == "eos" and tokenizer is not None and pad is not None and pad in config.eos_token_ids:
            logging.warning("%s: pad == EOS (%d) with data.reward_position='eos': transformers pools the last "
                            "non-pad token, before the EOS, so its scores differ from apo_jax's; use 'last_token'",
                            path, pad)
    scoring = {"reward_position": reward_position, "prompt_format": prompt_format} if is_rm else None
    if scoring is not None and reward_stats:
        scoring.update(reward_stats)
    if fileio.is_remote(path):
        return _save_remote(path, hf_config, tensors, tokenizer, max_shard_bytes, scoring)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        _write_shards(tmp, tensors, max_shard_bytes)
        if tokenizer is not None:
            export_tokenizer(tokenizer, tmp, scoring=scoring)
        _readable_by_all(tmp)
        if os.path.exists(path):
            backup = path.rstrip("/") + ".old"
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _save_remote(path: str, hf_config: dict, tensors: Mapping[str, np.ndarray], tokenizer: Any,
                 max_shard_bytes: int, scoring: dict[str, str] | None = None) -> str:
    """`save_pretrained` to object storage: written locally, then uploaded with config.json last.

    Object stores have no directory rename; `is_saved` (config.json and the weights present)
    is what marks the export complete, and an old export is removed before the upload starts.
    """
    target = fileio.path(path)
    with tempfile.TemporaryDirectory(prefix="apo_jax-export-") as tmp:
        _write_shards(tmp, tensors, max_shard_bytes)
        if tokenizer is not None:
            export_tokenizer(tokenizer, tmp, scoring=scoring)
        if target.exists():
            target.rmtree()
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                (target / name).write_bytes(f.read())
        (target / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    return path


REWARD_POSITIONS = ("last_token", "eos")


SCORING_NAME = "apo_jax_scoring.json"  # an RM export's scoring settings (read by evaluation.score_texts)


def export_tokenizer(tokenizer: Any, out_dir: str, *, scoring: dict[str, str] | None = None) -> None:
    """`tokenizer.save_pretrained(out_dir)`, loadable by transformers 4 and 5 alike.

    transformers 5 records its own generic class name ("TokenizersBackend"), unknown to
    transformers 4; "PreTrainedTokenizerFast" loads the same tokenizer.json under both, and
    `model_input_names` keeps transformers 4 from adding `token_type_ids` (LLaMA takes none).
    For a reward model, `scoring` ({reward_position, prompt_format}) is written beside it, and
    with reward_position "eos" a template that appends EOS is chained to the post-processor
    (after BOS etc.), so plain `tokenizer(text)` gives the `... [EOS]` inputs the RM was trained on.
    """
    tokenizer.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            tok_config = json.load(f)
        before = dict(tok_config)
        if tok_config.get("tokenizer_class") == "TokenizersBackend":
            tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        # transformers 4's generic fast tokenizer also returns token_type_ids, which LLaMA refuses.
        tok_config["model_input_names"] = ["input_ids", "attention_mask"]
        if tok_config != before:
            with open(config_path, "w") as f:
                json.dump(tok_config, f, indent=2, sort_keys=True)
                f.write("\n")
    if scoring is None:
        return
    with open(os.path.join(out_dir, SCORING_NAME), "w") as f:
        json.dump(scoring, f, indent=1, sort_keys=True)
    if scoring["reward_position"] == "eos":
        import tokenizers

        tok_path = os.path.join(out_dir, "tokenizer.json")
        eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
        if eos is None or not os.path.exists(tok_path):
            raise CheckpointError(f"{out_dir}: cannot make the tokenizer append EOS (no EOS token or no tokenizer.json)")
        core = tokenizers.Tokenizer.from_file(tok_path)
        template = tokenizers.processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, eos_id)])
        old = core.post_processor
        core.post_processor = tokenizers.processors.Sequence([old, template]) if old is not None else template
        core.save(tok_path)


def _readable_by_all(directory: str) -> None:
    """Dirs 0777 and files 0666 less the umask (tempfile made the dir 0700)."""
    umask = os.umask(0o022)
    os.umask(umask)
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def is_saved(path: str) -> bool:
    """Whether `path` (local or gs://) holds a complete `save_pretrained` export."""
    target = fileio.path(path)
    return (target / CONFIG_NAME).exists() and any(
        (target / name).exists() for name in (WEIGHTS_NAME, INDEX_NAME))


def _write_shards(out_dir: str, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    metadata = {"format": "pt"}  # transformers expects this marker
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, WEIGHTS_NAME), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in tensors.values())
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


