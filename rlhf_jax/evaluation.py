"""Evaluation of a policy: sample on held-out prompts, score by gold reward and reward model,
and measure the sequence KL to the reference; best-of-n as a policy.

Every method of the pipeline (SFT, PPO, DPO, best-of-n) is evaluated by the same functions so
the report compares like with like:

  gold/reward   mean r*(x, y) of the testbed (when a testbed is given)
  rm/score      mean reward-model score (when a reward model is given)
  objective/kl  mean over responses of sum_t [log pi(y_t) - log pi_ref(y_t)] (k1, sequence level)
  response/length, response/eos_rate

Shapes: B prompts, N = B * n samples, P prompt length, L = max_new_tokens.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import model, sampling
from rlhf_jax.data import synthetic


def completion_logps(graphdef, params, seq, seq_mask, completion, completion_mask, *,
                     temperature: float = 1.0):
    """log pi(y_t | x, y_<t) of each completion token. seq = [prompt (P, left-padded), completion
    (L)]; logits at position P - 1 + j predict completion token j. Returns [N, L] (0 off-mask)."""
    p = seq.shape[1] - completion.shape[1]
    logits, _ = model.apply(graphdef, params, seq, mask_bt=seq_mask)
    return model.token_logprobs(logits[:, p - 1:-1], completion, completion_mask,
                                temperature=temperature)


def join(prompt_tokens, prompt_mask, completion, completion_mask):
    """[prompt | completion] sequences and masks: ([N, P+L], [N, P+L] int32)."""
    seq = jnp.concatenate([prompt_tokens, completion], axis=1)
    seq_mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.int32)
    return seq, seq_mask


def gold_mask(prompt_mask, completion_mask):
    """The gold reward scores completion tokens only; the prompt is context."""
    return jnp.concatenate([jnp.zeros_like(prompt_mask), completion_mask], axis=1).astype(
        jnp.int32)


def _score_fn(policy_graphdef, reward_graphdef, has_rm, has_gold, temperature, tables):
    @jax.jit
    def score(policy_params, ref_params, rm_params, prompt_tokens, prompt_mask, completion,
              completion_mask):
        seq, seq_mask = join(prompt_tokens, prompt_mask, completion, completion_mask)
        logps = completion_logps(policy_graphdef, policy_params, seq, seq_mask, completion,
                                 completion_mask, temperature=temperature)
        ref = completion_logps(policy_graphdef, ref_params, seq, seq_mask, completion,
                               completion_mask, temperature=temperature)
        out = {"kl": jnp.sum(logps - ref, axis=1), "length": jnp.sum(completion_mask, axis=1)}
        if has_rm:
            out["rm"] = model.apply_reward(reward_graphdef, rm_params, seq, mask_bt=seq_mask)
        if has_gold:
            out["gold"] = synthetic.gold_reward_from_tables(
                tables, seq, gold_mask(prompt_mask, completion_mask))
        return out

    return score


class Evaluator:
    """Samples from policies on fixed held-out prompts and scores the samples.

    Args:
      graphdef: the policy graphdef (shared by the policy and the reference).
      ref_params: the reference policy (KL is measured against it).
      prompts: a list of prompt batches, each {"tokens": [B, P], "mask": [B, P]} (left-padded).
      reward: optional (graphdef, params) of a reward model.
      testbed: optional synthetic.Testbed for the gold reward.
    """

    def __init__(self, *, graphdef, ref_params, prompts, max_new_tokens: int, eos_id: int,
                 pad_id: int, reward=None, testbed=None, temperature: float = 1.0):
        self.graphdef, self.ref_params, self.prompts = graphdef, ref_params, prompts
        self.max_new_tokens, self.eos_id, self.pad_id = max_new_tokens, eos_id, pad_id
        self.temperature = temperature
        self.reward = reward
        self._score = _score_fn(graphdef, None if reward is None else reward[0],
                                reward is not None, testbed is not None, temperature,
                                None if testbed is None else testbed.tables)

    def samples(self, params, rng, *, n: int = 1) -> dict[str, np.ndarray]:
        """n samples per prompt, scored: arrays of [num_prompts * n] ordered prompt-major."""
        rows = []
        for i, batch in enumerate(self.prompts):
            tokens = jnp.repeat(jnp.asarray(batch["tokens"]), n, axis=0)
            mask = jnp.repeat(jnp.asarray(batch["mask"]), n, axis=0)
            completion, completion_mask, _ = sampling.generate(
                (self.graphdef, params), tokens, mask, jax.random.fold_in(rng, i),
                max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                eos_id=self.eos_id, pad_id=self.pad_id)
            completion_mask = completion_mask.astype(jnp.int32)
            out = self._score(params, self.ref_params,
                              None if self.reward is None else self.reward[1], tokens, mask,
                              completion, completion_mask)
            out["eos"] = jnp.any((completion == self.eos_id) & (completion_mask > 0), axis=1)
            rows.append(jax.device_get(out))
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def policy_metrics(self, params, rng) -> dict[str, float]:
        """Means over one sample per held-out prompt."""
        return summarize(self.samples(params, rng))

    def best_of_n(self, params, rng, ns=(1, 4, 16), cdf_samples: int | None = None
                  ) -> dict[int, dict[str, float]]:
        """Best-of-n by reward-model score, for each n in `ns`, from one pool of max(ns) samples.

        For each n the pool is cut into disjoint groups of n (max(ns) / n groups per prompt),
        the best of each group by RM score is kept, and its gold reward / RM score are averaged.
        KL to the sampling policy is reported two ways: the analytic log n - (n - 1) / n
        (exact for a continuous reward; Stiennon et al. 2020, Beirami et al. 2024), and the
        estimate E[log n + (n - 1) log F_x(r(y_best))] with F_x the empirical CDF of RM scores of
        `cdf_samples` fresh samples of the same prompt x (default 2 * max(ns)).
        """
        if self.reward is None:
            raise ValueError("best-of-n needs a reward model to rank by")
        n_max = max(ns)
        if any(n_max % n for n in ns):
            raise ValueError(f"every n in {ns} must divide max(ns) = {n_max}")
        m = cdf_samples or 2 * n_max
        pool = self.samples(params, rng, n=n_max)
        fresh = np.sort(self.samples(params, jax.random.fold_in(rng, 1_000_003), n=m)["rm"]
                        .reshape(-1, m), axis=1)                           # [prompts, m]
        results = {}
        for n in ns:
            best = np.argmax(pool["rm"].reshape(-1, n), axis=1)            # [prompts * n_max/n]
            pick = lambda key: np.take_along_axis(  # noqa: E731
                pool[key].reshape(-1, n), best[:, None], 1)[:, 0]
            prompt = np.arange(len(best)) // (n_max // n)
            below = np.array([np.searchsorted(fresh[i], r, side="right")
                              for i, r in zip(prompt, pick("rm"))])
            cdf = np.clip(below / m, 1.0 / m, 1.0)  # a best above every fresh sample: F = 1
            results[n] = {
                "rm/score": float(np.mean(pick("rm"))),
                "objective/kl": math.log(n) - (n - 1) / n,
                "objective/kl_empirical": float(np.mean(math.log(n) + (n - 1) * np.log(cdf))),
                "response/length": float(np.mean(pick("length"))),
            }
            if "gold" in pool:
                results[n]["gold/reward"] = float(np.mean(pick("gold")))
        return results


def summarize(samples: dict[str, np.ndarray]) -> dict[str, float]:
    out = {"objective/kl": float(np.mean(samples["kl"])),
           "response/length": float(np.mean(samples["length"])),
           "response/eos_rate": float(np.mean(samples["eos"]))}
    if "rm" in samples:
        out["rm/score"] = float(np.mean(samples["rm"]))
    if "gold" in samples:
        out["gold/reward"] = float(np.mean(samples["gold"]))
        out["gold/reward_std"] = float(np.std(samples["gold"]))
    return out
