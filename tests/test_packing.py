"""Sequence packing (data.packing): the model's segment mask and positions, the packer, and
the SFT, reward-model and DPO losses on packed rows against the same examples unpacked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import model
from rlhf_jax.data import batching

TINY = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
            max_len=32)


def _alone_vs_packed(cfg, seqs, kind="policy"):
    """Per-token outputs of each sequence run alone, and of one row holding all of them."""
    graphdef, params = model.create(cfg, seed=0, kind=kind)
    row = np.concatenate(seqs)[None]
    seg = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(seqs)])[None]
    t = row.shape[1] + 3                     # and a padded tail, segment 0
    tokens = np.pad(row, ((0, 0), (0, t - row.shape[1])))
    seg = np.pad(seg, ((0, 0), (0, t - seg.shape[1])))
    packed = model.apply(graphdef, params, jnp.asarray(tokens),
                         segment_ids_bt=jnp.asarray(seg))[0][0]
    alone = [model.apply(graphdef, params, jnp.asarray(s)[None])[0][0] for s in seqs]
    return np.asarray(packed), [np.asarray(a) for a in alone]


@pytest.mark.parametrize("options", [
    {}, {"layer_types": ("sliding", "full"), "sliding_window": 3},
    {"attention": "dot_product", "position": "learned"}],
    ids=["rope", "sliding", "dot_product_learned_positions"])
def test_a_packed_row_gives_each_example_the_logits_it_has_alone(options):
    cfg = model.ModelConfig(**TINY, **options)
    seqs = [np.array([1, 5, 7, 9, 11, 3]), np.array([1, 4, 4, 8, 2]), np.array([1, 6])]
    packed, alone = _alone_vs_packed(cfg, seqs)
    start = 0
    for a in alone:
        np.testing.assert_allclose(packed[start:start + len(a)], a, atol=1e-5, rtol=0)
        start += len(a)
    assert np.isfinite(packed).all()     # padding queries are not empty rows either


def test_segment_positions_restart_at_each_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(model.segment_positions(seg),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0]])


# ---------------------------------------------------------------------------------------------
# The packer
# ---------------------------------------------------------------------------------------------

HAND = [{"prompt": [1, 5, 6], "completion": [7, 8, 2], "truncated": 0},
        {"prompt": [1, 9], "completion": [3, 2], "truncated": 0},
        None,                                                      # skipped (overlong="skip")
        {"prompt": [1, 4, 4, 4, 4], "completion": [5, 5, 5, 2], "truncated": 1}]


def test_packing_a_hand_example_and_its_padding_fractions():
    b = batching.collate_packed(HAND, kind="sft", batch_size=4, buckets=(8, 10), pad_id=0)
    # First fit in stream order into rows of 10: [ex0 ex1] [ex3]; 4 sequences -> 2 rows.
    np.testing.assert_array_equal(b["tokens"], [[1, 5, 6, 7, 8, 2, 1, 9, 3, 2],
                                                [1, 4, 4, 4, 4, 5, 5, 5, 2, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1] * 6 + [2] * 4, [1] * 9 + [0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
                                                   list(range(9)) + [0]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 1, 1, 1, 0, 0, 1, 1],
                                                   [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(b["seq_index"], [[0] * 6 + [1] * 4, [3] * 9 + [4]])
    np.testing.assert_array_equal(b["read_at"], [5, 9, 0, 18])
    np.testing.assert_array_equal(b["seq_lengths"], [6, 4, 0, 9])
    np.testing.assert_array_equal(b["valid"], [1, 1, 0, 1])
    np.testing.assert_array_equal(b["skipped"], [0, 0, 1, 0])
    np.testing.assert_array_equal(b["truncated"], [0, 0, 0, 1])
    # Unpacked: 4 rows of the bucket 10 (longest 9) hold 19 real tokens; packed: 2 rows of 10.
    assert batching.collate(HAND, kind="sft", batch_size=4, buckets=(8, 10),
                            pad_id=0)["tokens"].shape == (4, 10)
    stats = batching.PaddingStats((8, 10))
    stats.add(b)
    assert stats.fractions() == pytest.approx((1 - 19 / 40, 1 - 19 / 20))
    assert stats.line("sft") == ("sft: packing: padding 52.5% of tokens unpacked -> 5.0% "
                                 "packed (1 batch)")
    assert stats.metrics() == pytest.approx({"data/padding_unpacked": 0.525,
                                             "data/padding_packed": 0.05})


def test_row_counts_halve_down_to_what_the_rows_need():
    assert batching.packed_row_count(3, 64) == 4
    assert batching.packed_row_count(17, 64, 8) == 32
    assert batching.packed_row_count(5, 16, 8) == 8     # a multiple of 8, never fewer
    assert batching.packed_row_count(16, 16, 8) == 16
    assert batching.first_fit([5, 6, 4, 1, 5], 10) == [[0, 2, 3], [1], [4]]


@pytest.fixture(scope="module")
def tb():
    from rlhf_jax.data import synthetic
    return synthetic.Testbed()


CFG = dict(batch_size=8, buckets=(36, 72), max_prompt_len=12, shuffle=True, seed=3)


def _sequences(batch, packed: bool):
    """{sequence index: (tokens, loss mask)} of a batch, packed or not."""
    out = {}
    if packed:
        for r, row in enumerate(batch["seq_index"]):
            for i in set(row.tolist()) - {len(batch["read_at"])}:
                at = row == i
                out[i] = (batch["tokens"][r][at].tolist(), batch["loss_mask"][r][at].tolist())
        return out
    for i, (row, m) in enumerate(zip(batch["tokens"], batch["mask"])):
        if m.any():
            lm = batch["loss_mask"][i][m > 0].tolist()
            out[i] = (row[m > 0].tolist(), [0] + lm[1:])   # token 0 is never a target
    return out


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_packed_batches_hold_the_same_sequences_whole_and_resume_exactly(tb, kind):
    rows = (tb.sft_examples(40, seed=0) if kind == "sft"
            else tb.preference_pairs(40, seed=0))

    def it(packing):
        return batching.make_iterator(rows, kind=kind, tokenizer=tb.tokenizer,
                                      config=batching.BatchConfig(**CFG, packing=packing,
                                                                  prefetch=0))

    plain, packed, again = it(False), it(True), it(True)
    for _ in range(3):
        u, p, q = next(plain), next(packed), next(again)
        for key in p:
            np.testing.assert_array_equal(p[key], q[key])       # deterministic
        assert _sequences(p, True) == _sequences(u, False)      # nothing split, lost or added
        assert p["tokens"].shape[0] < u["tokens"].shape[0] and p["tokens"].shape[1] == 72
        assert int(p["mask"].sum()) == int(u["mask"].sum())
    state = packed.get_state()
    resumed = it(True)
    resumed.set_state(state)
    a, b = next(packed), next(resumed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    plain.set_state(state)
    assert _sequences(a, True) == _sequences(next(plain), False)


# ---------------------------------------------------------------------------------------------
# The losses on packed rows equal the unpacked ones
# ---------------------------------------------------------------------------------------------

def _batches(tb, kind, rows):
    def one(packing):
        it = batching.make_iterator(rows, kind=kind, tokenizer=tb.tokenizer,
                                    config=batching.BatchConfig(**CFG, packing=packing,
                                                                prefetch=0))
        return {k: jnp.asarray(v) for k, v in next(it).items()}
    return one(False), one(True)


def _grad_gap(loss, params, plain, packed):
    step = jax.jit(jax.value_and_grad(loss))
    (a, ga), (b, gb) = (step(params, x) for x in (plain, packed))
    gap = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(ga),
                                                                 jax.tree.leaves(gb)))
    return abs(float(a) - float(b)), gap, float(a)


def test_sft_loss_and_gradient_are_the_same_packed(tb):
    from rlhf_jax.aggregation import aggregate
    from rlhf_jax.trainers import common
    cfg = model.ModelConfig(**{**TINY, "vocab_size": tb.tokenizer.vocab_size, "max_len": 72})
    graphdef, params = model.create(cfg, seed=0)

    def loss(params, batch):       # the SFT trainer's loss_fn
        logps, _ = common.sequence_logps(graphdef, params, batch["tokens"], batch["mask"],
                                         batch["loss_mask"], packed=common.packed_inputs(batch))
        return aggregate(-logps, batch["loss_mask"][:, 1:], "token_mean")

    plain, packed = _batches(tb, "sft", tb.sft_examples(8, seed=1))
    d_loss, d_grad, value = _grad_gap(loss, params, plain, packed)
    print(f"sft packed vs unpacked: |loss diff| {d_loss:.1e}, max |grad diff| {d_grad:.1e}")
    assert value > 1 and d_loss < 1e-5 and d_grad < 1e-6


def test_dpo_and_reward_model_losses_and_gradients_are_the_same_packed(tb):
    from rlhf_jax import losses
    from rlhf_jax.trainers import common, preference
    cfg = model.ModelConfig(**{**TINY, "vocab_size": tb.tokenizer.vocab_size, "max_len": 72})
    graphdef, params = model.create(cfg, seed=0)
    ref = jax.tree.map(lambda x: x * 1.01, params)
    plain, packed = _batches(tb, "pairs", tb.preference_pairs(8, seed=1))

    def dpo(params, batch):        # the preference trainer's inputs, as it builds them
        c, r, nll, lc, lr = preference.pair_logps(graphdef, params, batch)
        rc, rr = preference.reference_logps(graphdef, ref, batch)
        loss, _ = losses.dpo(policy_chosen_logps=c, policy_rejected_logps=r,
                             ref_chosen_logps=rc, ref_rejected_logps=rr,
                             weights=batch["valid"], beta=0.1)
        # Lengths and NLLs enter other losses (SimPO, RPO): the same too.
        return loss + 1e-3 * jnp.sum(nll) + 1e-3 * jnp.sum(lc - lr)

    d_loss, d_grad, _ = _grad_gap(dpo, params, plain, packed)
    print(f"dpo packed vs unpacked: |loss diff| {d_loss:.1e}, max |grad diff| {d_grad:.1e}")
    assert d_loss < 1e-5 and d_grad < 1e-6

    rm_graphdef, rm_params = model.create(cfg, seed=0, kind="reward")

    def bradley_terry(params, batch):
        packed_in = common.packed_inputs(batch)
        extra = {} if packed_in is None else dict(read_at=batch["read_at"], **packed_in)
        r = model.apply_reward(rm_graphdef, params, batch["tokens"], mask_bt=batch["mask"],
                               **extra)
        b = batch["valid"].shape[0]
        return losses.bradley_terry(chosen_rewards=r[:b], rejected_rewards=r[b:])[0]

    d_loss, d_grad, _ = _grad_gap(bradley_terry, rm_params, plain, packed)
    print(f"rm packed vs unpacked: |loss diff| {d_loss:.1e}, max |grad diff| {d_grad:.1e}")
    assert d_loss < 1e-5 and d_grad < 1e-6
