"""LoRA against `peft` (PyTorch): adapters in and out in PEFT's format, the merged export, the train
step's update restricted to the adapters, and the compiled memory of LoRA steps."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

import transformers  # noqa: E402

from apo_jax import hf, models, sharding  # noqa: E402
from apo_jax.training import objectives, train  # noqa: E402
from tests.family_fixtures import random_model  # noqa: E402
from tests.hf_fixtures import padded_batch, torch_logits, torch_rewards  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _peft_model(family: str, reward: bool, seed: int = 0):
    """A random tiny model of `family` and a random, non-zero LoRA adapter on it (B random too)."""
    base = random_model(family, reward=reward, seed=seed)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                           task_type="SEQ_CLS" if reward else "CAUSAL_LM")
    model = peft.get_peft_model(base, lcfg).eval()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # peft's random B is small; scale it up so the adapter clearly moves outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return base, model


def _save_base(family: str, reward: bool, path, seed: int = 0) -> None:
    random_model(family, reward=reward, seed=seed).save_pretrained(path, safe_serialization=True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_adapter_loads_with_equal_logits_and_rewards(family, tmp_path):
    ids, mask = padded_batch(3, 9, 97, "left", seed=1)
    for reward in (False, True):
        base_dir, ad_dir = tmp_path / f"base{reward}", tmp_path / f"ad{reward}"
        _save_base(family, reward, base_dir)
        _, pm = _peft_model(family, reward)
        pm.save_pretrained(ad_dir)
        config, params = hf.load_pretrained(str(base_dir), adapter=str(ad_dir))
        assert config.lora_rank == 4 and config.lora_alpha == 8.0 and set(config.lora_targets) == set(TARGETS)
        assert models.lora.has_adapters(params)
        if reward:
            want = torch_rewards(pm, ids, mask)
            got = np.asarray(models.rewards(config, params, ids, mask))
            base_out = torch_rewards(random_model(family, reward=True), ids, mask)
        else:
            want = torch_logits(pm, ids, mask)
            got = np.asarray(models.lm_logits(config, params, ids, mask))
            base_out = torch_logits(random_model(family), ids, mask)
        real = mask.astype(bool) if not reward else slice(None)
        assert np.abs(want - base_out)[real].max() > 1e-2  # the adapter matters
        np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_exported_adapter_and_merged_model_load_in_peft_and_transformers(tmp_path):
    """apo_jax's adapter (trained adapters and head: random values here) loads in peft with equal
    rewards; the merged export equals base + adapter in plain transformers."""
    ids, mask = padded_batch(3, 9, 97, "right", seed=2)
    base_dir = tmp_path / "base"
    _save_base("llama", True, base_dir)
    config, params = hf.load_pretrained(str(base_dir), lora_rank=4, lora_alpha=8.0, lora_targets=tuple(TARGETS))
    assert np.all(np.asarray(params["model"]["layers"]["attn"]["q_proj"]["lora_b"]) == 0)  # fresh: B = 0
    rng = iter(jax.random.split(jax.random.PRNGKey(3), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.2 * jax.random.normal(next(rng), x.shape) if "lora_" in sharding.path_str(p)
                      or "score" in sharding.path_str(p) else x), params)
    ours = np.asarray(models.rewards(config, params, ids, mask))
    hf.save_adapter(str(tmp_path / "adapter"), config, params)
    pm = peft.PeftModel.from_pretrained(random_model("llama", reward=True), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(torch_rewards(pm, ids, mask), ours, atol=1e-4, rtol=1e-4)
    # Round trip through apo_jax too.
    _, back = hf.load_pretrained(str(base_dir), adapter=str(tmp_path / "adapter"))
    np.testing.assert_allclose(np.asarray(models.rewards(config, back, ids, mask)), ours, atol=1e-6)
    hf.save_pretrained(str(tmp_path / "merged"), config, params)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    np.testing.assert_allclose(torch_rewards(merged, ids, mask), ours, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        pm_merged = pm.merge_and_unload()
        sd = pm_merged.state_dict()
        for k, v in merged.state_dict().items():
            np.testing.assert_allclose(v.numpy(), sd[k].numpy(), atol=1e-6, err_msg=k)


def _tiny(**lora) -> models.ModelConfig:
    return models.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, **lora)


def _mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def test_lora_train_step_is_sgd_on_the_adapters_and_keeps_the_base_bit_identical():
    """A LoRA step with plain SGD-like Adam at step 1 (update = -lr * sign(g) for Adam's first
    step with eps -> 0) against the hand-computed gradient of the adapters and head: the loss's
    gradient through `jax.grad` of the reference merged forward W + s A B (no LoRA code path)."""
    cfg = _tiny(lora_rank=2, lora_alpha=4.0, lora_targets=("q_proj", "down_proj"))
    base_cfg = _tiny()
    params = models.init_params(cfg, jax.random.PRNGKey(0), lm_head=False, reward_head=True, reward_head_std=0.1)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 16))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if "lora_b" in sharding.path_str(p) else x, params)
    ids, mask = padded_batch(4, 7, 64, "right", seed=3)
    ids2, mask2 = padded_batch(4, 7, 64, "right", seed=4)
    batch = {"chosen_ids": ids, "chosen_mask": mask, "rejected_ids": ids2, "rejected_mask": mask2,
             "weight": np.ones(4, np.float32), "is_apo": np.zeros(4, np.int32)}
    obj = objectives.get("ranking")
    opt = train.OptimizerConfig(lr=1e-2, warmup_steps=0, total_steps=10, schedule="constant", grad_clip=0.0,
                                eps=1e-12)
    mesh = _mesh()
    state = train.init_state(cfg, params, opt, mesh)
    assert set(state.params) == {"model", "score"} and "embed" not in state.params["model"]
    assert not jax.tree_util.tree_leaves(state.opt_state[0].mu["model"]["layers"]["attn"]["q_proj"].get("kernel", []))
    step = train.make_train_step(cfg, obj, opt, mesh)
    before = jax.device_get(state.params)  # the step donates the state
    frozen = state.frozen
    new, metrics = step(state, jax.device_get(batch))

    # The reference: a plain model (no adapters) whose kernels are W + s A B, differentiated by autodiff.
    def loss(trainable):
        full = models.lora.combine(trainable, frozen)
        plain = models.lora.merge_adapters(cfg, full)
        s = obj.stats(base_cfg, plain, batch)
        return s["loss_num"] / s["loss_den"]

    g = jax.jit(jax.grad(loss))(before)
    want = jax.tree_util.tree_map(lambda p, gi: p - 1e-2 * jnp.sign(gi), before, g)
    got = jax.device_get(new.params)
    for (path, w), gg in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(gg, w, atol=1e-6, err_msg=sharding.path_str(path))
    assert float(metrics["finite"]) == 1.0
    frozen_before = jax.device_get(models.lora.split(cfg, params)[1])
    for a, b in zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(jax.device_get(new.frozen))):
        assert np.array_equal(a, b)
    full = train.model_params(new)
    assert full["model"]["embed"]["embedding"] is new.frozen["model"]["embed"]["embedding"]


@pytest.mark.parametrize("bad, message", [
    (dict(lora_targets="mlp/nothing"), "matches no projection"),
    (dict(lora_targets=("q_proj", "w_proj")), "not projections of the decoder"),
    (dict(lora_rank=40), "larger than"),
])
def test_bad_lora_settings_are_one_line_at_start_up(bad, message):
    targets = bad.get("lora_targets", ("q_proj",))
    with pytest.raises(ValueError, match=message) as e:
        names = models.lora.resolve_targets(targets)
        models.lora.check(_tiny(lora_rank=bad.get("lora_rank", 2), lora_targets=names))
    assert "\n" not in str(e.value)


def test_targets_by_regex_and_sharding_rules_cover_adapters():
    assert models.lora.resolve_targets(r"attn/(q|v)_proj") == ("q_proj", "v_proj")
    assert models.lora.resolve_targets("all-linear") == tuple(models.lora.LORA_MODULES)
    cfg = _tiny(lora_rank=2, lora_targets=models.lora.resolve_targets("all-linear"))
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))
    sharding.tree_shardings(params, _mesh())  # every adapter has a rule (an unmatched one raises)
    with pytest.raises(sharding.ShardingRuleError):
        sharding.tree_shardings({"model": {"layers": {"attn": {"q_proj": {"lora_c": jnp.zeros((2, 3))}}}}}, _mesh())
    gen = jax.eval_shape(lambda p: models.params_for_generation(cfg, p), params)
    assert not models.lora.has_adapters(gen)  # sampling runs the merged weights


def _step_memory(cfg: models.ModelConfig, task: str) -> tuple[int, int]:
    """(temp, argument) bytes of the compiled train step of `task` ("rm" or "sft") at a small shape."""
    T, B = 64, 4
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0), lm_head=task == "sft",
                                                       reward_head=task == "rm"))
    trained, frozen = train.trainable_params(cfg, params)
    opt = train.OptimizerConfig(lr=1e-5, total_steps=10)
    state = train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trained,
                             opt_state=jax.eval_shape(train.make_optimizer(opt).init, trained), frozen=frozen)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    f32 = jax.ShapeDtypeStruct((B,), jnp.float32)
    if task == "rm":
        batch = {"chosen_ids": ids, "chosen_mask": ids, "rejected_ids": ids, "rejected_mask": ids,
                 "weight": f32, "is_apo": jax.ShapeDtypeStruct((B,), jnp.int32)}
        obj = objectives.get("ranking")
    else:
        batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids, "weight": f32}
        obj = objectives.get("sft")
    step = train.make_train_step(cfg, obj, opt, _mesh())
    compiled = step.jitted(state, batch).lower(*step.lower_args(state, batch)).compile()
    mem = compiled.memory_analysis()
    return mem.temp_size_in_bytes, mem.argument_size_in_bytes


@pytest.mark.parametrize("task", ["rm", "sft"])
def test_lora_steps_use_the_memory_the_arithmetic_predicts(task):
    """Full fine-tuning holds float32 params + 2 Adam moments as arguments and a float32 gradient
    of every weight as temporaries (~16 bytes a parameter); LoRA (rank 4 on every projection)
    holds them for the adapters only, with the frozen base as an argument (4 bytes a parameter).
    Predicted: arguments ~ 12 P -> 4 P + 12 p_lora, temporaries shrink by the gradient's 4 P."""
    shape = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4)
    full = models.ModelConfig(**shape)
    lora = models.ModelConfig(**shape, lora_rank=4, lora_targets=tuple(models.lora.LORA_MODULES))
    params = jax.eval_shape(lambda: models.init_params(lora, jax.random.PRNGKey(0), lm_head=task == "sft",
                                                       reward_head=task == "rm"))
    n_train, n_all = models.lora.count(lora, params)
    n_base = n_all - n_train
    full_temp, full_args = _step_memory(full, task)
    lora_temp, lora_args = _step_memory(lora, task)
    # Arguments: everything in float32, params + mu + nu.
    assert abs(full_args - 12 * n_base) < 0.02 * full_args
    assert abs(lora_args - (4 * n_base + 12 * n_train)) < 0.02 * lora_args
    # Temporaries: the full step's include a float32 gradient of every weight (4 P; measured on CPU,
    # jax 0.10.2: 3.1 P for the RM step, part of it written straight into the donated outputs).
    assert full_temp - lora_temp > 0.6 * 4 * n_base
    print(f"{task}: full args {full_args / 2**20:.2f} MiB temp {full_temp / 2**20:.2f} MiB; "
          f"lora args {lora_args / 2**20:.2f} MiB temp {lora_temp / 2**20:.2f} MiB; "
          f"trainable {n_train} of {n_all}")


def test_lora_step_checkpoints_hold_no_base_and_resume_bit_exactly(tmp_path):
    """Steps 1-4 in one go against steps 1-2, a save, a restore into a fresh state and steps 3-4:
    bit-identical params and optimizer state; the saved state holds the adapters and head only."""
    from apo_jax.io import checkpointing

    cfg = _tiny(lora_rank=2, lora_targets=("q_proj", "up_proj"))
    params = models.init_params(cfg, jax.random.PRNGKey(0), lm_head=False, reward_head=True, reward_head_std=0.1)
    opt = train.OptimizerConfig(lr=1e-2, total_steps=4)
    mesh = _mesh()
    step = train.make_train_step(cfg, objectives.get("ranking"), opt, mesh)
    batches = []
    for i in range(4):
        ids, mask = padded_batch(4, 7, 64, "right", seed=10 + i)
        ids2, mask2 = padded_batch(4, 7, 64, "left", seed=20 + i)
        batches.append({"chosen_ids": ids, "chosen_mask": mask, "rejected_ids": ids2, "rejected_mask": mask2,
                        "weight": np.ones(4, np.float32), "is_apo": np.zeros(4, np.int32)})
    state = train.init_state(cfg, params, opt, mesh)
    for b in batches:
        state, _ = step(state, b)
    want = jax.device_get((state.params, state.opt_state))

    ckpt = checkpointing.TrainCheckpointer(str(tmp_path / "ckpt"), save_every=2, async_save=False)
    state = train.init_state(cfg, params, opt, mesh)
    for b in batches[:2]:
        state, _ = step(state, b)
    ckpt.save(2, state, {"pos": 2})
    ckpt.wait()
    saved = jax.tree_util.tree_leaves(ckpt._manager.item_metadata(2)["state"])
    assert sum(np.prod(x.shape) for x in saved) < 0.2 * sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    state, data = ckpt.restore(2, train.init_state(cfg, params, opt, mesh))
    assert data == {"pos": 2} and state.frozen is not None
    for b in batches[2:]:
        state, _ = step(state, b)
    got = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        assert np.array_equal(a, b)
    ckpt.close()


@pytest.mark.e2e
def test_game_with_lora_on_both_sides(tmp_path):
    """One round of the APO arm on the tiny synthetic world with LoRA on the policy and every RM:
    it runs, the phases that continue a model (rm_apo_r1 from rm_base, policy_apo_r1 from
    policy_0) keep its frozen base and are stored as adapters + head only, and the export writes
    the PEFT adapter beside the merged model (their loading in peft/transformers: the tests above)."""
    from apo_jax.game import loop
    from tests.loop_fixtures import tiny_config

    run_dir = str(tmp_path / "run")
    cfg = tiny_config(run_dir=run_dir, apo__rounds=1, apo__schedules=("apo",), policy__lora__rank=2,
                      rm__lora__rank=2, rm__lora__targets="q_proj,v_proj", policy__pretrain__max_steps=2,
                      rm__base__max_steps=2, rm__test__max_steps=2, rm__apo__max_steps=2, sft__max_steps=2)
    loop.run(cfg)
    import json
    with open(f"{run_dir}/loop_state.json") as f:
        done = json.load(f)["done"]
    bases = {k.split(":", 1)[1]: v.get("base") for k, v in done.items() if k.startswith("model:")}
    assert bases["rm_apo_r1"] == "rm_base" and bases["policy_apo_r1"] == "policy_0", bases
    du = lambda name: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(f"{run_dir}/models/{name}")  # noqa: E731
                          for f in fs)
    assert du("rm_apo_r1") < 0.5 * du("rm_base")
    assert os.path.exists(f"{run_dir}/export/rm_apo_r1_adapter/adapter_config.json")


# Quantization error of the logits relative to their largest magnitude, at this tiny shape (D = 32:
# every 64-row block is a whole input axis): int8 absmax ~0.4% of a kernel's range, 4-bit ~7-10%.
QUANT_TOLERANCE = {"int8": 0.02, "int4": 0.25, "nf4": 0.25}


@pytest.mark.parametrize("qtype", ["int8", "nf4", "int4"])
def test_qlora_base_logits_are_the_dense_ones_within_the_quantization_tolerance(qtype, tmp_path):
    """A PEFT adapter on a quantized base: logits close to peft's on the dense base (the tolerance
    above), the adapter's contribution exact (quantized base + adapter - quantized base equals
    peft's adapted - dense base), and the projections held in the quantized width."""
    ids, mask = padded_batch(3, 9, 97, "right", seed=5)
    base_dir, ad_dir = tmp_path / "base", tmp_path / "ad"
    _save_base("llama", False, base_dir)
    _, pm = _peft_model("llama", False)
    pm.save_pretrained(ad_dir)
    config, params = hf.load_pretrained(str(base_dir), adapter=str(ad_dir), quantization=qtype)
    assert config.quantization == qtype
    kernel = params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert models.quant.is_quantized(kernel) and kernel.qvalue.dtype != jnp.float32
    got = np.asarray(models.lm_logits(config, params, ids, mask))
    want = torch_logits(pm, ids, mask)
    real = mask.astype(bool)
    err = np.abs(got - want)[real].max() / np.abs(want[real]).max()
    assert err < QUANT_TOLERANCE[qtype], err
    no_adapter = models.lora.combine({}, models.lora.split(config, params)[1])
    no_adapter["lm_head"] = params["lm_head"]
    plain = np.asarray(models.lm_logits(config.replace(lora_rank=0, quantization="", lora_targets=()),
                                        no_adapter, ids, mask))
    base_logits = torch_logits(random_model("llama"), ids, mask)
    np.testing.assert_allclose((got - plain)[real], (want - base_logits)[real],
                               atol=0.1 * np.abs(want - base_logits)[real].max())
    dense = hf.load_pretrained(str(base_dir))[1]
    ratio = models.quant.nbytes(kernel) / models.quant.nbytes(dense["model"]["layers"]["mlp"]["up_proj"]["kernel"])
    assert ratio < (0.3 if qtype == "int8" else 0.2), ratio


def test_qlora_train_step_trains_adapters_over_a_frozen_quantized_base_and_the_store_restores_it(tmp_path):
    from apo_jax.io import checkpointing

    cfg = _tiny(lora_rank=2, lora_targets=("q_proj", "v_proj"), quantization="nf4")
    params = models.init_params(cfg, jax.random.PRNGKey(0), lm_head=False, reward_head=True, reward_head_std=0.1)
    assert models.quant.is_quantized(params["model"]["layers"]["attn"]["q_proj"]["kernel"])
    ids, mask = padded_batch(4, 7, 64, "right", seed=3)
    ids2, mask2 = padded_batch(4, 7, 64, "right", seed=4)
    batch = {"chosen_ids": ids, "chosen_mask": mask, "rejected_ids": ids2, "rejected_mask": mask2,
             "weight": np.ones(4, np.float32), "is_apo": np.zeros(4, np.int32)}
    opt = train.OptimizerConfig(lr=1e-2, total_steps=4)
    mesh = _mesh()
    step = train.make_train_step(cfg, objectives.get("ranking"), opt, mesh)
    state = train.init_state(cfg, params, opt, mesh)
    b0 = np.asarray(state.params["model"]["layers"]["attn"]["q_proj"]["lora_b"])
    for _ in range(2):
        state, m = step(state, batch)
    assert float(m["finite"]) == 1.0
    assert np.abs(np.asarray(state.params["model"]["layers"]["attn"]["q_proj"]["lora_b"]) - b0).max() > 0
    q_before = params["model"]["layers"]["attn"]["q_proj"]["kernel"]
    q_after = state.frozen["model"]["layers"]["attn"]["q_proj"]["kernel"]
    assert np.array_equal(np.asarray(q_before.qvalue), np.asarray(q_after.qvalue))
    # The finished model through Orbax (what the run store does), restored into init_params' layout.
    full = train.model_params(state)
    store = checkpointing.ModelStore(str(tmp_path / "models"))
    store.save("m", full)
    like = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0), lm_head=False, reward_head=True))
    back = store.load("m", like)
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    store.close()


def test_a_run_config_with_bad_lora_fields_fails_at_start_up_naming_each():
    import runpy

    from apo_jax import config as config_lib

    c = runpy.run_path("configs/hh_qlora_t4.py")["get_config"]()
    config_lib.validate(c, 1)  # the shipped LoRA configs are valid
    config_lib.validate(runpy.run_path("configs/hh_lora.py")["get_config"](), 1)
    c.policy.lora.targets = "mlp/nothing"
    c.rm.lora.rank = 0  # quantization without adapters
    c.policy.lora.dropout = 0.1
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, 1)
    fields = [line.strip().split(":")[0] for line in str(e.value).splitlines()[1:]]
    assert fields == ["policy.lora.dropout", "policy.lora.targets", "rm.lora.quantization"], fields
