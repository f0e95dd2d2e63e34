"""Evaluation: the best-of-n expectation against brute force, the best-of-n KL estimator on
continuous and tied scores, and the Evaluator's KL and padding rows on a tiny model."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import evaluation, rollout
from rlhf_jax import model as M
from rlhf_jax import sampling

PAD, EOS = 0, 1


def test_expected_best_equals_the_mean_over_every_subset():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(3, 7)).astype(float)      # ties on purpose
    values = rng.normal(size=(3, 7))
    for n in (1, 2, 3, 7):
        w = evaluation.best_of_n_weights(7, n)
        assert w.sum() == pytest.approx(1.0)
        brute = []
        for s, v in zip(scores, values):
            picks = []
            for subset in itertools.combinations(range(7), n):
                # argmax with ties broken by position among the sorted-stable order: the last
                # of equal scores wins, as a stable ascending sort puts it highest.
                best = max(subset, key=lambda i: (s[i], i))
                picks.append(v[best])
            brute.append(np.mean(picks))
        np.testing.assert_allclose(evaluation.expected_best(scores, values, n), brute,
                                   rtol=1e-12)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        evaluation.best_of_n_weights(4, 5)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_kl_estimate_recovers_log_n_minus_one_for_continuous_scores(n):
    scores = np.random.default_rng(n).normal(size=(2000, 32))
    est = evaluation.kl_estimate(scores, n)
    exact = math.log(n) - (n - 1) / n
    se = np.std(est) / math.sqrt(len(est))
    assert abs(np.mean(est) - exact) <= max(4 * se, 1e-12), (np.mean(est), exact, se)
    if n > 1:
        assert abs(np.mean(est) - exact) <= 0.03 * exact


def test_kl_estimate_is_not_the_formula_when_the_policy_repeats_itself():
    # Three distinct responses per prompt: the best of 4 is mostly the top one, and its true KL
    # (sum over the 3 atoms) is well below log 4 - 3/4. The estimator sees the ties.
    rng = np.random.default_rng(0)
    scores = rng.choice([0.0, 1.0, 2.0], p=[0.5, 0.3, 0.2], size=(2000, 32))
    est = np.mean(evaluation.kl_estimate(scores, 4))
    p = np.array([0.5, 0.3, 0.2])
    cdf = np.cumsum(p)
    q = cdf ** 4 - np.concatenate([[0.0], cdf[:-1]]) ** 4            # best-of-4 distribution
    true_kl = float(np.sum(q * np.log(q / p)))
    assert abs(est - (math.log(4) - 0.75)) > 0.1
    assert abs(est - true_kl) < abs(true_kl - (math.log(4) - 0.75))


def test_empirical_cdf_counts_ties_half():
    ref = np.array([[0.0, 1.0, 1.0, 2.0]])
    f = evaluation.empirical_cdf(ref, np.array([[-1.0, 1.0, 5.0]]))
    np.testing.assert_allclose(f, [[0.5 / 4.5, 2.5 / 4.5, 4.5 / 4.5]])


@pytest.fixture(scope="module")
def tiny():
    cfg = M.get_config("tiny", max_len=32)
    graphdef, ref = M.create(cfg, seed=1)
    _, policy = M.create(cfg, seed=2)
    rm_graphdef, rm = M.create(cfg, seed=3, kind="reward")
    tokens = np.random.default_rng(0).integers(2, 64, size=(4, 5)).astype(np.int32)
    mask = np.ones((4, 5), np.int32)
    prompts = [{"tokens": tokens, "mask": mask, "valid": np.array([1, 1, 1, 0])}]
    ev = evaluation.Evaluator(graphdef=graphdef, ref_params=ref, prompts=prompts,
                              max_new_tokens=8, eos_id=EOS, pad_id=PAD,
                              reward=(rm_graphdef, rm))
    return ev, graphdef, ref, policy


def test_evaluator_kl_matches_two_forward_passes_and_drops_padding_rows(tiny):
    ev, graphdef, ref, policy = tiny
    key = jax.random.key(0)
    s = ev.samples(policy, key, n=2)
    assert s["kl"].shape == s["rm"].shape == (6,)                    # 3 valid prompts x 2
    # Recompute with both forward passes on the same samples (same key, same batch).
    tokens, mask = jnp.repeat(ev.tokens, 2, 0), jnp.repeat(ev.mask, 2, 0)
    completion, cmask, _ = sampling.generate((graphdef, policy), tokens, mask,
                                             jax.random.fold_in(key, 0), max_new_tokens=8,
                                             eos_id=EOS, pad_id=PAD)
    seq, seq_mask = rollout.join(tokens, mask, completion, cmask)
    cm = cmask.astype(jnp.int32)
    lp = rollout.completion_logps(graphdef, policy, seq, seq_mask, completion, cm)
    lr = rollout.completion_logps(graphdef, ref, seq, seq_mask, completion, cm)
    np.testing.assert_allclose(s["kl"], np.sum(lp - lr, axis=1), atol=1e-4)
    assert ev.policy_metrics(ref, key)["objective/kl"] == pytest.approx(0.0, abs=1e-4)


def test_best_of_n_reports_both_kls_and_checks_its_sample_count(tiny):
    ev, _, ref, _ = tiny
    out = ev.best_of_n(ref, jax.random.key(1), ns=(1, 2, 4))
    assert set(out) == {1, 2, 4}
    assert out[1]["objective/kl"] == 0.0 and out[1]["objective/kl_empirical"] == 0.0
    assert out[4]["objective/kl"] == pytest.approx(math.log(4) - 0.75)
    assert out[4]["rm/score"] >= out[2]["rm/score"] >= out[1]["rm/score"]
    with pytest.raises(ValueError, match="must be even and >= 2"):
        ev.best_of_n(ref, jax.random.key(1), ns=(4,), samples_per_prompt=6)


def test_chunks_and_prompt_batches_of_different_lengths(tiny):
    ev, graphdef, ref, policy = tiny
    short = {"tokens": np.full((2, 3), 7, np.int32), "mask": np.array([[0, 1, 1], [1, 1, 1]])}
    long = {"tokens": np.full((1, 5), 9, np.int32), "mask": np.ones((1, 5), np.int32)}
    chunked = evaluation.Evaluator(graphdef=graphdef, ref_params=ref, prompts=[short, long],
                                   max_new_tokens=6, eos_id=EOS, pad_id=PAD, max_rows=4)
    assert chunked.tokens.shape == (3, 5)
    np.testing.assert_array_equal(chunked.mask[0], [0, 0, 0, 1, 1])   # left-padded further
    s = chunked.samples(policy, jax.random.key(0), n=3)                 # 9 rows in 3 chunks
    assert s["kl"].shape == (9,) and np.all(np.isfinite(s["kl"]))
    assert np.all(s["length"] >= 1)
    with pytest.raises(ValueError, match="at least one real token"):
        evaluation.Evaluator(graphdef=graphdef, ref_params=ref, max_new_tokens=4, eos_id=EOS,
                             pad_id=PAD, prompts=[{"tokens": np.zeros((1, 2), np.int32),
                                                   "mask": np.zeros((1, 2), np.int32)}])
