"""Who labels the synthetic world's preference pairs (Gao et al. 2022's setting: a gold reward r*,
proxy labels from a flawed labeller).

A labeller has a reward `score(prompt, response)` and a `temperature`; a pair's label is drawn from
Bradley-Terry, P(a preferred over b) = sigmoid((score(a) - score(b)) / temperature).

- `true`: score = r*, the world's own reward (the default world).
- `length`: score = r* + lambda * excess_length(y), the clipped relative excess of the response's
  length over the golden answer's: the length bias documented for human and model labellers. r*
  charges padding through its edit distance, so the labeller and r* disagree exactly on padding.
- `learned`: a small reward model, logistic Bradley-Terry on hashed character 1-3-grams of the
  response (crossed with the task), fitted by Newton's method to `learned_labeller_pairs` pairs
  labelled by r*. Nothing is planted: its errors are whatever a small model learns from few labels.
  Its own logistic scale is its temperature (1).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Sequence

import numpy as np

from apo_jax.data import synthetic

NGRAMS = (1, 2, 3)
FEATURES = 1024  # hashed feature dimensions of the learned labeller
L2 = 1.0  # its ridge penalty (on the summed log-loss)


@dataclasses.dataclass(frozen=True)
class Labeller:
    """A labeller's reward and its Bradley-Terry temperature."""

    kind: str
    world: synthetic.World
    temperature: float
    lam: float = 0.0
    weights: np.ndarray | None = None

    def score(self, prompt: str, response: str) -> float:
        if self.kind == "true":
            return self.world.true_reward(prompt, response)
        if self.kind == "length":
            return self.world.true_reward(prompt, response) + self.lam * self.world.excess_length(prompt, response)
        assert self.weights is not None
        return float(features(prompt, response) @ self.weights)

    def prefer_prob(self, prompt: str, a: str, b: str) -> float:
        """P(a preferred over b) under this labeller."""
        return synthetic._sigmoid((self.score(prompt, a) - self.score(prompt, b)) / self.temperature)


def features(prompt: str, response: str) -> np.ndarray:
    """float64 [FEATURES]: counts of the response's character n-grams, hashed with the task name
    (so a digit can mean good for `add` and junk for `reverse`)."""
    task = synthetic.parse(prompt)[0]
    y = response.strip()
    out = np.zeros(FEATURES, np.float64)
    for n in NGRAMS:
        for i in range(len(y) - n + 1):
            out[zlib.crc32(f"{task}|{y[i:i + n]}".encode()) % FEATURES] += 1.0
    return out


def fit_bradley_terry(diffs: np.ndarray, l2: float = L2, iters: int = 30) -> np.ndarray:
    """argmin_w sum_i log(1 + exp(-w . d_i)) + l2/2 |w|^2 (d_i = features(chosen) - features(rejected))
    by Newton's method; deterministic."""
    w = np.zeros(diffs.shape[1], np.float64)
    for _ in range(iters):
        z = diffs @ w
        p = 1.0 / (1.0 + np.exp(-z))  # P(chosen over rejected)
        grad = -diffs.T @ (1.0 - p) + l2 * w
        hess = (diffs.T * (p * (1.0 - p))) @ diffs + l2 * np.eye(diffs.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def learn(rng: np.random.Generator, prompts: Sequence[str], cfg: Any, world: synthetic.World) -> tuple[Labeller, dict]:
    """The learned labeller: `cfg.learned_labeller_pairs` pairs of human responses to `prompts`,
    labelled by Bradley-Terry on r*, and the model fitted to them. Returns it and its fit stats."""
    counts = {"redrawn_identical": 0, "redrawn_equal_reward": 0}
    diffs = []
    for i in range(cfg.learned_labeller_pairs):
        prompt = prompts[int(rng.integers(len(prompts)))]
        chosen, rejected, _, _ = synthetic._draw_pair(rng, prompt, cfg, counts)
        diffs.append(features(prompt, chosen) - features(prompt, rejected))
    diffs = np.asarray(diffs)
    w = fit_bradley_terry(diffs)
    return (Labeller("learned", world, 1.0, weights=w),
            {"train_pairs": len(diffs), "train_label_acc": float(np.mean(diffs @ w > 0))})


def from_config(cfg: Any, world: synthetic.World, rng: np.random.Generator,
                prompts: Sequence[str]) -> tuple[Labeller, dict]:
    """The world's labeller (`cfg.labeller`) and a stats dict for world.json."""
    if cfg.labeller == "true":
        return Labeller("true", world, float(cfg.label_temperature)), {}
    if cfg.labeller == "length":
        return Labeller("length", world, float(cfg.label_temperature), lam=float(cfg.labeller_lambda)), {}
    return learn(rng, prompts, cfg, world)


def best_of(rng: np.random.Generator, prompt: str, cfg: Any, labeller: Labeller) -> str:
    """The labeller's best of `cfg.gold_candidates` human responses to `prompt` (ties: the first)."""
    candidates = [synthetic.sample_response(rng, prompt, cfg)[0] for _ in range(cfg.gold_candidates)]
    scores = [labeller.score(prompt, y) for y in candidates]
    return candidates[int(np.argmax(scores))]
