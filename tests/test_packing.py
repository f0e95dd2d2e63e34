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
    run = jax.jit(lambda tokens, seg: model.apply(graphdef, params, tokens, segment_ids_bt=seg))
    row = np.concatenate(seqs)[None]
    seg = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(seqs)])[None]
    t = row.shape[1] + 3                     # and a padded tail, segment 0
    tokens = np.pad(row, ((0, 0), (0, t - row.shape[1])))
    seg = np.pad(seg, ((0, 0), (0, t - seg.shape[1])))
    packed = run(jnp.asarray(tokens), jnp.asarray(seg))[0][0]
    alone = [run(jnp.asarray(s)[None], None)[0][0] for s in seqs]
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


def test_row_counts_are_what_the_rows_need_in_multiples_of_the_shards():
    assert batching.packed_row_count(3, 64) == 3
    assert batching.packed_row_count(17, 64, 8) == 24
    assert batching.packed_row_count(0, 16, 8) == 8     # all rows skipped: one multiple
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


def test_dpo_and_reward_model_losses_and_gradients_are_the_same_packed(tb):
    from rlhf_jax import losses
    from rlhf_jax.trainers import common, preference
    cfg = model.ModelConfig(**{**TINY, "vocab_size": tb.tokenizer.vocab_size, "max_len": 72,
                               "n_layers": 1})
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


# ---------------------------------------------------------------------------------------------
# The stages: a packed SFT run, the printed padding shares, and the refusals
# ---------------------------------------------------------------------------------------------

def test_packed_sft_and_dpo_runs_print_the_padding_they_save_and_sft_ends_where_plain_does(
        tmp_path, capsys):
    from experiments import dpo as dpo_exp
    from experiments import sft as sft_exp
    from rlhf_jax import experiment
    from rlhf_jax.metrics import read_metrics
    from rlhf_jax.trainers import common, preference, sft

    data = {"data.data_dir": str(tmp_path / "data"), "data.buckets": "(36, 72)",
            "steps": "3", "log_every": "3", "save_every": "3", "eval_batches": "0"}

    def run(packing, micro_batches=1):
        config = experiment.load_config(sft_exp.get_config, {
            "size": "smoke", **data, "model.max_len": "72", "data.packing": str(packing),
            "micro_batches": str(micro_batches)})
        return sft.train(config, tmp_path / f"packing_{packing}_{micro_batches}")

    plain, packed, micro = run(False), run(True), run(True, 2)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("sft: packing: padding")]
    assert len(lines) == 4 and lines[0].endswith("(1 batch)"), out    # start-up and the end
    row = read_metrics(packed)[-1]
    assert row["data/padding_packed"] < row["data/padding_unpacked"]
    assert f"{100 * row['data/padding_unpacked']:.1f}% of tokens unpacked" in lines[1]
    assert "data/padding_packed" not in read_metrics(plain)[-1]
    a, b, c = (jax.device_get(common.load_stage(s)[1]) for s in (plain, packed, micro))
    for other, what in ((b, "packed"), (c, "packed, micro_batches=2")):
        gap = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(other)))
        with capsys.disabled():
            print(f"sft, 3 steps {what} vs unpacked: max |param difference| {gap:.1e}")
        assert gap < 1e-5
    with capsys.disabled():
        print(lines[1])

    # DPO from the packed SFT stage, packed: the trainer's wiring, its line and its metrics.
    config = experiment.load_config(dpo_exp.get_config, {
        "size": "smoke", **data, "data.packing": "True", "gen.n_prompts": "0",
        "init_from": str(packed)})
    stage = preference.train(config, tmp_path)
    row = read_metrics(stage)[-1]
    assert np.isfinite(row["pref/loss"]) and np.isfinite(row["pref/grad_norm"])
    assert row["data/padding_packed"] < row["data/padding_unpacked"]
    assert "dpo: packing: padding" in capsys.readouterr().out


@pytest.mark.parametrize("module,overrides,why", [
    ("ppo", [], "by the RL trainer: its rows are prompts that generation extends in place"),
    ("dpo", ["pref_loss=kto", "data.split_pairs=True"],
     "with pref_loss='kto': its unpaired rows come with mismatched KL rows"),
    ("dpo", ["micro_batches=2"], "with micro_batches=2: a packed batch holds pairs across rows"),
    ("reward", ["loss=plackett_luce"], "with loss='plackett_luce': its ranked lists are "
                                       "batched K rows per prompt"),
    ("reward", ["micro_batches=2"], "with micro_batches=2: a packed batch holds pairs"),
])
def test_a_stage_that_cannot_pack_refuses_in_one_line(module, overrides, why, capsys, tmp_path):
    import importlib

    from rlhf_jax import experiment
    exp = importlib.import_module(f"experiments.{module}")
    trainer = {"ppo": "rl", "dpo": "preference", "reward": "reward"}[module]
    validate = importlib.import_module(f"rlhf_jax.trainers.{trainer}").validate

    def main(config, workdir):    # what the stage does first; nothing may train here
        validate(config)
        raise AssertionError(f"{overrides} was accepted")

    with pytest.raises(SystemExit) as e:
        experiment.run(exp.get_config, main, ["--workdir", str(tmp_path), "--config.size=smoke",
                                              "--config.data.packing=true",
                                              *[f"--config.{o}" for o in overrides]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert f"data.packing=true is not supported {why}" in err and "set data.packing=false" in err


def test_packing_is_refused_for_rows_the_packer_does_not_lay_out(tb):
    from rlhf_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="packing is for kinds .* not 'prompts'; set packing"):
        batching.make_iterator(tb.sft_examples(4, seed=0), kind="prompts",
                               tokenizer=tb.tokenizer,
                               config=batching.BatchConfig(batch_size=2, packing=True))
    with pytest.raises(ConfigError, match="pack_rows_multiple=3 is invalid; use a divisor"):
        batching.BatchConfig(batch_size=4, packing=True, pack_rows_multiple=3)
