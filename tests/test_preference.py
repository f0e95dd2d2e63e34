"""Preference (DPO-family) stage: smoke runs from a smoke SFT checkpoint for every registered
loss, the reference pass skipped for reference-free losses, the zero margin at step 0, one
gradient step raising the chosen-minus-rejected margin, exact in-process resume. KTO on
unpaired rows: from the testbed's pairs split into rows and from a prepared TFDS dataset of
unpaired records, its reference point from the mismatched rows against a hand computation,
resume, and the record and config errors.

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
import tensorflow_datasets as tfds

from _pairs import weighted_mean
from _stages import crash_after_the_first_step, tiny_sft_stage
from experiments import dpo as dpo_exp
from experiments import sft as sft_exp
from rlhf_jax import experiment, losses, model, registry
from rlhf_jax.checkpoint import complete_steps
from rlhf_jax.data import batching
from rlhf_jax.data.records import DataError
from rlhf_jax.errors import CheckpointError
from rlhf_jax.metrics import read_metrics
from rlhf_jax.trainers import common, preference, sft


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir holding a tiny SFT stage (the DPO stages' init_from) and the shared data."""
    return tiny_sft_stage(tmp_path_factory.mktemp("pref"))


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


def _same_params(stage_a, stage_b):
    """Both stages ended at the same step and data position with bitwise equal parameters."""
    _, a, _, _, meta_a = common.load_stage(stage_a)
    _, b, _, _, meta_b = common.load_stage(stage_b)
    assert meta_a["step"] == meta_b["step"]
    assert meta_a["data_state"] == meta_b["data_state"]
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)  # bitwise on CPU


def test_interrupted_run_resumes_to_the_same_params_and_one_step_raises_the_margin(
        workdir, straight, monkeypatch):
    config, stage = straight
    changes = dict(stage="dpo_resumed", save_every=1, eval_batches=0, **{"gen.n_prompts": 0})

    crash_after_the_first_step(preference.train, _config(workdir, **changes), workdir,
                               monkeypatch)
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
    assert common.load_stage(resumed)[4]["step"] == config.steps
    _same_params(stage, resumed)


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


# ---------------------------------------------------------------------------------------------
# KTO: unpaired rows
# ---------------------------------------------------------------------------------------------

KTO = {"pref_loss": "kto(beta=0.1)", "data.split_pairs": True}


@pytest.fixture(scope="module")
def kto_run(workdir):
    """KTO on the testbed's pairs split into rows, uninterrupted, with both evals."""
    config = _config(workdir, stage="kto", **KTO)
    return config, preference.train(config, workdir)


def _unpaired_batch(config, tok, source, *, split_pairs, **batch):
    """The first batch of unpaired rows a run with `config` would read from `source`."""
    it = batching.make_iterator(
        source, kind="unpaired", split_pairs=split_pairs, tokenizer=tok,
        config=common.batch_config(config.data, batch_size=config.data.batch_size,
                                   seed=config.seed, **batch))
    return {k: jnp.asarray(v) for k, v in next(it).items()}


def _kto_eval_terms(config, graphdef):
    """The run's compiled (batch-level) eval of the loss: the same cache entry as the run."""
    loss_kind, loss_fn = preference.resolve_loss(config.pref_loss)
    optimizer = preference._optimizer(tuple(sorted(config.optim.items())), config.steps)
    return preference._compiled(graphdef, loss_fn, optimizer, True, loss_kind)[1]


def test_kto_on_split_pairs_trains_logs_and_evaluates(workdir, kto_run):
    config, stage = kto_run
    rows = read_metrics(stage)
    assert complete_steps(stage)[-1] == config.steps and all(_finite(r) for r in rows)
    first, last = rows[0], rows[-1]
    # Step 0: the policy is the reference, so every log-ratio and z0 are 0 and each row's loss
    # is lambda * sigmoid(0) = 0.5.
    assert first["kto/loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["kto/reference_point"] == 0.0 and first["pref/desirable_logratio"] == 0.0
    for key in ("kto/accuracy", "kto/margin", "kto/reward", "pref/grad_norm",
                "pref/undesirable_logratio", "eval/pref_accuracy", "eval/pref_margin",
                "eval/kto/reference_point", "gold/reward", "gold/gain", "objective/kl"):
        assert key in last, key
    assert "eval/gold_agreement" not in last    # unpaired rows have no gold order
    assert 0.0 <= last["eval/pref_accuracy"] <= 1.0
    # On the first batch, stepped on at step 1: desirable rows' log-ratios went up and
    # undesirable ones' down, and the loss (z0 from its mismatched rows) fell below 0.5.
    graphdef, sft_params, _, tok, meta = common.load_stage(workdir / "sft")
    _, kto_params, _, _, kto_meta = common.load_stage(stage)
    assert kto_meta["config"]["pref_loss"] == config.pref_loss
    batch = _unpaired_batch(config, tok, common.data_source(config.data, "pairs", "train",
                                                            workdir), split_pairs=True)
    logps = jax.jit(lambda p: preference.row_logps(graphdef, p, batch["tokens"], batch["mask"],
                                                   batch["loss_mask"]))
    ratio = np.asarray(logps(kto_params) - logps(sft_params))
    desirable = np.asarray(batch["desirable"]) > 0
    assert desirable.any() and (~desirable).any()
    assert ratio[desirable].mean() > 0 > ratio[~desirable].mean()
    eval_terms = _kto_eval_terms(config, graphdef)
    assert float(eval_terms(kto_params, sft_params, batch)["kto/loss"]) < 0.5
    assert float(eval_terms(sft_params, sft_params, batch)["kto/loss"]) == pytest.approx(0.5)


def test_kto_reference_point_is_the_mean_log_ratio_of_the_mismatched_rows(workdir, kto_run):
    config, stage = kto_run
    graphdef, sft_params, _, tok, _ = common.load_stage(workdir / "sft")
    _, kto_params, _, _, _ = common.load_stage(stage)
    pairs = common.data_source(config.data, "pairs", "test", workdir)
    records = [dict(prompt=pairs[i]["prompt"], completion=pairs[i][side],
                    desirable=side == "chosen")
               for i, side in enumerate(("chosen", "rejected", "chosen"))]
    # Three real rows and five padding rows (a final partial batch).
    batch = _unpaired_batch(config, tok, records, split_pairs=False, shuffle=False,
                            num_epochs=1, drop_remainder=False)
    np.testing.assert_array_equal(batch["kl_valid"], [1, 1, 1, 0, 0, 0, 0, 0])
    # By hand: row b's mismatched sequence is prompt b with row b - 1's completion (row 0
    # takes row 2's), scored with an independent log-softmax over the model's logits.
    enc = batching.TextEncoder(tok)
    text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    seqs = [(enc.prompt(text(r["prompt"])), enc.response(text(records[b - 1]["completion"])))
            for b, r in enumerate(records)]
    length = batch["kl_tokens"].shape[1]
    tokens = np.full((3, length), tok.pad_id, np.int32)
    mask = np.zeros((3, length), np.int32)
    target = np.zeros((3, length - 1), np.float32)
    for b, (p, c) in enumerate(seqs):
        np.testing.assert_array_equal(batch["kl_tokens"][b, :len(p) + len(c)], p + c)
        assert int(batch["kl_mask"][b].sum()) == len(p) + len(c)
        tokens[b, :len(p) + len(c)] = p + c
        mask[b, :len(p) + len(c)] = 1
        target[b, len(p) - 1:len(p) + len(c) - 1] = 1.0   # logits at t predict token t + 1

    @jax.jit
    def summed(params):
        logits, _ = model.apply(graphdef, params, jnp.asarray(tokens), mask_bt=jnp.asarray(mask))
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        picked = jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(picked * target, axis=-1)

    ratio = np.asarray(summed(kto_params) - summed(sft_params))
    eval_terms = _kto_eval_terms(config, graphdef)
    # z0 = max(0, mean of the mismatched log-ratios): swapping the models flips their sign.
    for policy, ref, sign in ((kto_params, sft_params, 1.0), (sft_params, kto_params, -1.0)):
        z0 = float(eval_terms(policy, ref, batch)["kto/reference_point"])
        assert z0 == pytest.approx(max(0.0, sign * float(ratio.mean())), rel=1e-4, abs=1e-6)
    assert abs(float(ratio.mean())) > 1e-3     # one of the two orders tested a positive z0


def test_an_interrupted_kto_run_resumes_to_the_same_params(workdir, kto_run, monkeypatch):
    _, stage = kto_run
    changes = dict(KTO, stage="kto_resumed", save_every=1, eval_batches=0,
                   **{"gen.n_prompts": 0})
    crash_after_the_first_step(preference.train, _config(workdir, **changes), workdir,
                               monkeypatch)
    assert complete_steps(workdir / "kto_resumed") == [1]
    _same_params(stage, preference.train(_config(workdir, **changes), workdir))


class _UnpairedRows(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A prepared TFDS dataset of unpaired rows {prompt, completion, desirable}: testbed pairs
    of which some give both rows, others only their chosen or only their rejected one."""

    name = "kto_rows"
    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(), "completion": tfds.features.Text(),
            "desirable": tfds.features.Scalar(np.bool_)}))

    def _split_generators(self, dl_manager):
        pairs = common.testbed().preference_pairs(36, seed=3)
        return {"train": self._generate_examples(pairs[:28]),
                "test": self._generate_examples(pairs[28:])}

    def _generate_examples(self, pairs):
        for i, pair in enumerate(pairs):
            for side in (("chosen", "rejected"), ("chosen",), ("rejected",))[i % 3]:
                yield f"{i}-{side}", {"prompt": pair["prompt"], "completion": pair[side],
                                      "desirable": side == "chosen"}


def test_kto_trains_on_a_prepared_tfds_dataset_of_unpaired_rows(workdir, tmp_path):
    _UnpairedRows(data_dir=str(tmp_path / "data"), file_format="array_record"
                  ).download_and_prepare()
    config = _config(workdir, pref_loss="kto(beta=0.1)", steps=2, save_every=2, eval_batches=2,
                     init_from=str(workdir / "sft"),
                     **{"data.source": "tfds", "data.name": "kto_rows", "data.kind": "unpaired",
                        "data.data_dir": str(tmp_path / "data")})
    stage = preference.train(config, tmp_path)
    rows = read_metrics(stage)
    assert [r["step"] for r in rows] == [1, 2] and all(_finite(r) for r in rows)
    assert rows[0]["kto/loss"] == pytest.approx(0.5, abs=1e-6)
    assert rows[0]["kto/reference_point"] == 0.0
    assert 0.0 <= rows[-1]["eval/pref_accuracy"] <= 1.0
    assert "gold/reward" not in rows[-1]            # a TFDS dataset has no gold reward
    assert common.load_stage(stage)[4]["data_state"]["fingerprint"]["kind"] == "unpaired"


@pytest.mark.parametrize("record,field,reason", [
    ({"prompt": "a", "completion": "b"}, "desirable", "missing"),
    ({"prompt": "a", "completion": "b", "desirable": None}, "desirable", "missing (null)"),
    ({"prompt": "a", "completion": "b", "desirable": 0.5}, "desirable",
     "expected true/false or 0/1, got 0.5 (float)"),
    ({"prompt": "a", "completion": "b", "desirable": "yes"}, "desirable",
     "expected true/false or 0/1, got 'yes' (str)"),
    ({"prompt": "a", "completion": "b", "desirable": 2}, "desirable",
     "expected true/false or 0/1, got 2 (int)"),
    ({"prompt": "a", "desirable": True}, "completion", "missing"),
])
def test_a_bad_unpaired_record_names_the_record_and_field(record, field, reason):
    tok = common.testbed().tokenizer
    good = [{"prompt": "a", "completion": "b", "desirable": d}
            for d in (True, 0, np.int64(1), np.bool_(False))]
    it = batching.make_iterator(good + [record], kind="unpaired", tokenizer=tok,
                                config=batching.BatchConfig(batch_size=5, buckets=(36,),
                                                            max_prompt_len=12, shuffle=False),
                                name="rows/train")
    with pytest.raises(DataError) as e:
        next(it)
    assert (e.value.file, e.value.index, e.value.field) == ("rows/train", 4, field)
    assert str(e.value).startswith(f"rows/train: record 4: field {field!r}: {reason}")
    assert "\n" not in str(e.value)


def test_split_pairs_are_desirable_chosen_rows_then_undesirable_rejected_rows():
    tok = common.testbed().tokenizer
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    cfg = batching.BatchConfig(batch_size=6, buckets=(36,), max_prompt_len=12, shuffle=False)
    batch = next(batching.make_iterator(pairs, kind="unpaired", split_pairs=True, tokenizer=tok,
                                        config=cfg))
    enc = batching.TextEncoder(tok)
    completions = [f"c{i}" for i in range(3)] + [f"r{i}" for i in range(3)]
    for b, c in enumerate(completions):
        ids = enc.prompt(f"p{b % 3}") + enc.response(c)
        np.testing.assert_array_equal(batch["tokens"][b, :len(ids)], ids)
    np.testing.assert_array_equal(batch["desirable"], [1, 1, 1, 0, 0, 0])
    # The rows and their mismatched completions are those of losses.pairs_to_unpaired, the
    # array-level version (its completions stand for row indices here).
    arrays = losses.pairs_to_unpaired(prompts=jnp.arange(3), chosen=jnp.arange(3),
                                      rejected=jnp.arange(3, 6))
    np.testing.assert_array_equal(arrays["desirable"], batch["desirable"])
    np.testing.assert_array_equal(batching.mismatched_rows(batch["valid"]),
                                  arrays["kl_completions"])
    for b, o in enumerate(arrays["kl_completions"]):
        ids = enc.prompt(f"p{b % 3}") + enc.response(completions[int(o)])
        np.testing.assert_array_equal(batch["kl_tokens"][b, :len(ids)], ids)
    # A bad pair names the pair record and its field.
    bad = pairs[:2] + [{"prompt": "p", "chosen": "c"}]
    with pytest.raises(DataError, match=r"^pairs/train: record 2: field 'rejected': missing"):
        next(batching.make_iterator(bad, kind="unpaired", split_pairs=True, tokenizer=tok,
                                    config=cfg, name="pairs/train"))


@pytest.mark.parametrize("overrides,message", [
    (["pref_loss=kto"], "pref_loss='kto' trains on unpaired rows, but data.kind='pairs' gives "
                        "pairs rows; set data.split_pairs=True"),
    (["data.split_pairs=True"], "pref_loss='dpo(beta=0.2)' trains on pairs rows, but "
                                "data.kind='pairs' with data.split_pairs=True gives unpaired"),
    (["data.source=tfds", "data.name=x", "data.kind=unpaired"],
     "pref_loss='dpo(beta=0.2)' trains on pairs rows, but data.kind='unpaired' gives unpaired"),
    (["pref_loss=kto", "data.kind=unpaired"],
     "data.kind='unpaired': data.source='synthetic' has no unpaired records (it has sft, "
     "prompts, pairs, rankings); read them from a prepared TFDS dataset (data.source='tfds'), "
     "or split its pairs into rows"),
    (["pref_loss=kto", "data.source=tfds", "data.name=x", "data.kind=unpaired",
      "data.split_pairs=True"], "data.split_pairs=True splits pair records, but "
                                "data.kind='unpaired' records are unpaired rows already"),
    (["pref_loss=ktoo"], "unknown preference loss 'ktoo'; registered: "),
    (["pref_loss=kto(beta=0)"], "unpaired_loss kto: beta=0 must be a number > 0"),
    (["pref_loss=kto(tau=1.0)"], "unpaired_loss 'kto' has no argument 'tau'"),
    (["data.kind=triples"], "data.kind=triples: must be one of 'pairs', 'unpaired'"),
])
def test_a_bad_kto_config_is_one_line(overrides, message, capsys, tmp_path):
    def main(config, workdir):    # what the stage does first; nothing may train here
        preference.validate(config)
        raise AssertionError(f"{overrides} was accepted")

    with pytest.raises(SystemExit) as e:
        experiment.run(dpo_exp.get_config, main, ["--workdir", str(tmp_path),
                                                   "--config.size=smoke",
                                                   *[f"--config.{o}" for o in overrides]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    if "unknown" in message:   # the list names the losses of both kinds, with their rows
        assert "dpo" in err and "kto (unpaired)" in err and "kto_pair" in err
