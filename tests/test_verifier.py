"""RL with a verifiable reward: the arithmetic task, the data-source registry, the exact_match
reward and the answer fields that travel with prompt batches, and the experiment end to end."""

import ml_collections
import numpy as np
import pytest

from rlhf_jax import registry, rewards
from rlhf_jax.data import arithmetic, batching, sources
from rlhf_jax.data.records import DataError
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import common, rl


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------

def test_problems_are_right_distinct_and_deterministic():
    rows = arithmetic.examples(300, digits=2, seed=3)
    assert rows == arithmetic.examples(300, digits=2, seed=3)
    assert len({r["prompt"] for r in rows}) == 300
    for r in rows:
        a, b = (int(x.replace(" ", "")) for x in r["prompt"].rstrip(" =").split(" + "))
        assert 0 <= a < 100 and 0 <= b < 100
        assert r["answer"] == str(a + b) and r["completion"] == " ".join(str(a + b))
    assert arithmetic.problem(47, 15) == {"prompt": "4 7 + 1 5 =", "completion": "6 2",
                                          "answer": "62"}
    held_out = frozenset(r["prompt"] for r in rows[:50])
    assert not held_out & {r["prompt"] for r in arithmetic.examples(200, digits=2, seed=4,
                                                                     exclude=held_out)}
    with pytest.raises(ValueError, match="do not exist"):
        arithmetic.examples(101, digits=1, seed=0)


def test_noisy_demonstrations_slip_in_format_and_keep_the_answer():
    clean = arithmetic.examples(2000, digits=2, seed=0)
    noisy = arithmetic.examples(2000, digits=2, seed=0, noise=0.3)
    slipped = [(c, n) for c, n in zip(clean, noisy) if c != n]
    # The noise draws from the same generator, so the problems drift apart after the first
    # slip; compare each noisy record with its own answer instead.
    wrong = [n for n in noisy if "".join(n["completion"].split()) != n["answer"]]
    assert slipped and abs(len(wrong) / len(noisy) - 0.3) < 0.04
    for n in wrong:
        got, want = n["completion"].split(), list(n["answer"])
        assert got == want + want[-1:] or got == want[:-1]
    rng = np.random.default_rng(0)
    assert {arithmetic.slip("6 2", rng) for _ in range(50)} == {"6", "6 2 2"}
    assert arithmetic.slip("7", rng) == "7 7"       # a single digit is never left out


def test_the_task_has_its_own_tokenizer_and_leaves_the_reviews_alone():
    tok = arithmetic.tokenizer()
    assert tok.vocab_size == 16
    assert tok.decode(tok.encode("4 7 + 1 5 =")) == "4 7 + 1 5 ="
    assert sources.get("synthetic").tokenizer().vocab_size == 281


# ----------------------------------------------------------------------------------------------
# Data sources: a registry kind; trainers ask the source, not its name
# ----------------------------------------------------------------------------------------------

def _data(source, tmp_path, **kw):
    return ml_collections.ConfigDict(dict(source=source, name="", data_dir=str(tmp_path),
                                          n_train=kw.get("n_train", 60),
                                          n_test=kw.get("n_test", 12), seed=0))


def test_arithmetic_source_prepares_held_out_splits_with_answers(tmp_path):
    data = _data("arithmetic(digits=1)", tmp_path)
    train = common.data_source(data, "sft", "train", tmp_path)
    test = common.data_source(data, "sft", "test", tmp_path)
    assert len(train) == 60 and len(test) == 12
    as_str = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    train_prompts = {as_str(r["prompt"]) for r in train}
    assert not train_prompts & {as_str(r["prompt"]) for r in test}
    r = test[0]
    assert set(r) == {"prompt", "completion", "answer"}
    assert as_str(r["completion"]).replace(" ", "") == as_str(r["answer"])
    prompts = common.data_source(data, "prompts", "test", tmp_path)
    assert set(prompts[0]) == {"prompt", "answer"}
    # The same held-out problems whichever kind reads them.
    assert [as_str(p["prompt"]) for p in prompts] == [as_str(t["prompt"]) for t in test]


def test_sources_answer_what_trainers_ask(tmp_path):
    reviews, sums, tfds = (sources.get(s) for s in ("synthetic", "arithmetic", "tfds"))
    assert reviews.gold(reviews.tokenizer()).expr == "gold"
    assert reviews.gold(sums.tokenizer()) is None      # r* reads the reviews' token ids
    assert sums.gold(reviews.tokenizer()).expr == "exact_match"   # text: any tokenizer
    assert tfds.gold(reviews.tokenizer()) is None and tfds.tokenizer() is None
    assert reviews.generated and sums.generated and not tfds.generated
    assert registry.names("data_source") == ["arithmetic", "synthetic", "tfds"]
    with pytest.raises(ConfigError, match=r"^data.source='arithmetic' has no 'pairs' records "
                                          r"\(it has sft, prompts\)"):
        common.data_source(_data("arithmetic", tmp_path), "pairs", "train", tmp_path)
    with pytest.raises(ConfigError, match=r"data.source='arithmetic\(digits=1\)': 200 distinct"):
        common.data_source(_data("arithmetic(digits=1)", tmp_path, n_train=200), "sft",
                           "train", tmp_path)
    with pytest.raises(ConfigError, match="digits=7 must be an int in"):
        sources.get("arithmetic(digits=7)")


def test_gold_reward_on_a_source_without_tables_is_refused_at_config_load():
    from experiments import grpo_verifier
    config = grpo_verifier.get_config("smoke").grpo
    config.reward = "gold"
    with pytest.raises(ConfigError, match="the 'gold' reward reads the review testbed's gold "
                                          "tables, which data.source="):
        rl.validate(config)


# ----------------------------------------------------------------------------------------------
# The reward and the fields it reads
# ----------------------------------------------------------------------------------------------

def test_exact_match_golden_values():
    em = registry.get("reward", "exact_match")
    fields = {"answer": np.array(["62", "62", "62", "62", "7"], object)}
    texts = ["6 2", " 62 ", "6 2 2", "", "7"]
    np.testing.assert_array_equal(em(texts=texts, fields=fields), [1, 1, 0, 0, 1])
    # With a pattern: its last match is the answer (group 1 when it has one).
    gsm = registry.get("reward", r"exact_match(field='solution', pattern='####\\s*(-?[0-9,]+)')")
    got = gsm(texts=["so #### 1,024", "#### 3 then #### 4", "no answer", "#### -5"],
              fields={"solution": ["1,024", "4", "no answer", "-5"]})
    np.testing.assert_array_equal(got, [1, 1, 0, 1])
    assert rewards.record_fields(rewards.parse("exact_match")) == ("answer",)
    assert rewards.record_fields(rewards.parse(
        "exact_match(field='solution') + 0.1*length_penalty(target=4)")) == ("solution",)
    assert rewards.record_fields(rewards.parse("gold")) == ()
    with pytest.raises(ConfigError, match="field=''"):
        rewards.parse("exact_match(field='')")


def test_prompt_batches_carry_the_fields_a_reward_reads():
    tok = arithmetic.tokenizer()
    records = arithmetic.examples(5, digits=2, seed=0)
    config = batching.BatchConfig(batch_size=8, buckets=(12,), max_prompt_len=8, seed=0,
                                  shuffle=False, num_epochs=1, drop_remainder=False)
    batch = next(batching.make_iterator(records, kind="prompts", tokenizer=tok, config=config,
                                        text_fields=("answer",)))
    assert list(batch["answer"]) == [r["answer"] for r in records] + ["", "", ""]
    assert batch["answer"].dtype == object and list(batch["valid"]) == [1] * 5 + [0] * 3
    broken = [dict(records[0]), {"prompt": records[1]["prompt"]}]
    it = batching.make_iterator(broken, kind="prompts", tokenizer=tok, config=config,
                                text_fields=("answer",), name="sums/train")
    with pytest.raises(DataError, match=r"sums/train.*record 1.*answer.*missing"):
        next(it)


# ----------------------------------------------------------------------------------------------
# End to end: SFT on noisy demonstrations, then GRPO on exact match
# ----------------------------------------------------------------------------------------------

def test_grpo_on_exact_match_raises_the_rate_above_sft(tmp_path, capsys):
    from experiments import grpo_verifier
    from rlhf_jax import experiment
    experiment.run(grpo_verifier.get_config, grpo_verifier.main,
                   ["--workdir", str(tmp_path), "--config.size=smoke"])
    before, after = grpo_verifier.exact_match_rates(tmp_path / "grpo")
    out = capsys.readouterr().out
    assert f"SFT {before:.3f} -> GRPO {after:.3f}" in out
    assert after > before + 0.05, (before, after)
