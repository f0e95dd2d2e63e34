"""The whole pipeline on the built-in testbed: SFT -> reward model -> PPO and DPO -> evaluation.

    python -m experiments.quickstart --workdir runs/quickstart
    python -m experiments.quickstart --workdir runs/smoke --config.size=smoke   # the tests' size

Writes into WORKDIR:
  data/           the testbed's TFDS datasets (array_record)
  sft/ rm/ ppo/ dpo/   each stage's checkpoints, metrics.jsonl and TensorBoard events
  report.md       SFT, PPO, DPO and best-of-n on held-out prompts: gold reward, reward-model
                  score, sequence KL to the SFT reference; the reward model's accuracies; the
                  acceptance checks
  reward_vs_kl.png  gold reward against KL for every method, PPO along training
  results.json    the numbers of report.md
Re-running resumes every unfinished stage and skips the finished ones. See README.md for the
expected output and time.
"""

import json
import math
import time
from pathlib import Path

import jax
import ml_collections

from experiments import dpo as dpo_exp
from experiments import ppo as ppo_exp
from experiments import reward as reward_exp
from experiments import sft as sft_exp
from rlhf_jax import checkpoint, evaluation, experiment, hf, schema
from rlhf_jax.data import batching
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import read_metrics
from rlhf_jax.trainers import common
from rlhf_jax.trainers import preference as dpo_trainer
from rlhf_jax.trainers import reward as rm_trainer
from rlhf_jax.trainers import rl as rl_trainer
from rlhf_jax.trainers import sft as sft_trainer

# (config key and stage directory, trainer module), in pipeline order.
STAGES = (("sft", sft_trainer), ("rm", rm_trainer), ("ppo", rl_trainer), ("dpo", dpo_trainer))


def get_config(size: str = "default"):
    c = ml_collections.ConfigDict()
    c.size = size
    # The training seed of every stage (initialisation, data order, sampling): a seed study is
    # --config.seed=1, 2, ... The testbed's data (data.seed of each stage) and the evaluation
    # prompts and random numbers (eval.seed) stay fixed, so runs compare on the same task.
    c.seed = 0
    c.sft = sft_exp.get_config(size)
    c.rm = reward_exp.get_config(size)
    c.ppo = ppo_exp.get_config(size)
    c.dpo = dpo_exp.get_config(size)
    # samples: per prompt for SFT, PPO and DPO; best-of-n draws 2 * max(best_of_n) per prompt.
    c.eval = ml_collections.ConfigDict(dict(prompts=256, batch=256, samples=4,
                                            best_of_n=(1, 2, 4, 8, 16), best_of_n_prompts=128,
                                            max_new_tokens=24, seed=1234))
    # The quickstart evaluates DPO with every other method below; skip the stage's own eval.
    c.dpo.gen.n_prompts = 0
    if size == "smoke":
        c.eval.update(prompts=16, batch=16, samples=2, best_of_n=(1, 2, 4), best_of_n_prompts=8,
                      max_new_tokens=16)
    return c


SCHEMA = {
    "size": schema.Str(nonempty=True, doc="'default' or 'smoke' (the tests' size)"),
    "seed": schema.Int(ge=0, doc="the training seed of every stage"),
    "sft": sft_exp.SCHEMA, "rm": reward_exp.SCHEMA, "ppo": ppo_exp.SCHEMA, "dpo": dpo_exp.SCHEMA,
    "eval": {
        "prompts": schema.Int(ge=1, doc="held-out prompts for SFT, PPO and DPO"),
        "batch": schema.Int(ge=1, doc="prompts per sampling batch"),
        "samples": schema.Int(ge=1, doc="samples per prompt for SFT, PPO and DPO"),
        "best_of_n": schema.Tuple(schema.Int(ge=1), min_len=1, doc="the n of best-of-n"),
        "best_of_n_prompts": schema.Int(ge=0, doc="prompts for best-of-n; 0 = eval.prompts"),
        "max_new_tokens": schema.Int(ge=1),
        "seed": schema.Int(ge=0, doc="evaluation prompts and random numbers (kept fixed)"),
    },
}


def _stage_configs(config, workdir: Path):
    data_dir = str(workdir / "data")
    out = {}
    for name, _ in STAGES:
        if config[name].seed not in (0, config.seed):
            raise ConfigError(f"{name}.seed={config[name].seed} but seed={config.seed}: the "
                             "quickstart gives every stage the one seed; set --config.seed")
        stage = ml_collections.ConfigDict(config[name].to_dict())
        stage.seed = config.seed
        stage.data.data_dir = stage.data.data_dir or data_dir
        out[name] = stage
    return out


def check_plan(config, stages) -> None:
    """What only the pipeline as a whole can get wrong, checked before SFT trains: a stage
    pointed at a checkpoint that does not exist, an evaluation longer than the model."""
    for name, stage in stages.items():
        for key in ("init_from", "reward_from"):
            path = stage.get(key, "")
            common.require(not path or checkpoint.stage_has_checkpoint(path)
                           or hf.is_hf_dir(path),
                           f"{name}.{key}={path!r} holds no complete checkpoint; leave it empty "
                           "to use this run's own stage, or point it at a stage directory")
    if not stages["sft"].init_from:
        prompt_len = max(stages["ppo"].data.buckets)
        max_len = stages["sft"].model.max_len
        common.require(prompt_len + config.eval.max_new_tokens <= max_len,
                       f"eval.max_new_tokens={config.eval.max_new_tokens} after prompts of up to "
                       f"{prompt_len} tokens (ppo.data.buckets) exceeds sft.model.max_len="
                       f"{max_len}; lower eval.max_new_tokens or raise sft.model.max_len")


def evaluate(config, workdir: Path) -> dict:
    """Samples every method on the same held-out prompts and scores them."""
    graphdef, sft_params, _, tok, _ = common.load_stage(workdir / "sft")
    reward = common.load_stage(workdir / "rm", kind="reward")
    ppo_cfg = config.ppo
    prompt_it = batching.make_iterator(
        common.data_source(ppo_cfg.data, "prompts", "test", workdir), kind="prompts",
        tokenizer=tok, config=common.batch_config(ppo_cfg.data, batch_size=config.eval.batch,
                                                  seed=0, shuffle=False), name="prompts/test")
    prompts = [next(prompt_it) for _ in range(max(1, config.eval.prompts // config.eval.batch))]
    evaluator = evaluation.Evaluator(
        graphdef=graphdef, ref_params=sft_params, prompts=prompts,
        max_new_tokens=config.eval.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
        reward=reward[:2], gold=common.gold(ppo_cfg.data, tok), tokenizer=tok)
    key = jax.random.key(config.eval.seed)
    n = config.eval.samples
    methods = {"SFT": evaluator.policy_metrics(sft_params, key, n=n)}
    for name in ("ppo", "dpo"):
        params = common.load_stage(workdir / name)[1]
        methods[name.upper()] = evaluator.policy_metrics(params, key, n=n)
    bon = evaluator.best_of_n(sft_params, key, ns=tuple(config.eval.best_of_n),
                              prompts=config.eval.best_of_n_prompts)
    for n, values in bon.items():
        methods[f"best-of-{n}"] = values
    return methods


def acceptance(methods: dict, rm_metrics: dict) -> list[tuple[str, bool, str]]:
    """The pipeline's acceptance checks: (what, passed, the numbers)."""
    sft = methods["SFT"]
    half_std = 0.5 * sft["gold/reward_std"]
    checks = []
    acc, far = rm_metrics.get("rm/eval_gold_accuracy"), rm_metrics.get("rm/eval_gold_accuracy_far")
    if acc is not None:
        checks.append(("reward model accuracy vs gold >= 0.75", acc >= 0.75, f"{acc:.3f}"))
    if far is not None:
        checks.append(("... on pairs > 1 SFT std apart >= 0.9", far >= 0.9, f"{far:.3f}"))
    for name in ("PPO", "DPO"):
        gain, kl = methods[name]["gold/reward"] - sft["gold/reward"], methods[name]["objective/kl"]
        checks.append((f"{name} gold gain >= 0.5 SFT std at KL <= 10",
                       gain >= half_std and kl <= 10,
                       f"gain {gain:+.3f} vs {half_std:.3f}, KL {kl:.2f}"))
    for key, values in methods.items():
        if key.startswith("best-of-") and int(key.split("-")[-1]) > 1:
            est, exact = values["objective/kl_empirical"], values["objective/kl"]
            checks.append((f"{key} KL estimate within 10% of log n - (n-1)/n",
                           abs(est - exact) <= 0.1 * exact, f"{est:.3f} vs {exact:.3f}"))
    return checks


def write_report(config, workdir: Path, methods: dict, rm_metrics: dict, checks,
                 seconds: dict) -> Path:
    lines = ["# Quickstart report", "",
             f"{config.eval.prompts} held-out prompts of the synthetic testbed, "
             f"{config.eval.samples} samples per prompt for SFT, PPO and DPO (the same random "
             "numbers for each); best-of-n: the best of n by reward-model score, averaged over "
             f"every n-subset of {2 * max(config.eval.best_of_n)} samples per prompt of the "
             f"first {config.eval.best_of_n_prompts or config.eval.prompts} prompts. KL is the "
             "sequence-level KL to the SFT policy (sum over tokens of log pi - log pi_ref; for "
             "best-of-n, log n - (n-1)/n, with the empirical-CDF estimate beside it).", "",
             "| method | gold reward | RM score | KL (nats) | KL estimate | length |",
             "|---|---|---|---|---|---|"]
    for name, v in methods.items():
        est = v.get("objective/kl_empirical")
        est = "" if est is None else (f"{est:.3f} ± {v['objective/kl_empirical_se']:.3f}")
        lines.append(f"| {name} | {v['gold/reward']:.3f} | {v['rm/score']:.3f} | "
                     f"{v['objective/kl']:.2f} | {est} | {v['response/length']:.1f} |")
    lines += ["", f"SFT gold-reward std: {methods['SFT']['gold/reward_std']:.3f}", "",
              "Reward model (held-out pairs): " + ", ".join(
                  f"{k} {v:.3f}" for k, v in sorted(rm_metrics.items())
                  if k.startswith("rm/eval")), "", "## Acceptance", "",
              "| check | result | numbers |", "|---|---|---|"]
    lines += [f"| {what} | {'pass' if ok else 'FAIL'} | {nums} |" for what, ok, nums in checks]
    lines += ["", "Wall time of this invocation (s; a stage finished earlier counts ~0): "
              + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
              "", "![gold reward against KL](reward_vs_kl.png)", ""]
    path = workdir / "report.md"
    path.write_text("\n".join(lines))
    return path


def plot(workdir: Path, methods: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ppo_rows = [r for r in read_metrics(workdir / "ppo") if "eval/gold/reward" in r]
    ax.plot([r["eval/objective/kl"] for r in ppo_rows], [r["eval/gold/reward"] for r in ppo_rows],
            "o-", color="tab:blue", label="PPO (along training)", markersize=3)
    bon = [(v["objective/kl"], v["gold/reward"]) for k, v in methods.items()
           if k.startswith("best-of-")]
    ax.plot(*zip(*bon), "s--", color="tab:green", label="best-of-n (n = " + ", ".join(
        k.split("-")[-1] for k in methods if k.startswith("best-of-")) + ")")
    for name, style in (("SFT", "k*"), ("DPO", "r^"), ("PPO", "bo")):
        ax.plot(methods[name]["objective/kl"], methods[name]["gold/reward"], style, markersize=9,
                label=f"{name} (final)" if name != "SFT" else "SFT")
    ax.set_xlabel("KL to the SFT policy (nats)")
    ax.set_ylabel("gold reward r*(x, y)")
    ax.set_title("Gold reward against KL on the testbed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = workdir / "reward_vs_kl.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(config, workdir):
    workdir = Path(workdir)
    stages = _stage_configs(config, workdir)
    # Every stage's config is checked before the first one trains: a typo in a DPO option
    # fails now, not after SFT and the reward model have run.
    for name, trainer in STAGES:
        trainer.validate(stages[name])
    check_plan(config, stages)
    seconds, t0 = {}, time.perf_counter()
    for name, trainer in STAGES:
        t = time.perf_counter()
        stage_dir = trainer.train(stages[name], workdir)
        seconds[name] = time.perf_counter() - t
        # One line a stage: the report below has the numbers (`python -m experiments.<stage>`
        # prints a stage's own summary).
        print(f"{name}: done in {seconds[name]:.0f} s; checkpoints and metrics in {stage_dir}")
    t = time.perf_counter()
    methods = evaluate(config, workdir)
    seconds["evaluation"] = time.perf_counter() - t
    rm_rows = read_metrics(workdir / "rm")
    rm_metrics = {k: v for r in rm_rows for k, v in r.items() if k.startswith("rm/eval")}
    checks = acceptance(methods, rm_metrics)
    plot(workdir, methods)
    seconds["total"] = time.perf_counter() - t0
    report = write_report(config, workdir, methods, rm_metrics, checks, seconds)
    (workdir / "results.json").write_text(json.dumps(
        {"methods": methods, "reward_model": rm_metrics, "seconds": seconds,
         "acceptance": [{"check": w, "passed": ok, "numbers": n} for w, ok, n in checks]},
        indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    print(report.read_text())
    print(f"report: {report}\nfigure: {workdir / 'reward_vs_kl.png'}")
    return methods


if __name__ == "__main__":
    experiment.run(get_config, main)
