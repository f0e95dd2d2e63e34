"""Preference (DPO-family) stage: smoke runs from a smoke SFT checkpoint for every registered
loss, the reference pass skipped for reference-free losses, the zero margin at step 0, one
gradient step raising the chosen-minus-rejected margin, exact in-process resume.

The SIGKILL resume test lives in test_sft.py; the preference stage uses the same Checkpointer
and iterator state, so an in-process interruption (an exception right after a checkpoint) is
enough here and much faster.
"""

import functools
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _pairs import weighted_mean
from experiments import dpo as dpo_exp
from experiments import sft as sft_exp
from rlhf_jax import experiment, registry
from rlhf_jax.checkpoint import complete_steps
from rlhf_jax.data import batching
from rlhf_jax.errors import CheckpointError
from rlhf_jax.metrics import read_metrics
from rlhf_jax.trainers import common, preference, sft


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir holding a tiny SFT stage (the DPO stages' init_from) and the shared data."""
    root = tmp_path_factory.mktemp("pref")
    config = sft_exp.get_config("smoke")
    config.data.data_dir = str(root / "data")
    # A few steps are enough: the tests need a policy, not a good one.
    config.steps, config.save_every, config.eval_batches = 4, 4, 0
    sft.train(config, root)
    return root


def _config(workdir, **changes):
    config = dpo_exp.get_config("smoke")
    config.data.data_dir = str(workdir / "data")
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        setattr(node, last, value)
    return config


@pytest.fixture(scope="module")
def straight(workdir):
    """The smoke experiment run uninterrupted (default init_from = workdir/sft)."""
    config = _config(workdir)
    stage = dpo_exp.main(config, workdir)
    return config, stage


def _finite(row):
    return {k: v for k, v in row.items() if not math.isfinite(v)} == {}


def test_smoke_run_logs_finite_metrics_and_a_zero_margin_at_step_0(straight):
    config, stage = straight
    assert complete_steps(stage)[-1] == config.steps
    rows = read_metrics(stage)
    assert all(_finite(r) for r in rows)
    first, last = rows[0], rows[-1]
    # log_every=1: the first logged metrics are from the step-0 forward pass, where the policy
    # is the reference, so every implicit reward and the margin are exactly 0.
    assert first["step"] == 1
    assert first["dpo/margin"] == 0.0 and first["dpo/chosen_reward"] == 0.0
    assert first["dpo/loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    for key in ("pref/grad_norm", "time/tokens_per_s", "dpo/accuracy", "eval/pref_accuracy",
                "eval/pref_margin", "eval/gold_agreement", "gold/reward", "gold/ref_reward",
                "gold/ref_reward_std", "gold/gain", "objective/kl"):
        assert key in last, key
    assert 0.0 <= last["eval/pref_accuracy"] <= 1.0
    assert last["time/tokens_per_s"] > 0
    # Four tiny steps barely move the policy: its KL to the reference is near 0.
    assert abs(last["objective/kl"]) < 1.0
    _, _, cfg, tok, meta = common.load_stage(stage)
    assert meta["model_kind"] == "policy" and meta["step"] == config.steps
    assert meta["config"]["pref_loss"] == config.pref_loss and "data_state" in meta
    assert cfg.vocab_size == tok.vocab_size


@pytest.mark.parametrize("name", registry.names("pref_loss"))
def test_every_registered_loss_runs_and_skips_the_reference_when_it_is_not_needed(
        workdir, monkeypatch, name):
    traced = []
    original = preference.reference_logps

    def counting(*args, **kwargs):
        traced.append(1)  # runs at trace time: once per compile of a step that uses it
        return original(*args, **kwargs)

    monkeypatch.setattr(preference, "reference_logps", counting)
    # A private cache, so this step is traced afresh and other tests keep their compiled steps.
    monkeypatch.setattr(preference, "_compiled",
                        functools.lru_cache(maxsize=4)(preference._compiled.__wrapped__))
    # The evals are covered by the smoke run above; here only the update step of each loss.
    config = _config(workdir, pref_loss=name, stage=f"pref_{name}", steps=2, log_every=1,
                     save_every=2, eval_batches=0, **{"gen.n_prompts": 0})
    stage = preference.train(config, workdir)
    rows = read_metrics(stage)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(_finite(r) for r in rows)
    last = rows[-1]
    prefix = preference.metric_prefix(last)  # cdpo reports under "dpo/"
    assert f"{prefix}/accuracy" in last and "pref/grad_norm" in last
    needs_ref = registry.accepts(registry.get("pref_loss", name), "ref_chosen_logps")
    assert preference.needs_reference(registry.get("pref_loss", name)) == needs_ref
    assert bool(traced) == needs_ref, (name, len(traced))
    if name in ("simpo", "orpo"):
        assert not needs_ref  # reference-free by definition


def test_interrupted_run_resumes_to_the_same_params_and_one_step_raises_the_margin(
        workdir, straight, monkeypatch):
    config, stage = straight
    changes = dict(stage="dpo_resumed", save_every=1, eval_batches=0, **{"gen.n_prompts": 0})

    class Crash(Exception):
        pass

    class CrashingBar:
        """Stands in for the progress bar; 'crashes' right after the step-1 checkpoint."""

        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            raise Crash

        def set_postfix(self, *args, **kwargs):
            pass

        def close(self):
            pass

    with monkeypatch.context() as m:
        m.setattr(preference.metrics_lib, "progress", CrashingBar)
        with pytest.raises(Crash):
            preference.train(_config(workdir, **changes), workdir)
    assert complete_steps(workdir / "dpo_resumed") == [1]

    # One DPO step (no warm-up) raised the mean summed log-prob margin of chosen over rejected
    # on the batch it was taken on.
    graphdef, sft_params, _, tok, _ = common.load_stage(workdir / "sft")
    _, dpo_params, _, _, _ = common.load_stage(workdir / "dpo_resumed")
    it = batching.make_iterator(
        common.data_source(config.data, "pairs", "train", workdir), kind="pairs", tokenizer=tok,
        config=common.batch_config(config.data, batch_size=config.data.batch_size,
                                   seed=config.seed))
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    margin = jax.jit(lambda p: jnp.mean(
        jnp.subtract(*preference.pair_logps(graphdef, p, batch)[:2])))
    assert float(margin(dpo_params)) > float(margin(sft_params))

    resumed = preference.train(_config(workdir, **changes), workdir)
    _, a, _, _, meta_a = common.load_stage(stage)
    _, b, _, _, meta_b = common.load_stage(resumed)
    assert meta_a["step"] == meta_b["step"] == config.steps
    assert meta_a["data_state"] == meta_b["data_state"]
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)  # bitwise on CPU


def test_padding_pairs_carry_no_weight():
    """A pair with valid=0 changes neither the loss nor its metrics, whatever its values
    (even NaN)."""
    loss_fn = registry.get("pref_loss", "dpo(beta=0.5)")
    inputs = dict(policy_chosen_logps=jnp.array([-3.0, -1.0, -50.0]),
                  policy_rejected_logps=jnp.array([-4.0, -2.5, 7.0]),
                  ref_chosen_logps=jnp.array([-3.5, -1.2, 0.0]),
                  ref_rejected_logps=jnp.array([-3.0, -2.0, jnp.nan]))
    loss, m = weighted_mean(*preference.per_pair(loss_fn, **inputs),
                                       jnp.array([1, 1, 0]))
    want, want_m = loss_fn(**{k: v[:2] for k, v in inputs.items()})
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    for k in want_m:
        np.testing.assert_allclose(m[k], want_m[k], rtol=1e-6, atol=1e-7)


def test_unknown_loss_and_missing_sft_stage_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="registered: .*dpo"):
        preference.train(_config(tmp_path, pref_loss="dpoo"), tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        preference.train(_config(tmp_path), tmp_path)


def test_an_ablation_is_one_config_string():
    config = experiment.load_config(dpo_exp.get_config, {"pref_loss": "ipo(tau=0.1)",
                                                         "init_from": "/runs/x/sft"})
    fn = registry.get("pref_loss", config.pref_loss)
    assert fn.func.__name__ == "ipo" and fn.keywords == {"tau": 0.1}
    assert config.init_from == "/runs/x/sft" and config.stage == "dpo"
    with pytest.raises(ValueError, match="unknown config key 'pref_los'; did you mean "
                                         "'pref_loss'"):
        experiment.load_config(dpo_exp.get_config, {"pref_los": "ipo"})


def test_a_resume_from_another_sft_model_is_refused_and_a_moved_one_accepted(
        workdir, straight, tmp_path):
    # The SFT model is DPO's reference: resuming against another one would mix two runs.
    _, stage = straight
    quiet = dict(eval_batches=0, **{"gen.n_prompts": 0})   # changes a resume may make
    moved = tmp_path / "moved" / "sft"
    shutil.copytree(workdir / "sft", moved)
    assert preference.train(_config(workdir, init_from=str(moved), **quiet), workdir) == stage
    other = sft_exp.get_config("smoke")
    other.data.data_dir = str(workdir / "data")
    other.seed, other.steps, other.save_every, other.eval_batches = 1, 4, 4, 0
    sft.train(other, tmp_path)
    with pytest.raises(CheckpointError, match=r"started from init_from=.*sft \(step 4, params "
                                              r"fingerprint .*another checkpoint"):
        preference.train(_config(workdir, init_from=str(tmp_path / "sft"), **quiet), workdir)
