"""Reward-model stage: smoke run from a smoke SFT run, normalisation, hand-off, resume, errors."""

import math
import os

import jax
import numpy as np
import pytest

from experiments import reward as rm_exp
from experiments import sft as sft_exp
from rlhf_jax import checkpoint, experiment, model
from rlhf_jax.checkpoint import complete_steps
from rlhf_jax.metrics import read_metrics
from rlhf_jax.trainers import common, reward


def _rm_config(data_dir, **overrides):
    return experiment.load_config(rm_exp.get_config, {
        "size": "smoke", "data.data_dir": str(data_dir), **overrides})


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A finished smoke SFT stage (and the data dir every run in this module shares)."""
    root = tmp_path_factory.mktemp("rm")
    config = experiment.load_config(sft_exp.get_config, {
        "size": "smoke", "data.data_dir": str(root / "data")})
    return sft_exp.main(config, root)


@pytest.fixture(scope="module")
def finished(sft_dir):
    """A finished smoke reward stage in the SFT run's workdir (init_from defaults to it)."""
    workdir = sft_dir.parent
    config = _rm_config(workdir / "data")
    return config, workdir, rm_exp.main(config, workdir)


def test_smoke_run_writes_a_reward_checkpoint_and_finite_metrics(finished):
    config, workdir, stage = finished
    steps = reward.total_steps(config)
    assert steps == 2048 // 32 and complete_steps(stage)[-1] == steps
    rows = read_metrics(stage)
    for key in ("rm/loss", "rm/accuracy", "rm/grad_norm", "time/tokens_per_s"):
        logged = [r[key] for r in rows if key in r]
        assert len(logged) == steps // config.log_every and all(map(math.isfinite, logged)), key
    final = rows[-1]
    for key in ("rm/eval_accuracy", "rm/eval_gold_accuracy", "rm/norm_gain", "rm/norm_bias",
                "rm/norm_mean_before", "rm/norm_std_before", "rm/norm_mean_after",
                "rm/norm_std_after", "rm/sft_gold_std", "rm/loss"):
        assert math.isfinite(final[key]), key
    assert 0.0 <= final["rm/eval_accuracy"] <= 1.0 and final["rm/eval_pairs"] == 256
    assert final["rm/eval_gold_accuracy"] > 0.6   # a trained reward model beats chance
    # The far-pair accuracy is NaN exactly when no test pair is that far apart.
    assert math.isfinite(final["rm/eval_gold_accuracy_far"]) == (final["rm/eval_far_pairs"] > 0)
    assert reward.results(stage)["rm/eval_accuracy"] == final["rm/eval_accuracy"]

    _, _, cfg, tok, meta = common.load_stage(stage, kind="reward")
    assert meta["model_kind"] == "reward" and meta["init_from"] == str(workdir / "sft")
    assert meta["normalization"]["rm/norm_gain"] == final["rm/norm_gain"]
    assert cfg.vocab_size == tok.vocab_size


def test_rerunning_a_finished_stage_is_a_no_op(finished, capsys):
    config, workdir, stage = finished
    last = stage / "checkpoints" / str(complete_steps(stage)[-1])
    before, lines = os.path.getmtime(last), len(open(stage / "metrics.jsonl").readlines())
    # Through the command line, as a user would re-run it.
    experiment.run(rm_exp.get_config, rm_exp.main, [
        "--workdir", str(workdir), "--config.size=smoke",
        f"--config.data.data_dir={config.data.data_dir}"])
    assert os.path.getmtime(last) == before
    assert len(open(stage / "metrics.jsonl").readlines()) == lines
    out = capsys.readouterr().out
    assert out.startswith(f"rm: finished at step {complete_steps(stage)[-1]} in {stage}\n")
    assert "\n  rm/eval_gold_accuracy " in out


def test_normalisation_gives_mean_0_std_1_on_the_sft_samples_and_folds_into_the_head(finished):
    """Recomputed from the restored checkpoint on the same (deterministic) SFT samples: the
    scores after loading are the ones the trainer normalised before saving."""
    config, workdir, stage = finished
    mesh, rules = common.setup_mesh(config, config.data.batch_size)
    graphdef, params, _, tok, meta = common.load_stage(stage, kind="reward", mesh=mesh,
                                                       rules=rules)
    policy = common.load_stage(workdir / "sft", kind="policy", mesh=mesh, rules=rules)[:2]
    samples = reward.sample_policy(config, workdir, policy, tok, mesh, rules)
    score = jax.jit(lambda p, t, m: model.apply_reward(graphdef, p, t, mask_bt=m))
    scores = np.concatenate([np.asarray(score(params, t, m))
                             for t, m in zip(samples["tokens"], samples["mask"])])
    norm = meta["normalization"]
    assert scores.size == norm["rm/norm_samples"] >= config.norm.n_samples
    assert abs(scores.mean()) < 1e-4 and abs(scores.std() - 1.0) < 1e-4
    np.testing.assert_allclose(scores.mean(), norm["rm/norm_mean_after"], atol=1e-5)
    np.testing.assert_allclose(scores.std(), norm["rm/norm_std_after"], rtol=1e-5)
    np.testing.assert_allclose(samples["gold"].std(), norm["rm/sft_gold_std"], rtol=1e-5)

    # Folding a gain and bias into the head is exactly that affine map of the scores, and
    # leaves its input alone.
    t, m = samples["tokens"][0], samples["mask"][0]
    folded = reward.fold_normalization(params, 2.5, -0.75)
    np.testing.assert_allclose(score(folded, t, m), 2.5 * score(params, t, m) - 0.75,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(score(params, t, m), scores[:len(t)])
    # The restored model scores the samples as the trainer's did just before saving.
    np.testing.assert_allclose(scores[:8], meta["score_probe"], rtol=1e-6, atol=1e-6)


def test_pair_accuracies_by_hand():
    rc = np.array([2.0, 0.0, 1.0, 3.0, 5.0])
    rr = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    valid = np.array([1, 1, 1, 1, 0])
    gold_c = np.array([0.5, 3.0, 0.0, 1.0, 9.0])
    gold_r = np.array([0.0, 0.0, 4.0, 1.0, 0.0])   # pair 3 is a gold tie: left out
    out = reward.pair_accuracies(rc, rr, valid=valid, gold_chosen=gold_c, gold_rejected=gold_r,
                                 far=2.0)
    assert out["rm/eval_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert out["rm/eval_gold_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert out["rm/eval_gold_accuracy_far"] == pytest.approx((0 + 0.5) / 2)
    assert out["rm/eval_far_pairs"] == 2 and out["rm/eval_pairs"] == 4


def test_resume_after_an_interruption_matches_the_uninterrupted_run(finished, tmp_path,
                                                                    monkeypatch):
    """Killed right after the step-16 checkpoint: the re-run resumes there (parameters,
    optimizer state, data position), trains steps 17-64 again and ends with the same
    normalised parameters and numbers as the uninterrupted run, bit for bit on the CPU."""
    config, workdir, stage = finished
    config = _rm_config(workdir / "data", init_from=str(workdir / "sft"))
    original = checkpoint.Checkpointer.save

    def save_then_die(self, step, **kwargs):
        saved = original(self, step, **kwargs)
        if step == 16:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        reward.train(config, tmp_path)
    assert complete_steps(tmp_path / "rm") == [8, 16]
    monkeypatch.setattr(checkpoint.Checkpointer, "save", original)
    resumed = reward.train(config, tmp_path)
    a = jax.device_get(common.load_stage(stage, kind="reward")[1])
    b = jax.device_get(common.load_stage(resumed, kind="reward")[1])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    got, want = reward.results(resumed), reward.results(stage)
    want["rm/train_seconds"] = got["rm/train_seconds"]   # wall time, the one thing that differs
    assert got == pytest.approx(want, nan_ok=True)


@pytest.mark.parametrize("override,match", [
    ({"init_from": "/nonexistent/sft"}, "--config.init_from=DIR"),
    ({}, r"WORKDIR/sft"),    # no SFT stage in an empty workdir
    ({"loss": "plackett_luce", "data.source": "tfds", "data.name": "pairs",
      "norm.prompts_name": "prompts"}, "only the review testbed"),
    ({"data.source": "tfds", "data.name": "pairs"}, "norm.prompts_name must name"),
    ({"loss": "hinge"}, "registered: bradley_terry"),
    ({"loss": "bradley_terry(marg=1.0)"}, "margin"),
    ({"steps": "-1"}, "steps=-1"),
    ({"data.batch_size": "0"}, "batch_size=0"),
])
def test_config_errors_say_what_to_change(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        config = _rm_config(tmp_path / "data", **override)
        rm_exp.main(config, tmp_path)


def test_rankings_batches_put_the_kth_response_of_every_prompt_in_block_k():
    tok = common.testbed().tokenizer
    source = [{"prompt": b"the film", "responses": [b"was good", b"was bad", b"was dull"]},
              {"prompt": b"that plot", "responses": [b"felt great", b"felt awful", b"felt ok"]}]
    config = common.batch_config(reward.default_config().data, batch_size=2, seed=0,
                                 shuffle=False)
    batch = next(reward.rankings_iterator(source, tokenizer=tok, config=config))
    assert batch["tokens"].shape == (6, 36) and batch["valid"].tolist() == [1, 1]
    for k in range(3):
        for b in range(2):
            row = batch["tokens"][k * 2 + b]
            n = int(batch["mask"][k * 2 + b].sum())
            expected = sum(common.testbed().encode_example(
                source[b]["prompt"].decode(), source[b]["responses"][k].decode()), [])
            assert row[:n].tolist() == expected and (row[n:] == tok.pad_id).all()


def test_init_from_a_reward_model_is_refused(finished):
    config, workdir, stage = finished
    with pytest.raises(ValueError, match="holds a reward model"):
        reward.train(_rm_config(workdir / "data", init_from=str(stage)), workdir / "other")


def test_plackett_luce_trains_on_rankings_end_to_end(sft_dir, tmp_path):
    config = _rm_config(sft_dir.parent / "data", init_from=str(sft_dir), loss="plackett_luce",
                        steps="4", **{"data.n_train": "256"})
    stage = reward.train(config, tmp_path)
    final = read_metrics(stage)[-1]
    assert final["step"] == 4 and math.isfinite(final["rm/loss"])
    assert 0.0 <= final["rm/pairwise_accuracy"] <= 1.0
    assert math.isfinite(final["rm/eval_gold_accuracy"])
    assert abs(final["rm/norm_mean_after"]) < 1e-4
