"""The losses of APO's learning rules as pure functions (paper eqs. 1, 6, 13-15).

Each loss comes in two forms: a public mean (`bt_ranking_loss`, `apo_rm_loss`, `sft_loss`) and a
`*_stats` form that returns *sums* (numerator, denominator and metric totals). Train steps
accumulate the sums over micro-batches and divide once, so k micro-batches give exactly the loss
and gradient of one big batch.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

Stats = dict[str, jax.Array]
SFT_NORMALIZE = ("token", "sequence")


def bt_ranking_loss(r_good: jax.Array, r_bad: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Bradley-Terry ranking loss -E[log sigmoid(r_good - r_bad)] (eq. 1 / 13).

    With `weights` [B], the weighted mean sum_i w_i l_i / sum_i w_i (zero-weight rows ignored).
    """
    nll = -jax.nn.log_sigmoid(r_good.astype(jnp.float32) - r_bad.astype(jnp.float32))
    if weights is None:
        return jnp.mean(nll)
    w = weights.astype(jnp.float32)
    return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)


def rm_stats(
    r_good: jax.Array,
    r_bad: jax.Array,
    is_apo: jax.Array,
    weight: jax.Array,
    *,
    apo_weight: float,
    human_weight: float,
    margin: jax.Array | None = None,
    center_coef: float = 0.0,
) -> Stats:
    """Sums for the APO-RM objective (eq. 15) on a mixed batch of APO and human pairs.

    Each pair's loss is scaled by `apo_weight` (gold-vs-sample pairs) or `human_weight` (human
    pairs) and by its row `weight` (0 for filler rows); the loss is the sum of scaled losses over
    the sum of row weights. That is the official code's form (weights 0.1/S and 1 on one
    concatenated dataset); the paper's L_rank(D_APO) + beta2 L_rank(D_P) is apo_weight=1,
    human_weight=beta2, up to the ratio of the two sets' sizes in the mixture.

    Options (off by default): `margin` [B], a per-pair margin m inside the BT term,
    -log sigmoid(r_good - r_bad - m) (Llama 2's / TRL's / OpenRLHF's margin loss); `center_coef`
    c > 0 adds c * (r_good + r_bad)^2 per pair (TRL's `center_rewards_coefficient`:
    c * mean((r_chosen + r_rejected)^2), the mean over the row weights here, so with unit weights
    it is TRL's term exactly), which pins the rewards' mean near zero. Accuracy and the metrics
    keep reading r_good - r_bad.
    """
    r_good = r_good.astype(jnp.float32)
    r_bad = r_bad.astype(jnp.float32)
    w = weight.astype(jnp.float32)
    valid = (w > 0).astype(jnp.float32)
    apo = (is_apo > 0).astype(jnp.float32) * valid
    human = (1.0 - (is_apo > 0).astype(jnp.float32)) * valid
    diff = r_good - r_bad
    nll = -jax.nn.log_sigmoid(diff if margin is None else diff - margin.astype(jnp.float32))
    coef = w * (apo * apo_weight + human * human_weight)
    correct = (diff > 0).astype(jnp.float32)  # ties count as wrong
    center = jnp.sum(w * jnp.square(r_good + r_bad)) if center_coef else jnp.float32(0.0)
    return {
        "loss_num": jnp.sum(coef * nll) + center_coef * center,
        "loss_den": jnp.sum(w),
        "pairs": jnp.sum(valid),
        "correct": jnp.sum(valid * correct),
        "margin": jnp.sum(valid * diff),
        "chosen": jnp.sum(valid * r_good),
        "rejected": jnp.sum(valid * r_bad),
        "apo_pairs": jnp.sum(apo),
        "apo_nll": jnp.sum(apo * nll),
        "apo_correct": jnp.sum(apo * correct),
        "human_pairs": jnp.sum(human),
        "human_nll": jnp.sum(human * nll),
        "human_correct": jnp.sum(human * correct),
    }


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    return jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 0.0)


def rm_metrics(s: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Loss and metrics from (summed) `rm_stats`; per-source values are 0 where a source is absent."""
    return {
        "loss": _ratio(s["loss_num"], s["loss_den"]),
        "accuracy": _ratio(s["correct"], s["pairs"]),
        "margin": _ratio(s["margin"], s["pairs"]),
        "reward_chosen": _ratio(s["chosen"], s["pairs"]),
        "reward_rejected": _ratio(s["rejected"], s["pairs"]),
        "apo_loss": _ratio(s["apo_nll"], s["apo_pairs"]),
        "apo_accuracy": _ratio(s["apo_correct"], s["apo_pairs"]),
        "human_loss": _ratio(s["human_nll"], s["human_pairs"]),
        "human_accuracy": _ratio(s["human_correct"], s["human_pairs"]),
        "pairs": s["pairs"],
    }


def apo_rm_loss(
    r_good: jax.Array,
    r_bad: jax.Array,
    is_apo: jax.Array,
    weight: jax.Array,
    *,
    apo_weight: float,
    human_weight: float,
    margin: jax.Array | None = None,
    center_coef: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The APO-RM loss (eq. 15) and its metrics for one batch; see `rm_stats` for the weighting
    and the margin and centering options."""
    m = rm_metrics(rm_stats(r_good, r_bad, is_apo, weight, apo_weight=apo_weight, human_weight=human_weight,
                            margin=margin, center_coef=center_coef))
    return m["loss"], m


def sft_stats(
    logits_btv: jax.Array,
    input_ids_bt: jax.Array,
    loss_mask_bt: jax.Array,
    weight_b: jax.Array,
    normalize: str = "token",
) -> Stats:
    """Sums for the SFT negative log-likelihood on response tokens (eq. 6), from logits [B, T, V].

    `loss_mask_bt[t] = 1` marks token t as a response token, predicted from position t - 1.
    The train step uses `sft_stats_from_logprobs` on `models.weighted_logprob_sum` (no [B, T, V] array).
    """
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    targets_bt = input_ids_bt[:, 1:]
    token_logp = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
    hit = jnp.argmax(logp_btv, axis=-1) == targets_bt
    pad = jnp.zeros_like(token_logp[:, :1])
    return sft_stats_from_logprobs(jnp.concatenate([pad, token_logp], axis=1),
                                   jnp.concatenate([pad.astype(bool), hit], axis=1),
                                   loss_mask_bt, weight_b, normalize)


def sft_loss_coefficients(loss_mask_bt: jax.Array, weight_b: jax.Array, normalize: str = "token") -> jax.Array:
    """[B, T] float32 c with the SFT loss numerator = -sum_t c[:, t] * logp[:, t] (position 0 is 0).

    normalize="token": c = weight * mask (every response token of the batch counts equally);
    normalize="sequence": c = weight * mask / the sequence's response tokens (each sequence's mean
    token NLL counts equally). The loss is linear in the log-probabilities, so these are its
    gradient with respect to them: `models.weighted_logprob_sum` uses that.
    """
    w_b = jnp.asarray(weight_b, jnp.float32)
    mask_bt = jnp.asarray(loss_mask_bt, jnp.float32).at[:, 0].set(0.0) * (w_b > 0)[:, None]
    if normalize == "token":
        return w_b[:, None] * mask_bt
    if normalize == "sequence":
        return w_b[:, None] * mask_bt / jnp.maximum(jnp.sum(mask_bt, axis=1, keepdims=True), 1.0)
    raise ValueError(f"normalize={normalize!r}; expected 'token' or 'sequence'")


def sft_stats_from_logprobs(
    logp_bt: jax.Array,
    argmax_bt: jax.Array,
    loss_mask_bt: jax.Array,
    weight_b: jax.Array,
    normalize: str = "token",
) -> Stats:
    """Sums for the SFT NLL (eq. 6) from per-token log-probabilities, as `models.token_logprobs`
    returns them: logp_bt[:, t] = log p(token t | tokens < t), argmax_bt[:, t] whether token t
    was the argmax; position 0 never counts.

    normalize="token": every response token of the batch counts equally;
    normalize="sequence": each sequence's mean token NLL counts equally.
    """
    coeff_bt = sft_loss_coefficients(loss_mask_bt, weight_b, normalize)
    token_logp = logp_bt[:, 1:].astype(jnp.float32)
    w_b = weight_b.astype(jnp.float32)
    mask_bt = loss_mask_bt[:, 1:].astype(jnp.float32) * (w_b > 0)[:, None]
    nll_bt = -token_logp * mask_bt
    tokens_b = jnp.sum(mask_bt, axis=1)
    num = -jnp.sum(coeff_bt[:, 1:] * token_logp)
    if normalize == "token":
        den = jnp.sum(w_b[:, None] * mask_bt)
    else:
        den = jnp.sum(w_b * (tokens_b > 0))
    correct = argmax_bt[:, 1:].astype(jnp.float32) * mask_bt
    return {
        "loss_num": num,
        "loss_den": den,
        "tokens": jnp.sum(tokens_b),
        "nll": jnp.sum(nll_bt),
        "correct": jnp.sum(correct),
        "sequences": jnp.sum((w_b > 0).astype(jnp.float32)),
    }


def sft_metrics(s: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    token_nll = _ratio(s["nll"], s["tokens"])
    return {
        "loss": _ratio(s["loss_num"], s["loss_den"]),
        "token_nll": token_nll,
        "perplexity": jnp.exp(jnp.minimum(token_nll, 30.0)),
        "token_accuracy": _ratio(s["correct"], s["tokens"]),
        "tokens": s["tokens"],
        "sequences": s["sequences"],
    }


def sft_loss(
    logits_btv: jax.Array,
    input_ids_bt: jax.Array,
    loss_mask_bt: jax.Array,
    weight_b: jax.Array,
    normalize: str = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SFT NLL over response tokens only (eq. 6) and its metrics."""
    m = sft_metrics(sft_stats(logits_btv, input_ids_bt, loss_mask_bt, weight_b, normalize))
    return m["loss"], m


def dpo_logits(pi_logp_w: jax.Array, pi_logp_l: jax.Array, ref_logp_w: jax.Array, ref_logp_l: jax.Array,
               beta: float) -> jax.Array:
    """beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))] per pair [B]."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return beta * ((f32(pi_logp_w) - f32(ref_logp_w)) - (f32(pi_logp_l) - f32(ref_logp_l)))


def _dpo_nll(z: jax.Array, label_smoothing: float) -> jax.Array:
    # Conservative DPO (label smoothing eps): the preference label is flipped with probability eps.
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def dpo_loss(pi_logp_w: jax.Array, pi_logp_l: jax.Array, ref_logp_w: jax.Array, ref_logp_l: jax.Array, *,
             beta: float, label_smoothing: float = 0.0) -> jax.Array:
    """The DPO loss (Rafailov et al. 2023, eq. 7), mean over the batch:
    -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]),
    with label smoothing eps: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z). Inputs are summed
    response-token log-probabilities per sequence, [B] each."""
    return jnp.mean(_dpo_nll(dpo_logits(pi_logp_w, pi_logp_l, ref_logp_w, ref_logp_l, beta), label_smoothing))


def dpo_stats(
    pi_logp_w: jax.Array,
    pi_logp_l: jax.Array,
    ref_logp_w: jax.Array,
    ref_logp_l: jax.Array,
    weight: jax.Array,
    tokens_w: jax.Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> Stats:
    """Sums for DPO (+ an optional SFT term on y_w) over a batch of pairs; filler rows have weight 0.

    Per pair: dpo_nll(z) + sft_weight * (-log pi(y_w|x) / |y_w|) (the mean token NLL of y_w). The
    implicit rewards are beta * (log pi - log pi_ref); `kl` sums log pi_ref - log pi over both
    responses, an estimate of KL(pi_ref || pi) because the pairs are samples of pi_ref.
    """
    w = weight.astype(jnp.float32)
    valid = (w > 0).astype(jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    r_w = beta * (f32(pi_logp_w) - f32(ref_logp_w))
    r_l = beta * (f32(pi_logp_l) - f32(ref_logp_l))
    z = r_w - r_l
    nll = _dpo_nll(z, label_smoothing)
    sft_nll = -f32(pi_logp_w) / jnp.maximum(f32(tokens_w), 1.0)
    per_pair = nll + sft_weight * sft_nll
    return {
        "loss_num": jnp.sum(w * per_pair),
        "loss_den": jnp.sum(w),
        "pairs": jnp.sum(valid),
        "dpo_nll": jnp.sum(valid * nll),
        "sft_nll": jnp.sum(valid * sft_nll),
        "correct": jnp.sum(valid * (z > 0).astype(jnp.float32)),
        "margin": jnp.sum(valid * z),
        "chosen": jnp.sum(valid * r_w),
        "rejected": jnp.sum(valid * r_l),
        "kl": jnp.sum(valid * ((f32(ref_logp_w) - f32(pi_logp_w)) + (f32(ref_logp_l) - f32(pi_logp_l)))),
    }


def dpo_metrics(s: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Loss and metrics from (summed) `dpo_stats` (TRL's names where they exist)."""
    return {
        "loss": _ratio(s["loss_num"], s["loss_den"]),
        "dpo_loss": _ratio(s["dpo_nll"], s["pairs"]),
        "sft_nll": _ratio(s["sft_nll"], s["pairs"]),
        "reward_accuracy": _ratio(s["correct"], s["pairs"]),
        "reward_margin": _ratio(s["margin"], s["pairs"]),
        "reward_chosen": _ratio(s["chosen"], s["pairs"]),
        "reward_rejected": _ratio(s["rejected"], s["pairs"]),
        "kl_proxy": _ratio(s["kl"], 2.0 * s["pairs"]),
        "pairs": s["pairs"],
    }
