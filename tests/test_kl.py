"""KL estimators (bias, finiteness) and the KL controllers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import kl, registry


def _categoricals():
    p = jnp.array([0.4, 0.3, 0.15, 0.1, 0.05])
    q = jnp.array([0.1, 0.2, 0.2, 0.2, 0.3])
    return p, q


@pytest.mark.parametrize("kind,unbiased", [("k1", True), ("k3", True), ("k2", False)])
def test_estimator_bias_against_exact_kl(kind, unbiased):
    p, q = _categoricals()
    exact = float(jnp.sum(p * (jnp.log(p) - jnp.log(q))))
    n = 400_000
    idx = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(n,))
    est = np.asarray(kl.estimate(logps=jnp.log(p)[idx], ref_logps=jnp.log(q)[idx], kind=kind),
                     np.float64)
    stderr = est.std() / np.sqrt(n)
    if unbiased:
        assert abs(est.mean() - exact) < 4 * stderr
    else:
        assert abs(est.mean() - exact) > 20 * stderr
        # k2's expectation is 0.5 E[log(p/q)^2], not KL.
        expected_k2 = float(jnp.sum(p * 0.5 * (jnp.log(p) - jnp.log(q)) ** 2))
        assert abs(est.mean() - expected_k2) < 4 * stderr


def test_k3_is_nonnegative_and_k3_variance_below_k1():
    p, q = _categoricals()
    idx = jax.random.categorical(jax.random.key(1), jnp.log(p), shape=(100_000,))
    k1 = kl.estimate(logps=jnp.log(p)[idx], ref_logps=jnp.log(q)[idx], kind="k1")
    k3 = kl.estimate(logps=jnp.log(p)[idx], ref_logps=jnp.log(q)[idx], kind="k3")
    assert float(jnp.min(k3)) >= 0.0
    assert float(jnp.var(k3)) < float(jnp.var(k1))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_estimators_finite_at_extreme_log_ratios(kind):
    logps = jnp.array([-100.0, 0.0, -50.0, 0.0], jnp.bfloat16)
    ref = jnp.array([0.0, -100.0, 50.0, 0.0], jnp.bfloat16)
    est = kl.estimate(logps=logps, ref_logps=ref, kind=kind)
    assert est.dtype == jnp.float32
    assert np.all(np.isfinite(est))
    grads = jax.grad(lambda x: jnp.sum(kl.estimate(logps=x, ref_logps=ref, kind=kind)))(
        logps.astype(jnp.float32))
    assert np.all(np.isfinite(grads))


def test_estimate_masks_padding():
    est = kl.estimate(logps=jnp.array([[-1.0, -2.0]]), ref_logps=jnp.array([[-2.0, -1.0]]),
                      kind="k1", mask=jnp.array([[1, 0]]))
    np.testing.assert_allclose(est, [[1.0, 0.0]])
    # Padding may hold -inf log-probs: the estimate there is 0, not NaN.
    est = kl.estimate(logps=jnp.array([[-1.0, -jnp.inf]]), ref_logps=jnp.array([[-1.1, -jnp.inf]]),
                      kind="k3", mask=jnp.array([[1, 0]]))
    assert np.all(np.isfinite(est)) and float(est[0, 1]) == 0.0


def test_fixed_controller_never_moves():
    update = registry.get("kl_controller", "fixed")
    state = kl.init_controller(0.05)
    for observed in (0.0, 100.0):
        state = update(state, kl=observed, n_steps=64)
    assert float(state.kl_coef) == pytest.approx(0.05)


def test_adaptive_controller_proportional_rule():
    update = registry.get("kl_controller", "adaptive(target=6.0, horizon=10000)")
    state = kl.init_controller(0.2)
    up = update(state, kl=7.0, n_steps=512)  # above target: beta rises
    assert float(up.kl_coef) == pytest.approx(0.2 * (1 + (7 / 6 - 1) * 512 / 10000), rel=1e-6)
    down = update(state, kl=3.0, n_steps=512)  # below target: beta falls, error clipped at -0.2
    assert float(down.kl_coef) == pytest.approx(0.2 * (1 - 0.2 * 512 / 10000), rel=1e-6)
    far = update(state, kl=60.0, n_steps=512)  # error clipped at +0.2
    assert float(far.kl_coef) == pytest.approx(0.2 * (1 + 0.2 * 512 / 10000), rel=1e-6)
    assert float(update(state, kl=6.0, n_steps=512).kl_coef) == pytest.approx(0.2)
    # Pure and jittable: the state is a pytree of arrays.
    jitted = jax.jit(lambda s, k: update(s, kl=k, n_steps=512))
    assert float(jitted(state, 7.0).kl_coef) == pytest.approx(float(up.kl_coef), rel=1e-6)


def test_adaptive_controller_drives_kl_toward_target():
    # A toy system whose KL is inversely proportional to beta: the controller settles beta
    # where KL = target.
    update = registry.get("kl_controller", "adaptive(target=4.0, horizon=1000)")
    state = kl.init_controller(0.5)
    for _ in range(400):
        state = update(state, kl=2.0 / state.kl_coef, n_steps=100)
    assert 2.0 / float(state.kl_coef) == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize("kind", registry.names("kl_estimator"))
def test_estimate_ignores_padding_in_value_and_gradient(kind):
    # k2 and k3 of (-inf) - (-inf) are NaN. The estimate was set to 0 there, but by a where on
    # the output only, so the gradient at the padded position was 0 * NaN = NaN. Now both
    # log-probs are selected away first, whatever padding holds.
    mask = jnp.array([[1.0, 0.0, 0.0, 0.0, 0.0]])
    ref = jnp.array([[-1.2, -jnp.inf, jnp.nan, -1e30, 3e38]])
    padded = jnp.array([[-1.0, -jnp.inf, 1e30, jnp.nan, -jnp.inf]])
    clean = jnp.array([[-1.0, -2.0, -3.0, -4.0, -5.0]])

    def value_and_grad(lp, ref, mask):
        return jax.value_and_grad(lambda x: jnp.sum(
            kl.estimate(logps=x, ref_logps=ref, kind=kind, mask=mask)))(lp)

    value, grad = value_and_grad(padded, ref, mask)
    expected_value, expected_grad = value_and_grad(clean, jnp.full_like(ref, -1.2), mask)
    assert float(value) == float(expected_value)
    np.testing.assert_array_equal(grad, expected_grad)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[0, 1:] == 0.0)


def test_nan_in_the_mask_is_padding():
    # A position is valid where mask > 0; NaN > 0 is False (documented, not refused: refusing
    # would need a host sync inside jit).
    lp, ref = jnp.array([[-1.0, -jnp.inf]]), jnp.array([[-2.0, -1.0]])
    a = kl.estimate(logps=lp, ref_logps=ref, kind="k3", mask=jnp.array([[1.0, jnp.nan]]))
    b = kl.estimate(logps=lp, ref_logps=ref, kind="k3", mask=jnp.array([[1.0, 0.0]]))
    np.testing.assert_array_equal(a, b)
