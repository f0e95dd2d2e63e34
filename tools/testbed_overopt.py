"""Over-optimisation of a learned proxy on the synthetic testbed, measured with best-of-n.

A bag-of-words Bradley–Terry reward model r_phi(x, y) = w . counts(y) is fit to 300
Bradley–Terry-labelled preference pairs (tau = 1) with 300 Adam steps in JAX. Then, for 200
held-out prompts, 256 completions each are drawn from a base policy, and best-of-n keeps the
completion with the highest proxy reward; disjoint groups of n give an unbiased estimate for
every n. KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020, app. G.3).

The base policy is the testbed's review sampler with each word replaced by a random word type
with probability --noise (0.1): the slips of an imperfect SFT model sampled at temperature 1.
The preference pairs are clean, so the proxy never saw such slips. As n grows the proxy reward
of the pick keeps rising while its gold reward r* peaks and then falls (Gao et al. 2023,
"Scaling laws for reward model overoptimization"): the proxy cannot see negation, the grammar,
saturation or repetition, and its small-data spurious word weights are exploitable.

    python -m tools.testbed_overopt --out runs/testbed_overopt

writes overopt.json and overopt.png under --out and prints the table quoted in
docs/testbed.md. Deterministic; about 20 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.data import synthetic


def encode_completions(testbed, prompt_text, completions, length):
    """Prompt + completions -> (ids [N, T], completion mask [N, T], counts [N, V])."""
    p_ids, _ = testbed.encode_example(prompt_text, "")
    n, vocab = len(completions), testbed.tokenizer.vocab_size
    ids = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.int32)
    counts = np.zeros((n, vocab), np.float32)
    for i, y in enumerate(completions):
        c_ids = testbed.tokenizer.encode(y) + [testbed.tokenizer.eos_id]
        row = p_ids + c_ids
        ids[i, :len(row)] = row
        mask[i, len(p_ids):len(row)] = 1
        np.add.at(counts[i], c_ids, 1.0)
    return ids, mask, counts


def corrupt(text, rng, rate):
    """Replaces each word with a uniformly random word type with probability `rate`: the slips
    of an imperfect SFT policy sampled at temperature 1, which the clean pairs never show."""
    words = text.split()
    for i in range(len(words)):
        if rng.random() < rate:
            words[i] = synthetic.VOCAB_WORDS[rng.integers(len(synthetic.VOCAB_WORDS))]
    return " ".join(words)


def fit_bow_reward_model(chosen_counts, rejected_counts, *, steps, lr, l2, seed):
    """Bradley–Terry fit of a linear reward on token counts: [N, V] x 2 -> weights [V]."""
    del seed  # zero init; the fit is deterministic
    w = jnp.zeros(chosen_counts.shape[1], jnp.float32)
    opt = optax.adam(lr)
    state = opt.init(w)

    def loss_fn(w):
        margin = (chosen_counts - rejected_counts) @ w
        return -jnp.mean(jax.nn.log_sigmoid(margin)) + l2 * jnp.sum(w * w)

    @jax.jit
    def step(w, state):
        loss, g = jax.value_and_grad(loss_fn)(w)
        upd, state = opt.update(g, state)
        return optax.apply_updates(w, upd), state, loss

    for _ in range(steps):
        w, state, loss = step(w, state)
    return w, float(loss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--test_pairs", type=int, default=2000)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max_n", type=int, default=256)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.1,
                    help="per-word substitution rate of the base policy (an imperfect SFT model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/testbed_overopt")
    args = ap.parse_args(argv)
    t0 = time.time()
    tb = synthetic.Testbed()
    length = 48

    # -- proxy reward model -------------------------------------------------------------------
    train = tb.preference_pairs(args.pairs, seed=args.seed, tau=args.tau)
    test = tb.preference_pairs(args.test_pairs, seed=args.seed + 1, tau=args.tau)

    def counts_of(rows, key):
        return np.stack([encode_completions(tb, r["prompt"], [r[key]], length)[2][0]
                         for r in rows])

    w, loss = fit_bow_reward_model(counts_of(train, "chosen"), counts_of(train, "rejected"),
                                   steps=args.steps, lr=args.lr, l2=args.l2, seed=args.seed)
    margin = (counts_of(test, "chosen") - counts_of(test, "rejected")) @ np.asarray(w)
    gold_margin = np.array([r["gold_chosen"] - r["gold_rejected"] for r in test])
    untied = gold_margin != 0
    acc = float(np.mean((margin > 0)[untied] == (gold_margin > 0)[untied]))

    # -- best-of-n ----------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed + 2)
    prompts = tb.prompts(args.prompts, seed=args.seed + 3)
    gold_pool, proxy_pool = [], []
    for p in prompts:
        ys = [corrupt(tb.sample_completion(p, rng), rng, args.noise)
              for _ in range(args.max_n)]
        ids, mask, counts = encode_completions(tb, p.text, ys, length)
        gold_pool.append(np.asarray(tb.gold_reward(ids, mask)))
        proxy_pool.append(counts @ np.asarray(w))
    gold_pool, proxy_pool = np.stack(gold_pool), np.stack(proxy_pool)   # [P, max_n]
    # Standardise the proxy by its base-policy statistics so both columns read in SFT stds.
    base_gold_mean, base_gold_std = gold_pool.mean(), gold_pool.std()
    base_proxy_mean, base_proxy_std = proxy_pool.mean(), proxy_pool.std()
    rows = []
    n = 1
    while n <= args.max_n:
        # Disjoint groups of n from each prompt's pool: an unbiased estimate for every n.
        g = gold_pool.reshape(len(prompts), -1, n)
        q = proxy_pool.reshape(len(prompts), -1, n)
        pick = np.argmax(q, axis=-1)[..., None]
        gold = np.take_along_axis(g, pick, -1).mean()
        proxy = np.take_along_axis(q, pick, -1).mean()
        rows.append(dict(n=n, kl=math.log(n) - (n - 1) / n,
                         gold=float(gold), proxy=float(proxy),
                         gold_z=float((gold - base_gold_mean) / base_gold_std),
                         proxy_z=float((proxy - base_proxy_mean) / base_proxy_std),
                         oracle_gold=float(g.max(-1).mean())))
        n *= 2
    result = dict(args=vars(args), rm_train_loss=loss, rm_heldout_accuracy=acc,
                  base_gold_mean=float(base_gold_mean), base_gold_std=float(base_gold_std),
                  best_of_n=rows, seconds=time.time() - t0)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overopt.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"proxy RM: {args.pairs} pairs, held-out accuracy vs gold ordering {acc:.3f}")
    print(f"base policy gold reward: mean {base_gold_mean:.3f} std {base_gold_std:.3f}")
    print("| n | KL (nats) | proxy gain (base std) | gold gain (base std) | gold "
          "| gold of best-of-n by gold |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['kl']:.2f} | {r['proxy_z']:+.2f} | {r['gold_z']:+.2f} | "
              f"{r['gold']:.2f} | {r['oracle_gold']:.2f} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        kl = [r["kl"] for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(kl, [r["proxy_z"] for r in rows], "o-", label="proxy (bag-of-words RM)")
        ax.plot(kl, [r["gold_z"] for r in rows], "s-", label="gold r*")
        ax.set_xlabel("KL(best-of-n || base), nats")
        ax.set_ylabel("reward gain (base-policy std)")
        ax.set_title("Best-of-n against a learned proxy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "overopt.png"), dpi=120)
    except ImportError:
        pass
    print(f"wrote {args.out}/overopt.json ({time.time() - t0:.1f} s)")
    return result


if __name__ == "__main__":
    main()
