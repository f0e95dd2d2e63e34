"""The registry: every name resolves and runs under jit; bad specs fail with what is valid."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import kl, registry

B, T = 4, 5


def _inputs(kind):
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    mask = jnp.asarray(np.arange(T)[None] < np.array([5, 3, 1, 4])[:, None], jnp.float32)
    return {
        "reward_loss": dict(chosen_rewards=f(B), rejected_rewards=f(B), rewards=f(B, 3)),
        "pref_loss": dict(policy_chosen_logps=-jnp.abs(f(B)) * 5,
                          policy_rejected_logps=-jnp.abs(f(B)) * 5,
                          ref_chosen_logps=-jnp.abs(f(B)) * 5, ref_rejected_logps=-jnp.abs(f(B)) * 5,
                          chosen_lengths=jnp.array([5.0, 3, 1, 4]),
                          rejected_lengths=jnp.array([2.0, 3, 5, 4]), chosen_nll=jnp.abs(f(B))),
        "policy_loss": dict(logps=-jnp.abs(f(B, T)), old_logps=-jnp.abs(f(B, T)),
                            advantages=f(B, T), mask=mask),
        "advantage": dict(rewards=f(B, T), values=f(B, T), mask=mask, group_size=2),
        "kl_estimator": dict(logps=-jnp.abs(f(B, T)), ref_logps=-jnp.abs(f(B, T))),
        "kl_controller": dict(state=kl.init_controller(0.1), kl=jnp.float32(3.0), n_steps=16),
        "loss_agg": dict(per_token=f(B, T), mask=mask, norm=float(T)),
    }[kind]


ALL_NAMES = [(kind, name) for kind in registry.KINDS for name in registry.names(kind)]


def test_every_kind_has_names():
    for kind in registry.KINDS:
        assert registry.names(kind), kind
    assert {"dpo", "cdpo", "ipo", "simpo", "orpo"} <= set(registry.names("pref_loss"))
    assert {"gae", "grpo", "rloo", "reinforce"} <= set(registry.names("advantage"))


@pytest.mark.parametrize("kind,name", ALL_NAMES)
def test_every_registered_name_resolves_and_runs_under_jit(kind, name):
    fn = registry.get(kind, name)
    inputs = _inputs(kind)
    # Sizes are static (they shape arrays); everything else is traced.
    static = {k: inputs.pop(k) for k in ("group_size", "n_steps") if k in inputs}
    out = jax.jit(lambda x: registry.call(fn, **x, **static))(inputs)
    eager = registry.call(fn, **inputs, **static)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(eager)):
        assert np.all(np.isfinite(a)), (kind, name)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_spec_binds_arguments():
    fn = registry.get("pref_loss", "ipo(tau=0.05)")
    assert isinstance(fn, functools.partial) and fn.keywords == {"tau": 0.05}
    fn = registry.get("policy_loss", "ppo_clip(clip_eps=0.1, clip_eps_high=0.3, agg='seq_mean_token_mean')")
    assert fn.keywords["agg"] == "seq_mean_token_mean"
    assert registry.get("pref_loss", " dpo ") is registry.get("pref_loss", "dpo")
    # A callable passes through, so code can take either a config string or a function.
    assert registry.get("pref_loss", len) is len


def test_bound_arguments_change_the_result_and_are_not_overridden_by_call():
    inputs = _inputs("advantage")
    adv_bound, _ = registry.call(registry.get("advantage", "grpo(group_size=4)"), **inputs)
    adv_default, _ = registry.call(registry.get("advantage", "grpo"), **inputs)
    assert not np.allclose(adv_bound, adv_default)
    expected, _ = registry.get("advantage", "grpo")(rewards=inputs["rewards"],
                                                   mask=inputs["mask"], group_size=4)
    np.testing.assert_allclose(adv_bound, expected)


def test_typo_lists_registered_names():
    with pytest.raises(ValueError) as e:
        registry.get("pref_loss", "dop(beta=0.1)")
    for name in ("cdpo", "dpo", "ipo", "orpo", "simpo"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="accepts: .*tau"):
        registry.get("pref_loss", "ipo(beta=0.1)")
    with pytest.raises(ValueError, match="kinds: reward_loss"):
        registry.get("pref_losses", "dpo")
    with pytest.raises(ValueError, match="beta must be > 0"):
        registry.call(registry.get("pref_loss", "dpo(beta=-1.0)"), **_inputs("pref_loss"))
    with pytest.raises(ValueError, match="tau must be > 0"):
        registry.call(registry.get("pref_loss", "ipo(tau=0)"), **_inputs("pref_loss"))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        registry.call(registry.get("policy_loss", "ppo_clip(dual_clip=0.5)"),
                      **_inputs("policy_loss"))


def test_same_spec_gives_the_same_object():
    # So a loss bound from a config string can be a static jit argument without recompiling.
    assert registry.get("pref_loss", "ipo(tau=0.05)") is registry.get("pref_loss", "ipo(tau=0.05)")


@pytest.mark.parametrize("spec,match", [
    ("ipo(0.05)", "by keyword"),
    ("ipo(tau=some_name)", "literal"),
    ("ipo(tau=[0.1])", "literal"),
    ("ipo(tau=0.1, tau=0.2)", "given twice"),
    ("ipo(tau=", "cannot parse"),
    ("losses.ipo", "cannot parse"),
    ("", "expected a name"),
])
def test_malformed_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        registry.get("pref_loss", spec)


def test_call_passes_only_declared_inputs_and_names_missing_ones():
    inputs = _inputs("pref_loss")
    loss, _ = registry.call(registry.get("pref_loss", "simpo"), **inputs)  # ignores ref_*
    assert np.isfinite(float(loss))
    assert not registry.accepts(registry.get("pref_loss", "simpo"), "ref_chosen_logps")
    assert registry.accepts(registry.get("pref_loss", "dpo"), "ref_chosen_logps")
    del inputs["chosen_nll"]
    with pytest.raises(TypeError, match="needs chosen_nll"):
        registry.call(registry.get("pref_loss", "orpo"), **inputs)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("pref_loss", "dpo", fn=lambda **kw: None)
