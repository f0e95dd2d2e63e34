"""The synthetic testbed: language, determinism, gold reward (jit vs reference), labelling."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tb():
    return synthetic.Testbed()


def _fingerprint(tb):
    """A hash of what a run depends on: tokenizer bytes, sampled data, gold rewards."""
    sft = tb.sft_examples(50, seed=7)
    pairs = tb.preference_pairs(20, seed=8, tau=0.5, flip_rate=0.1)
    ranks = tb.ranked_lists(5, k=3, seed=9)
    gold = [round(tb.gold_reward_text(e["prompt"], e["completion"]), 5) for e in sft]
    blob = json.dumps([sft, pairs, ranks, gold], sort_keys=True, default=float).encode()
    return hashlib.sha256(tb.tokenizer.serialized() + blob).hexdigest()


def _encode_batch(tb, examples, length=40):
    ids = np.zeros((len(examples), length), np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(examples):
        p, c = tb.encode_example(e["prompt"], e["completion"])
        ids[i, :len(p) + len(c)] = p + c
        mask[i, len(p):len(p) + len(c)] = 1
    return ids, mask


def test_language_size_and_single_piece_words(tb):
    assert 200 <= len(synthetic.VOCAB_WORDS) <= 400
    for w in synthetic.VOCAB_WORDS:
        assert tb.tokenizer.encode(w) == [tb.word_id(w)], w
        assert tb.id_to_word(tb.word_id(w)) == w


def test_samples_are_grammatical_and_sized(tb):
    lo_p, hi_p = tb.sampler_config.prompt_len
    lo_c, hi_c = tb.sampler_config.completion_len
    strict = synthetic.GoldConfig(illegal_penalty=1000.0)
    for e in tb.sft_examples(400, seed=3):
        p, c = e["prompt"].split(), e["completion"].split()
        assert lo_p <= len(p) <= hi_p and lo_c <= len(c) + 1 <= hi_c
        words = [synthetic.BOS] + p + c + [synthetic.EOS]
        mask = [0] * (len(p) + 1) + [1] * (len(c) + 1)
        # Every bigram of a sampled review is one the grammar (and so the reward) allows.
        assert synthetic.gold_reward_reference(words, mask, config=strict) > -100, e


def test_generator_is_deterministic_by_seed(tb):
    assert tb.sft_examples(30, seed=1) == tb.sft_examples(30, seed=1)
    assert tb.sft_examples(30, seed=1) != tb.sft_examples(30, seed=2)
    assert _fingerprint(tb) == _fingerprint(synthetic.Testbed())


def test_determinism_across_processes(tb):
    code = ("from rlhf_jax.data import synthetic; import tests.test_data_synthetic as t; "
            "print(t._fingerprint(synthetic.Testbed()))")
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONHASHSEED="123", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == _fingerprint(tb)


def test_jitted_gold_matches_reference_on_samples(tb):
    examples = tb.sft_examples(200, seed=11)
    ids, mask = _encode_batch(tb, examples)
    got = np.asarray(tb.gold_reward(ids, mask))
    want = [tb.gold_reward_text(e["prompt"], e["completion"]) for e in examples]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_jitted_gold_matches_reference_on_random_tokens(tb):
    # Arbitrary ids (specials, pads in the middle, unmasked islands, no eos) exercise every
    # branch: illegal bigrams, unk, repeats, missing eos, scoring stopping at eos.
    rng = np.random.default_rng(0)
    vocab = tb.tokenizer.vocab_size
    ids = rng.integers(0, vocab, (256, 24)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.1] = tb.tokenizer.pad_id
    ids[rng.random(ids.shape) < 0.05] = tb.tokenizer.eos_id
    mask = (rng.random(ids.shape) < 0.7).astype(np.int32)
    got = np.asarray(tb.gold_reward(ids, mask))
    want = [synthetic.gold_reward_reference([tb.id_to_word(i) for i in row], m)
            for row, m in zip(ids, mask)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_gold_reward_composes_inside_jit(tb):
    examples = tb.sft_examples(8, seed=5)
    ids, mask = _encode_batch(tb, examples)

    @jax.jit
    def mean_gold(ids, mask):
        return synthetic.gold_reward_from_tables(tb.tables, ids, mask).mean()

    np.testing.assert_allclose(mean_gold(ids, mask), np.mean(tb.gold_reward(ids, mask)),
                               rtol=1e-6)


def test_gold_reward_semantics(tb):
    g = tb.gold_reward_text
    prompt = "the plot"
    assert g(prompt, "was good .") > g(prompt, "was bad .")
    # Negation turns the sentiment and damps it; intensifiers scale it.
    assert g(prompt, "was not good .") < 0 < g(prompt, "was not bad .") < g(prompt, "was good .")
    assert g(prompt, "was very good .") > g(prompt, "was good .") > g(prompt,
                                                                     "was slightly good .")
    # The clause after "but" weighs more than the one before.
    assert g(prompt, "was bad , but the cast was good .") > 0
    # Fluency: an order the grammar cannot produce costs, and so do repeats and a missing eos.
    assert g(prompt, "was good .") - g(prompt, "good was .") >= 1.0
    assert g(prompt, "was good and the cast was good .") < g(prompt,
                                                             "was good and the cast was great .")
    assert g(prompt, "was good .", eos=False) == pytest.approx(g(prompt, "was good .") - 1.0)
    # Saturation: piling up sentiment stops paying.
    assert g(prompt, "was perfect .") < tb.gold_config.sentiment_scale + 1.0
    # The prompt's context carries into the completion: "not" in the prompt negates.
    words = "<s> the plot was not good . </s>".split()
    assert synthetic.gold_reward_reference(words, [0, 0, 0, 0, 0, 1, 1, 1]) < 0


def test_gold_reward_varies_across_sft_samples(tb):
    examples = tb.sft_examples(1000, seed=2)
    ids, mask = _encode_batch(tb, examples)
    r = np.asarray(tb.gold_reward(ids, mask))
    assert r.std() > 1.5, r.std()


def test_bradley_terry_label_frequencies():
    rng = np.random.default_rng(0)
    n = 200_000
    delta = rng.uniform(-4, 4, n)
    for tau, flip in ((1.0, 0.0), (0.5, 0.0), (2.0, 0.1)):
        first = synthetic.bradley_terry_labels(delta, np.zeros(n), tau=tau, flip_rate=flip,
                                               rng=rng)
        p = 1 / (1 + np.exp(-delta / tau))
        p = (1 - flip) * p + flip * (1 - p)
        bins = np.digitize(delta, np.linspace(-4, 4, 17))
        for b in np.unique(bins):
            sel = bins == b
            se = np.sqrt(p[sel].mean() * (1 - p[sel].mean()) / sel.sum())
            assert abs(first[sel].mean() - p[sel].mean()) < 5 * se + 1e-3, (tau, flip, b)
    assert synthetic.bradley_terry_labels([1.0, 0.0], [0.0, 1.0], tau=0.0, rng=rng).tolist() \
        == [True, False]


def test_plackett_luce_first_place_frequencies():
    rng = np.random.default_rng(1)
    r = np.array([1.0, 0.0, -0.5, 2.0])
    n = 40_000
    firsts = np.bincount([synthetic.plackett_luce_order(r, tau=1.0, rng=rng)[0]
                          for _ in range(n)], minlength=4) / n
    want = np.exp(r) / np.exp(r).sum()
    np.testing.assert_allclose(firsts, want, atol=5 * np.sqrt(0.25 / n))


def test_pairs_and_rankings(tb):
    pairs = tb.preference_pairs(300, seed=4, tau=1e-6)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    # Near-zero temperature: the chosen completion has the higher gold reward.
    assert all(p["gold_chosen"] >= p["gold_rejected"] for p in pairs)
    for row in tb.ranked_lists(20, k=4, seed=5, tau=1e-6):
        assert len(set(row["responses"])) == 4
        assert row["gold"] == sorted(row["gold"], reverse=True)


def test_overoptimisation_tool_smoke(tmp_path):
    from tools import testbed_overopt
    result = testbed_overopt.main(["--pairs", "60", "--test_pairs", "100", "--prompts", "4",
                                   "--max_n", "8", "--steps", "30", "--out", str(tmp_path)])
    rows = result["best_of_n"]
    assert [r["n"] for r in rows] == [1, 2, 4, 8]
    assert rows[0]["gold_z"] == 0.0 and rows[0]["proxy_z"] == 0.0
    # Best-of-n by the proxy raises the proxy; best-of-n by gold bounds the gold of any pick.
    assert rows[-1]["proxy"] > rows[0]["proxy"]
    assert all(r["gold"] <= r["oracle_gold"] + 1e-6 for r in rows)
    assert (tmp_path / "overopt.json").exists()
