"""Config schemas and the command line: every field typed and ranged, one-line errors, --help."""

import importlib
import subprocess
import sys

import pytest

from rlhf_jax import experiment, schema
from rlhf_jax.errors import ConfigError
from rlhf_jax.trainers import preference, reward, rl, sft

EXPERIMENTS = ("sft", "reward", "dpo", "ppo", "grpo", "rsft", "quickstart", "grpo_verifier")
TRAINERS = {"sft": sft, "reward": reward, "dpo": preference, "ppo": rl, "grpo": rl, "rsft": rl}


def _module(name):
    return importlib.import_module(f"experiments.{name}")


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("size", ["default", "smoke"])
def test_every_experiment_config_is_fully_described_and_valid(name, size):
    module = _module(name)
    config = module.get_config(size)
    schema.check(config, module.SCHEMA)   # a field without a schema entry raises KeyError
    if name in TRAINERS:
        TRAINERS[name].validate(config)
    rows = schema.describe(config, module.SCHEMA)
    assert rows and all(isinstance(field, schema.Field) for _, _, field, _ in rows)


def test_a_field_without_schema_entry_is_a_bug_not_a_user_error():
    config = sft.default_config()
    with config.unlocked():
        config.new_field = 1
    with pytest.raises(KeyError, match="new_field"):
        schema.check(config, sft.SCHEMA)


# (experiment, override, what the one-line error says). Each was accepted, ran wrongly or
# crashed with a traceback before the schema.
BAD = [
    ("sft", "optim.grad_clip=-1.0", "optim.grad_clip=-1.0: must be a number >= 0"),
    ("ppo", "ppo.epochs=0", "ppo.epochs=0: must be an int >= 1"),
    ("ppo", "value.clip_eps=-0.2", "value.clip_eps=-0.2: must be a number > 0 or None"),
    ("ppo", "kl.coef=-1", "kl.coef=-1.0: must be a number >= 0"),
    ("ppo", "kl.controller=adaptive(target=-1.0)", "target=-1.0 must be a number > 0"),
    ("grpo", "advantage=grpo(eps=-1)", "eps=-1 must be a number >= 0"),
    ("ppo", "policy_loss=ppo_clip(clip_eps=0)", "clip_eps=0 must be a number in (0, 1)"),
    ("sft", "model.n_layers=0", "model.n_layers=0: must be an int >= 1"),
    ("sft", "optim.warmup_steps=-5", "optim.warmup_steps=-5: must be an int >= 0"),
    ("sft", "steps=True", "steps=True: must be an int >= 1"),
    ("sft", "optim.lr=nan", "optim.lr=nan: must be a number > 0"),
    ("sft", "foo.bar=1", "unknown config key 'foo.bar'"),
    ("sft", "steps.x=1", "unknown config key 'steps.x'; did you mean 'steps'?"),
    ("ppo", "rollout.temprature=0.5", "did you mean 'rollout.temperature'?"),
    ("ppo", "ppo.minibatches=0", "ppo.minibatches=0: must be an int >= 1"),
    ("ppo", "rollout.prompts_per_step=0", "rollout.prompts_per_step=0: must be an int >= 1"),
    ("ppo", "rollout.samples_per_prompt=0", "rollout.samples_per_prompt=0: must be an int >= 1"),
    ("ppo", "ppo.minibatches=3", "not divisible by ppo.minibatches=3"),
    ("rsft", "advantage=best_of_n(top=4)", "keeps top=4 of rollout.samples_per_prompt=4"),
    ("sft", "model.d_model=0", "model.d_model=0: must be an int >= 1"),
    ("sft", "model.d_ff=-1", "model.d_ff=-1: must be an int >= 1"),
    ("sft", "model.n_heads=3", "d_model=32 must be divisible by n_heads=3"),
    ("sft", "data.buckets=()", "data.buckets=(): must be a tuple of int >= 2"),
    ("sft", "data.buckets=(36.5,)", "item 0 (36.5) must be an int >= 2"),
    ("sft", "data.n_train=0", "data.n_train=0: must be an int >= 1"),
    ("sft", "data.n_test=0", "data.n_test=0: must be an int >= 1"),
    ("sft", "eval_batches=-1", "eval_batches=-1: must be an int >= 0"),
    ("sft", "mesh.shape=(0,1,1)", "mesh.shape=(0, 1, 1): has a 0"),
    ("sft", "mesh.shape=(-1,-1,1)", "has more than one -1"),
    ("sft", "data.source=hf", "unknown data_source 'hf'; registered: arithmetic, synthetic, tfds"),
    ("sft", "size=big", "size='big'; choose 'default' or 'smoke'"),
    ("dpo", "pref_loss=ipo(beta=0.1)", "'ipo' has no argument 'beta'"),
    ("reward", "norm.n_samples=1", "norm.n_samples=1: must be an int >= 2"),
    ("quickstart", "dpo.optim.lr=0", "dpo.optim.lr=0.0: must be a number > 0"),
    ("quickstart", "eval.best_of_n=()", "eval.best_of_n=(): must be a tuple"),
]


@pytest.mark.parametrize("name,override,message", BAD, ids=[b[1] for b in BAD])
def test_a_bad_config_is_one_line_and_exit_2(name, override, message, capsys, tmp_path):
    module = _module(name)
    trainer = TRAINERS.get(name)

    def main(config, workdir):   # what every stage does first; nothing may train here
        if trainer is None:
            module._stage_configs(config, workdir)
            return
        trainer.validate(config)
        raise AssertionError(f"--config.{override} was accepted")

    with pytest.raises(SystemExit) as e:
        experiment.run(module.get_config, main, ["--workdir", str(tmp_path),
                                                 "--config.size=smoke", f"--config.{override}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err


def test_accepted_values_that_the_default_type_alone_would_refuse():
    config = experiment.load_config(_module("ppo").get_config, {
        "mesh.distributed": "auto", "value.clip_eps": "None", "data.buckets": "12"})
    assert config.mesh.distributed == "auto" and config.value.clip_eps is None
    assert config.data.buckets == (12,)


@pytest.mark.parametrize("argv,message", [
    (["--config.steps=1"], "error: --workdir DIR is required"),
    (["--workdir"], "error: --workdir needs a value"),
    (["--workdir", "w", "--steps=3"], "error: unknown flag --steps"),
    (["runs/x"], "error: unexpected argument 'runs/x'"),
])
def test_a_bad_command_line_is_one_line(argv, message, capsys):
    module = _module("sft")
    with pytest.raises(SystemExit) as e:
        experiment.run(module.get_config, module.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_help_prints_the_docstring_and_every_key(capsys):
    module = _module("grpo")
    experiment.run(module.get_config, module.main, ["--help"])
    out = capsys.readouterr().out
    assert module.__doc__.strip().splitlines()[0] in out
    for key, *_ in schema.describe(module.get_config(), module.SCHEMA):
        assert f"\n  {key} " in out, key
    assert "rollout.temperature" in out and "a number > 0" in out
    assert "ppo_clip(clip_eps: a number in (0, 1)" in out


def test_the_command_line_exits_2_without_traceback():
    # The real process, as a user runs it: one line on stderr, exit status 2.
    proc = subprocess.run([sys.executable, "-m", "experiments.ppo", "--workdir", "unused",
                           "--config.kl.coef=-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: kl.coef=-1.0: must be a number >= 0 (KL penalty coefficient (the controller's "
        "start))"], proc.stderr


@pytest.mark.parametrize("field,good,bad", [
    (schema.Int(ge=1), [1, 10**9], [0, -1, 1.0, True, "1", None, float("inf")]),
    (schema.Float(gt=0, lt=1), [0.5, 1e-9], [0, 1, 1.0, True, float("nan"), "0.5"]),
    (schema.Float(ge=0, optional=True), [None, 0, 0.0, 3], [-1e-9, float("inf")]),
    (schema.Bool(), [True, False], [1, 0, "true", None]),
    (schema.Choice(False, True, "auto"), [False, True, "auto"], [0, 1, "Auto", None]),
    (schema.Str(nonempty=True), ["x"], ["", None, 1]),
    (schema.Tuple(schema.Int(ge=2), min_len=1), [(2,), [2, 3]], [(), (1,), (2.0,), 2]),
    (schema.Spec("advantage"), ["gae", "gae(lam=0.9)"], ["gea", "gae(lam=2)", 1]),
])
def test_field_checks(field, good, bad):
    for value in good:
        assert field.problem(value) is None, value
    for value in bad:
        assert field.problem(value), value


def test_library_logs_go_to_the_workdir_log_not_the_terminal(tmp_path, capsys):
    import logging
    import warnings

    def main(config, workdir):
        logging.getLogger("absl").warning("Using custom data configuration x")
        # What warnings.warn ends in (pytest records warn() itself, so call it directly).
        warnings.showwarning("a library warning", UserWarning, "lib.py", 1)

        class Abandoned:   # as Orbax's reads of a damaged checkpoint, collected later
            def __del__(self):
                raise RuntimeError("Event loop is closed")

        Abandoned()
        print("result line")

    experiment.run(_module("sft").get_config, main, ["--workdir", str(tmp_path)])
    out = capsys.readouterr()
    assert out.out == "result line\n" and "custom data" not in out.err
    log = (tmp_path / experiment.LOG_FILE).read_text()
    assert "Using custom data configuration x" in log and "a library warning" in log
    assert "RuntimeError: Event loop is closed" in log


def test_a_mapping_field_takes_a_dict_or_one_entry():
    get_config = _module("ppo").get_config
    config = experiment.load_config(get_config, {"mesh.rules": "{'embed': 'fsdp'}"})
    assert config.mesh.rules.to_dict() == {"embed": "fsdp"}
    config = experiment.load_config(get_config, {"mesh.rules.embed": "fsdp",
                                                 "mesh.rules.mlp": "('fsdp', 'tensor')"})
    assert config.mesh.rules.to_dict() == {"embed": "fsdp", "mlp": ("fsdp", "tensor")}
    for text in ("x", "[1]", "{'embed'"):
        with pytest.raises(ConfigError, match="mesh.rules=.*must be a mapping"):
            experiment.load_config(get_config, {"mesh.rules": text})
