"""Reward sources (rlhf_jax/rewards.py): expressions, golden values of the shaping terms, and
the one scoring path (rlhf_jax/rollout.py) against the computations it replaced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import kl as kl_lib, model as M, rewards, rollout, sampling
from rlhf_jax.errors import ConfigError


def test_expressions_parse_into_weighted_terms():
    terms = rewards.parse("model + 0.1*length_penalty(target=20) - 2.5e-1 * overlong(max_len=48,"
                          " cache=8)")
    assert [(t.coef, t.name, t.host) for t in terms] == [
        (1.0, "model", False), (0.1, "length_penalty", False), (-0.25, "overlong", False)]
    assert rewards.parse("regex(pattern='a+b')")[0].host
    assert rewards.names("gold - 0.5*overlong") == {"gold", "overlong"}


@pytest.mark.parametrize("expr,match", [
    ("", "expected a reward expression"),
    ("modle", "unknown reward 'modle'; registered: .*gold.*model"),
    ("model + x*gold", "'x' is not a number"),
    ("model + ", "an empty term"),
    ("model + gold + 0.5*model", r"\['model'\] appear more than once"),
    ("length_penalty(target=0)", "target=0 must be an int >= 1"),
    ("gold(scale=2)", "has no argument 'scale'"),
])
def test_bad_expressions_say_what_is_wrong(expr, match):
    with pytest.raises(ConfigError, match=match):
        rewards.parse(expr)


def test_shaping_terms_golden_values():
    mask = jnp.asarray([[1] * n + [0] * (20 - n) for n in (10, 12, 14, 16, 17, 20)])
    # length_penalty(target=10): -|L - 10| / 10 for L = 10, 12, 14, 16, 17, 20.
    np.testing.assert_allclose(rewards.length_penalty(completion_mask=mask, target=10),
                               [0, -0.2, -0.4, -0.6, -0.7, -1.0], rtol=1e-6)
    # DAPO overlong with L_max = 16, L_cache = 4: 0 up to 12, then (12 - L) / 4, -1 above 16.
    np.testing.assert_allclose(rewards.overlong(completion_mask=mask, max_len=16, cache=4),
                               [0, 0, -0.5, -1.0, -1.0, -1.0], rtol=1e-6)
    np.testing.assert_array_equal(
        rewards.regex(texts=["good movie", "bad", "so good"], pattern="good"), [1, 0, 1])
    np.testing.assert_array_equal(
        rewards.regex(texts=["good", "good!"], pattern="good", full=True), [1, 0])


class _Words:
    """Decodes ids as letters, for a text reward on a tiny model."""
    pad_id = 0

    def decode_batch(self, rows):
        return ["".join(chr(ord("a") + int(i) % 26) for i in row if i) for row in rows]


def test_one_scoring_path_reproduces_what_it_replaced():
    cfg = M.get_config("tiny")
    graphdef, policy = M.create(cfg, seed=0)
    _, ref = M.create(cfg, seed=1)
    rm_graphdef, rm = M.create(cfg, seed=2, kind="reward")
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(4, cfg.vocab_size, (4, 6)))
    prompt_mask = jnp.ones((4, 6), jnp.int32).at[1, :2].set(0)
    terms = rewards.parse("model + 0.5*length_penalty(target=4) + 0.25*regex(pattern='a')")
    r = rollout.sample_and_score(
        graphdef=graphdef, terms=terms, params={"policy": policy, "ref": ref, "reward": rm},
        prompt=prompt, prompt_mask=prompt_mask, rng=jax.random.key(3), max_new_tokens=8,
        temperature=1.0, stop_ids=(3, 5), pad_id=0, tokenizer=_Words(), recompute=True,
        reward_graphdef=rm_graphdef)
    completion, cmask = sampling.generate((graphdef, policy), prompt, prompt_mask,
                                          jax.random.key(3), max_new_tokens=8, temperature=1.0,
                                          eos_id=(3, 5), pad_id=0)[:2]
    np.testing.assert_array_equal(r["completion"], completion)
    cm = cmask.astype(jnp.int32)
    seq, seq_mask = rollout.join(prompt, prompt_mask, completion, cm)
    logps = rollout.completion_logps(graphdef, policy, seq, seq_mask, completion, cm)
    ref_logps = rollout.completion_logps(graphdef, ref, seq, seq_mask, completion, cm)
    np.testing.assert_allclose(r["logps"], logps, atol=1e-6)
    np.testing.assert_allclose(r["sample_logps"], logps, atol=1e-4)   # the sampler agrees
    np.testing.assert_allclose(r["kl"], jnp.sum(kl_lib.estimate(
        logps=logps, ref_logps=ref_logps, kind="k1", mask=cm), axis=1), atol=1e-5)
    rm_score = M.apply_reward(rm_graphdef, rm, seq, mask_bt=seq_mask)
    np.testing.assert_allclose(r["reward/model"], rm_score, atol=1e-6)
    texts = _Words().decode_batch(np.where(cm > 0, completion, 0))
    regex = np.asarray([1.0 if "a" in t else 0.0 for t in texts])
    np.testing.assert_array_equal(r["reward/regex"], regex)
    length = -np.abs(np.sum(cm, 1) - 4) / 4
    np.testing.assert_allclose(r["reward"], rm_score + 0.5 * length + 0.25 * regex, atol=1e-5)
    eos = np.any(np.isin(np.asarray(completion), [3, 5]) & (np.asarray(cm) > 0), axis=1)
    np.testing.assert_array_equal(r["eos"], eos)
    assert r["time/reward_host_s"] >= 0
    # A monitored term is computed and returned, but not added to the reward.
    m = rollout.score(graphdef=graphdef, terms=rewards.parse("model"),
                      monitor=rewards.parse("length_penalty(target=4)"),
                      params={"reward": rm}, prompt=prompt, prompt_mask=prompt_mask,
                      completion=completion, completion_mask=cmask,
                      sample_logps=r["sample_logps"], temperature=1.0, stop_ids=(3, 5),
                      reward_graphdef=rm_graphdef)
    np.testing.assert_allclose(m["reward/length_penalty"], length, atol=1e-6)
    np.testing.assert_array_equal(m["reward"], m["reward/model"])
    assert "kl" not in m and "ref_logps" not in m     # no reference given, none computed


def test_every_token_reward_runs_under_jit_as_eagerly():
    from rlhf_jax import registry
    from rlhf_jax.trainers import common
    bed = common.testbed()
    cfg = M.get_config("tiny", vocab_size=bed.tokenizer.vocab_size)
    rm_graphdef, rm = M.create(cfg, seed=0, kind="reward")
    rng = np.random.default_rng(1)
    seq = jnp.asarray(rng.integers(4, bed.tokenizer.vocab_size, (3, 10)))
    prompt_mask = jnp.ones((3, 4), jnp.int32)
    completion_mask = jnp.asarray([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5], jnp.int32)
    inputs = dict(seq=seq, seq_mask=jnp.concatenate([prompt_mask, completion_mask], 1),
                  prompt_mask=prompt_mask, completion=seq[:, 4:],
                  completion_mask=completion_mask,
                  tables={k: jnp.asarray(v) for k, v in bed.tables.items()})
    for name in registry.names("reward"):
        term = rewards.parse(name)[0]
        if term.host:
            continue
        fn = lambda x, rm_params: registry.call(  # noqa: E731
            term.fn, **x, reward_model=(rm_graphdef, rm_params))
        out, eager = jax.jit(fn)(inputs, rm), fn(inputs, rm)
        assert out.shape == (3,) and np.all(np.isfinite(out)), name
        np.testing.assert_allclose(out, eager, rtol=1e-5, atol=1e-6)


def test_gold_fields_are_read_off_the_records():
    from rlhf_jax.trainers import common
    with_gold = [{"prompt": "p", "chosen": "a", "rejected": "b", "gold_chosen": 1.0,
                  "gold_rejected": 0.5}]
    assert common.gold_fields(with_gold) == ("gold_chosen", "gold_rejected")
    assert common.gold_fields([{"prompt": "p", "chosen": "a", "rejected": "b"}]) == ()
    assert common.gold_fields([]) == ()
