"""The registry: every name resolves and runs under jit; bad specs fail with what is valid."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import kl, registry, rewards, schema  # noqa: F401 (registers the rewards)
from rlhf_jax.errors import ConfigError

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
        "advantage": dict(rewards=f(B, T), values=f(B, T), mask=mask, group_size=2,
                          baseline=f(B)),
        "kl_estimator": dict(logps=-jnp.abs(f(B, T)), ref_logps=-jnp.abs(f(B, T))),
        "kl_controller": dict(state=kl.init_controller(0.1), kl=jnp.float32(3.0), n_steps=16),
        "loss_agg": dict(per_token=f(B, T), mask=mask, norm=float(T)),
        "unpaired_loss": dict(policy_logps=-jnp.abs(f(B)) * 5, ref_logps=-jnp.abs(f(B)) * 5,
                              desirable=jnp.array([1.0, 0.0, 1.0, 0.0]),
                              kl_policy_logps=-jnp.abs(f(B)) * 5,
                              kl_ref_logps=-jnp.abs(f(B)) * 5),
    }[kind]


# Reward sources take rollouts (token ids, a reward model, the testbed's tables, decoded text):
# tests/test_rewards.py runs each of them, under jit where it is a token reward. Data sources
# return record sources, not arrays: tests/test_verifier.py and the data tests read each.
# Adapters return ModelConfig fields: tests/test_lora.py builds models with them.
ALL_NAMES = [(kind, name) for kind in registry.KINDS
             if kind not in ("reward", "data_source", "adapter")
             for name in registry.names(kind)]


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
    fn = registry.get("policy_loss", "ppo_clip(clip_eps=0.1, clip_eps_high=0.3, dual_clip=None)")
    assert fn.keywords == {"clip_eps": 0.1, "clip_eps_high": 0.3, "dual_clip": None}
    assert registry.get("pref_loss", " dpo ") is registry.get("pref_loss", "dpo")
    # A callable passes through, so code can take either a config string or a function.
    assert registry.get("pref_loss", len) is len


def test_bound_arguments_change_the_result_and_are_not_overridden_by_call():
    inputs = _inputs("advantage")
    adv_bound, _ = registry.call(registry.get("advantage", "grpo(scale=False)"), **inputs)
    adv_default, _ = registry.call(registry.get("advantage", "grpo"), **inputs)
    assert not np.allclose(adv_bound, adv_default)
    # The bound value wins over one the caller passes.
    adv_called, _ = registry.call(registry.get("advantage", "grpo(scale=False)"), **inputs,
                                  scale=True)
    expected, _ = registry.get("advantage", "grpo")(rewards=inputs["rewards"],
                                                   mask=inputs["mask"], group_size=2,
                                                   scale=False)
    np.testing.assert_allclose(adv_bound, expected)
    np.testing.assert_allclose(adv_called, expected)


def test_typo_lists_registered_names():
    with pytest.raises(ValueError) as e:
        registry.get("pref_loss", "dop(beta=0.1)")
    for name in ("cdpo", "dpo", "ipo", "orpo", "simpo"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="accepts: .*tau"):
        registry.get("pref_loss", "ipo(beta=0.1)")
    with pytest.raises(ValueError, match="kinds: reward_loss"):
        registry.get("pref_losses", "dpo")
    # Out-of-range values fail when the spec is read (config load), not at the first trace.
    with pytest.raises(ConfigError, match=r"beta=-1.0 must be a number > 0"):
        registry.get("pref_loss", "dpo(beta=-1.0)")
    with pytest.raises(ConfigError, match="tau=0 must be a number > 0"):
        registry.get("pref_loss", "ipo(tau=0)")
    with pytest.raises(ConfigError, match="dual_clip=0.5 must be a number > 1"):
        registry.get("policy_loss", "ppo_clip(dual_clip=0.5)")
    # Inputs the trainer passes are not config arguments.
    with pytest.raises(ConfigError, match="no argument 'group_size'.*accepts: scale, eps"):
        registry.get("advantage", "grpo(group_size=4)")


@pytest.mark.parametrize("spec,match", [
    ("ppo_clip(clip_eps=0)", r"clip_eps=0 must be a number in \(0, 1\)"),
    ("ppo_clip(clip_eps=1.5)", r"clip_eps=1.5 must be a number in \(0, 1\)"),
    ("ppo_clip(clip_eps=True)", "clip_eps=True must be a number"),
    ("ppo_clip(clip_eps='0.2')", "clip_eps='0.2' must be a number"),
    ("ppo_clip(clip_eps_high=-0.1)", "clip_eps_high=-0.1 must be a number > 0"),
])
def test_argument_ranges_are_checked_at_lookup(spec, match):
    with pytest.raises(ConfigError, match=match):
        registry.get("policy_loss", spec)


@pytest.mark.parametrize("kind,spec,match", [
    ("advantage", "grpo(eps=-0.001)", "eps=-0.001 must be a number >= 0"),
    ("advantage", "gae(gamma=1.5)", r"gamma=1.5 must be a number in \[0, 1\]"),
    ("advantage", "best_of_n(top=0)", "top=0 must be an int >= 1"),
    ("advantage", "best_of_n(top=1.0)", "top=1.0 must be an int >= 1"),
    ("kl_controller", "adaptive(target=-1.0)", "target=-1.0 must be a number > 0"),
    ("kl_controller", "adaptive(horizon=0)", "horizon=0 must be a number > 0"),
    ("loss_agg", "seq_mean_token_sum_norm(norm=0)", "norm=0 must be a number > 0"),
    ("pref_loss", "dpo(label_smoothing=0.5)", r"label_smoothing=0.5 must be a number in \[0, 0.5\)"),
    ("reward_loss", "bradley_terry(center_coef=-1)", "center_coef=-1 must be a number >= 0"),
])
def test_every_kind_declares_ranges(kind, spec, match):
    with pytest.raises(ConfigError, match=match):
        registry.get(kind, spec)


def test_declared_arguments_are_keyword_parameters_of_every_function():
    # The registry is the one list: every registered function says what a config may set, and
    # each declared argument is a real parameter with a range.
    for kind, name in ALL_NAMES:
        fn = registry.get(kind, name)
        params = inspect.signature(fn).parameters
        for arg, field in registry.arguments(kind, name).items():
            assert arg in params, (kind, name, arg)
            assert isinstance(field, schema.Field) and field.describe(), (kind, name, arg)
    with pytest.raises(TypeError, match="not parameters"):
        registry.register("pref_loss", "bogus", fn=lambda *, x=1: None,
                          args={"y": schema.Float()})


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


def test_the_readme_table_is_the_registry():
    """README.md's table of registered functions is what tools.registry_table generates; after
    registering a function, run `python -m tools.registry_table --write`."""
    from tools import registry_table
    text = registry_table.README.read_text()
    assert registry_table.block() in text, "run: python -m tools.registry_table --write"
