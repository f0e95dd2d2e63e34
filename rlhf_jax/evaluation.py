"""Evaluation of a policy: sample on held-out prompts, score by gold reward and reward model,
and measure the sequence KL to the reference; best-of-n as a policy.

Every method of the pipeline (SFT, PPO, DPO, best-of-n) is evaluated by the same functions so
the report compares like with like:

  gold/reward   mean of the data source's gold reward (when it has one: r*(x, y) of the review
                testbed, the exact-match rate of the arithmetic task), and gold/reward_std
  rm/score      mean reward-model score (when a reward model is given)
  objective/kl  mean over responses of sum_t [log pi(y_t) - log pi_ref(y_t)] (k1, sequence level)
  response/length, response/eos_rate

log pi is the sampler's own log-prob of each sampled token (equal to a training forward pass;
tests/test_sampling.py), so scoring a policy's samples costs one reference forward pass and,
with a reward model, one reward forward pass.

Shapes: B prompts, N = B * n samples, P prompt length, L = max_new_tokens, m samples per prompt.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import rewards as rewards_lib, rollout, sharding


class Evaluator:
    """Samples from policies on fixed held-out prompts and scores the samples.

    Args:
      graphdef: the policy graphdef (shared by the policy and the reference).
      ref_params: the reference policy (KL is measured against it).
      prompts: a list of prompt batches, each {"tokens": [B, P], "mask": [B, P]} (left-padded),
        optionally with "valid" [B] (the padding rows of a final partial batch are dropped)
        and the text fields [B] the gold reward reads (a verifier's answer).
      max_rows: samples generated and scored per compiled call.
      reward: optional (graphdef, params) of a reward model.
      gold: optional `sources.Gold` of the data (`common.gold`): the reward reported as
        gold/reward (the review testbed's r*, the arithmetic task's exact match).
      tokenizer: decodes completions for a gold reward that reads text.
      place: puts a host batch {"tokens", "mask"} on the devices (a trainer passes its mesh
        placement, so the samples are split over the data axis); default: jnp.asarray.
    """

    def __init__(self, *, graphdef, ref_params, prompts, max_new_tokens: int, eos_id,
                 pad_id: int, reward=None, gold=None, tokenizer=None,
                 temperature: float = 1.0, max_rows: int = 1024, place=None):
        self.graphdef, self.ref_params = graphdef, ref_params
        self.max_new_tokens, self.eos_id, self.pad_id = max_new_tokens, eos_id, pad_id
        self.temperature = float(temperature)
        self.reward, self.gold, self.tokenizer = reward, gold, tokenizer
        self.gold_terms = rewards_lib.parse(gold.expr) if gold is not None else ()
        wanted = rewards_lib.record_fields(self.gold_terms)
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows} must be positive")
        self.max_rows = max_rows
        self.place = place or (lambda b: {k: jnp.asarray(v) for k, v in b.items()})
        if not prompts:
            raise ValueError("Evaluator needs at least one batch of held-out prompts")
        # One [prompts, P] array, left-padded to the longest batch, padding rows dropped.
        p = max(np.shape(b["tokens"])[1] for b in prompts)
        tokens, masks, fields = [], [], {k: [] for k in wanted}
        for batch in prompts:
            t, m = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
            valid = np.asarray(batch.get("valid", np.ones(t.shape[0]))).astype(bool)
            pad = ((0, 0), (p - t.shape[1], 0))
            tokens.append(np.pad(t, pad, constant_values=pad_id)[valid])
            masks.append(np.pad(m, pad)[valid])
            for k in wanted:
                if k not in batch:
                    raise ValueError(f"the gold reward {gold.expr!r} reads the prompts' {k!r} "
                                     "field, which these prompt batches do not carry")
                fields[k].append(np.asarray(batch[k], object)[valid])
        self.tokens, self.mask = np.concatenate(tokens), np.concatenate(masks)
        self.fields = {k: np.concatenate(v) for k, v in fields.items()}
        if not len(self.tokens):
            raise ValueError("Evaluator needs at least one valid held-out prompt")
        if not np.all(self.mask.any(axis=1)):
            raise ValueError("every held-out prompt needs at least one real token")

    @property
    def num_prompts(self) -> int:
        return len(self.tokens)

    # What `samples` returns, from the rollout's keys.
    _KEYS = {"length": "length", "eos": "eos", "kl": "kl", "rm": "reward/model"}

    def samples(self, policy, rng, *, n: int = 1, kl: bool = True, prompts: int = 0
                ) -> dict[str, np.ndarray]:
        """n samples per prompt, scored: arrays of [num_prompts * n] ordered prompt-major
        (prompts > 0: only the first `prompts` prompts).

        The rows are sampled in chunks of max_rows (the last one padded with repeats), so every
        call compiles at most two shapes; chunk i uses the key fold_in(rng, i), so two policies
        evaluated with the same rng share their random numbers. kl=False skips the reference
        pass (best-of-n of the reference itself needs no KL)."""
        terms = rewards_lib.parse("model") if self.reward is not None else ()
        params = {"ref": self.ref_params} if kl else {}
        if self.reward is not None:
            params["reward"] = self.reward[1]
        if self.gold is not None:
            params.update(self.gold.inputs)
        num = min(prompts, self.num_prompts) if prompts > 0 else self.num_prompts
        total = num * n
        chunk = min(self.max_rows, total)
        rows = np.repeat(np.arange(num), n)
        rows = np.concatenate([rows, np.resize(rows, (-total) % chunk)])
        out = []
        for i in range(len(rows) // chunk):
            idx = rows[i * chunk:(i + 1) * chunk]
            placed = self.place({"tokens": self.tokens[idx], "mask": self.mask[idx]})
            # The sampler's own log-probs serve as log pi (no second policy forward).
            r = rollout.sample_and_score(
                graphdef=self.graphdef, terms=terms, monitor=self.gold_terms,
                params={"policy": policy, **params}, prompt=placed["tokens"],
                prompt_mask=placed["mask"], rng=jax.random.fold_in(rng, i),
                max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                stop_ids=self.eos_id, pad_id=self.pad_id, tokenizer=self.tokenizer,
                fields={k: v[idx] for k, v in self.fields.items()},
                reward_graphdef=None if self.reward is None else self.reward[0])
            got = {name: r[key] for name, key in self._KEYS.items() if key in r}
            if self.gold_terms:
                got["gold"] = rewards_lib.total(self.gold_terms, r)
            out.append(sharding.device_get(got))
        return {k: np.concatenate([np.asarray(o[k]) for o in out])[:total] for k in out[0]}

    def policy_metrics(self, params, rng, *, n: int = 1) -> dict[str, float]:
        """Means over n samples per held-out prompt. Two policies evaluated with the same rng
        share their random numbers (a paired comparison)."""
        return summarize(self.samples(params, rng, n=n))

    def best_of_n(self, params, rng, ns=(1, 2, 4, 8, 16), samples_per_prompt: int = 0,
                  prompts: int = 0) -> dict[int, dict[str, float]]:
        """Best-of-n by reward-model score, for each n in `ns`, from m samples per prompt.

        Gold reward, RM score and length of the best of n are the exact expectation over every
        n-subset of a prompt's m samples (`expected_best`: the unbiased estimator of Nakano et
        al. 2021, app. I), not one draw. KL to the sampling policy is reported two ways:
          objective/kl            log n - (n - 1) / n, exact for a continuous reward
                                  (Stiennon et al. 2020; an upper bound with ties, Beirami
                                  et al. 2024);
          objective/kl_empirical  E[log n + (n - 1) log F_x(r(y_best))] with F_x the empirical
                                  CDF of RM scores of independent samples of the same prompt
                                  (`kl_estimate`), and its standard error over prompts.
        m (samples_per_prompt) defaults to 2 * max(ns); it must be even and >= 2 * max(ns).
        prompts > 0 uses only the first `prompts` held-out prompts.
        """
        if self.reward is None:
            raise ValueError("best-of-n needs a reward model to rank by")
        m = samples_per_prompt or 2 * max(ns)
        if m % 2 or m < 2 * max(ns) or min(ns) < 1:
            raise ValueError(f"samples_per_prompt={m} must be even and >= 2 * max(ns) = "
                             f"{2 * max(ns)} (ns={tuple(ns)}), each n >= 1")
        s = self.samples(params, rng, n=m, kl=False, prompts=prompts)
        rm = s["rm"].reshape(-1, m)
        results = {}
        for n in ns:
            est = kl_estimate(rm, n)
            results[n] = {
                "rm/score": float(np.mean(expected_best(rm, rm, n))),
                "objective/kl": math.log(n) - (n - 1) / n,
                "objective/kl_empirical": float(np.mean(est)),
                "objective/kl_empirical_se": float(np.std(est) / math.sqrt(len(est))),
                "response/length": float(np.mean(expected_best(rm, s["length"].reshape(-1, m),
                                                               n))),
            }
            if "gold" in s:
                results[n]["gold/reward"] = float(np.mean(
                    expected_best(rm, s["gold"].reshape(-1, m), n)))
        return results


def best_of_n_weights(m: int, n: int) -> np.ndarray:
    """w[j] = P(the best of a uniformly random n-subset of m items is the (j+1)-th smallest)
    = C(j, n - 1) / C(m, n), j = 0..m-1. [m] float64, sums to 1."""
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs 1 <= n <= m = {m} samples")
    total = math.comb(m, n)
    return np.array([math.comb(j, n - 1) / total for j in range(m)], np.float64)


def expected_best(scores_pm, values_pm, n: int) -> np.ndarray:
    """Mean of `values` at the highest-`scores` sample over every n-subset of each row.

    scores_pm, values_pm: [prompts, m]. Returns [prompts]. Of tied scores the later
    sample counts as the higher (a stable sort)."""
    scores_pm, values_pm = np.asarray(scores_pm), np.asarray(values_pm, np.float64)
    order = np.argsort(scores_pm, axis=1, kind="stable")
    return np.take_along_axis(values_pm, order, 1) @ best_of_n_weights(scores_pm.shape[1], n)


def empirical_cdf(ref_pm, x_pk) -> np.ndarray:
    """F(x) from each row's reference sample: (#{ref < x} + #{ref = x} / 2 + 1/2) / (M + 1/2).

    Ties count half, and the 1/2 keeps log F finite at the lowest value; both keep log F nearly
    unbiased for M >= 16 (tests/test_evaluation.py). ref_pm [prompts, M], x_pk [prompts, k]."""
    ref_pm = np.sort(np.asarray(ref_pm), axis=1)
    below = np.stack([np.searchsorted(r, x, side="left") for r, x in zip(ref_pm, x_pk)])
    at_most = np.stack([np.searchsorted(r, x, side="right") for r, x in zip(ref_pm, x_pk)])
    return (0.5 * (below + at_most) + 0.5) / (ref_pm.shape[1] + 0.5)


def kl_estimate(scores_pm, n: int) -> np.ndarray:
    """Per-prompt estimate of KL(best-of-n || pi) = E[log n + (n - 1) log F(r(y_best))].

    The m scores of a prompt are split in halves A and B. The best of n is drawn from A (its
    exact expectation over every n-subset of A) and F is B's empirical CDF; then the halves swap
    roles and the two estimates are averaged (cross-fitting). Selection and CDF never share a
    sample, and the swap cancels most of the Monte Carlo noise. For distinct scores the
    estimate's mean is log n - (n - 1) / n; ties (a policy that repeats itself) pull it below.
    scores_pm: [prompts, m], m even, n <= m / 2. Returns [prompts] float64.
    """
    scores_pm = np.asarray(scores_pm, np.float64)
    h = scores_pm.shape[1] // 2
    halves = (scores_pm[:, :h], scores_pm[:, h:2 * h])
    w = best_of_n_weights(h, n)
    est = 0.0
    for sel, ref in (halves, halves[::-1]):
        log_f = np.log(empirical_cdf(ref, np.sort(sel, axis=1)))
        est = est + 0.5 * (math.log(n) + (n - 1) * (log_f @ w))
    return est


def summarize(samples: dict[str, np.ndarray]) -> dict[str, float]:
    out = {"response/length": float(np.mean(samples["length"])),
           "response/eos_rate": float(np.mean(samples["eos"]))}
    if "kl" in samples:
        out["objective/kl"] = float(np.mean(samples["kl"]))
    if "rm" in samples:
        out["rm/score"] = float(np.mean(samples["rm"]))
    if "gold" in samples:
        out["gold/reward"] = float(np.mean(samples["gold"]))
        out["gold/reward_std"] = float(np.std(samples["gold"]))
    return out
