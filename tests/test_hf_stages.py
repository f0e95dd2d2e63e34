"""Every stage starts from a tiny Hugging Face checkpoint (`init_from=hf:DIR`) and hands back
what transformers loads: SFT, a reward model (a fresh head on a causal LM), DPO and GRPO with
a `*ForSequenceClassification` reward model (`reward_from=hf:DIR`), then `tools.export_hf`.

The checkpoint is a Qwen2-style model with a byte-level BPE tokenizer trained here on the
testbed's text, a ChatML template and <|im_end|> as its end-of-turn; the testbed serves as a
text data source (its gold reward reads its own token ids, so the stages leave it out).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from experiments import dpo as dpo_exp, grpo as grpo_exp  # noqa: E402
from experiments import reward as reward_exp, sft as sft_exp  # noqa: E402
from rlhf_jax import checkpoint, hf, model as M  # noqa: E402
from rlhf_jax.errors import ConfigError  # noqa: E402
from rlhf_jax.trainers import common  # noqa: E402
from rlhf_jax.trainers import preference, reward, rl, sft  # noqa: E402
from tools import export_hf  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _tokenizer(directory):
    """A byte-level BPE over the testbed's text, saved as transformers saves one."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    bed = common.testbed()
    texts = [ex["prompt"] + " " + ex["completion"] for ex in bed.sft_examples(300, seed=0)]
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML)
    fast.save_pretrained(str(directory))
    return fast


def _qwen(directory, tok, *, classifier=False, seed=0):
    cfg = transformers.Qwen2Config(
        vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        num_labels=1)
    torch.manual_seed(seed)
    cls = (transformers.Qwen2ForSequenceClassification if classifier
           else transformers.Qwen2ForCausalLM)
    m = cls(cfg)
    m.save_pretrained(str(directory))
    return m


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(policy dir, reward-model dir): a causal LM and a one-label classifier, one tokenizer."""
    root = tmp_path_factory.mktemp("hf_stages")
    tok = _tokenizer(root / "policy")
    _qwen(root / "policy", tok)
    _tokenizer(root / "rm")
    _qwen(root / "rm", tok, classifier=True, seed=1)
    return root / "policy", root / "rm"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_runs")


def _finite(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows
    for row in rows:
        assert all(np.isfinite(v) for v in row.values() if isinstance(v, float)), row
    return rows


def test_sft_from_a_hf_checkpoint(checkpoints, workdir):
    policy, _ = checkpoints
    config = sft_exp.get_config("smoke")
    config.init_from = f"hf:{policy}"
    config.data.format = "chat"        # prompts as user turns in the checkpoint's ChatML
    config.steps, config.save_every = 4, 4
    stage = sft.train(config, workdir)
    rows = _finite(stage / "metrics.jsonl")
    assert "sft/loss" in rows[0]
    graphdef, params, cfg, tok, meta = common.load_stage(stage)
    assert cfg.family == "qwen2" and tok.backend == "hf"
    assert meta["sources"]["init_from"]["params"].startswith("hf:")
    assert tok.stop_ids[0] == tok.piece_to_id("<|im_end|>")


def test_sft_from_scratch_with_a_hf_tokenizer_directory(checkpoints, workdir):
    policy, _ = checkpoints
    config = sft_exp.get_config("smoke")
    config.data.tokenizer = str(policy)          # tokenizer.json and its config files
    config.model.vocab_size = 0                  # follow the tokenizer
    config.steps, config.save_every = 2, 2
    stage = sft.train(config, workdir / "scratch")
    _, _, cfg, tok, _ = common.load_stage(stage)
    assert tok.backend == "hf" and cfg.vocab_size == tok.vocab_size == 600


def test_reward_model_from_a_causal_lm_gets_a_fresh_head(checkpoints, workdir):
    policy, _ = checkpoints
    config = reward_exp.get_config("smoke")
    config.init_from = f"hf:{policy}"
    config.data.update(n_train=64, n_test=32, batch_size=16)
    config.norm.update(n_samples=16, batch_size=16, prompts_n_train=32, prompts_n_test=16)
    config.log_every, config.save_every = 2, 2
    stage = reward.train(config, workdir)
    rows = _finite(stage / "metrics.jsonl")
    assert any("rm/eval_accuracy" in r for r in rows)


def test_reward_model_from_a_classifier_keeps_its_score_head(checkpoints, workdir):
    """A *ForSequenceClassification checkpoint (how public reward models ship) fine-tunes with
    its own head; the normalisation samples from the policy named by norm.policy_from."""
    policy, rm = checkpoints
    config = reward_exp.get_config("smoke")
    config.init_from, config.norm.policy_from = f"hf:{rm}", f"hf:{policy}"
    config.data.update(n_train=32, n_test=16, batch_size=16)
    config.norm.update(n_samples=16, batch_size=16, prompts_n_train=32, prompts_n_test=16)
    config.steps, config.log_every, config.save_every = 2, 1, 2
    stage = reward.train(config, workdir / "from_classifier")
    _finite(stage / "metrics.jsonl")
    _, params, _, _, meta = common.load_stage(stage, kind="reward")
    start = hf.load(rm, kind="reward", tokenizer=False)[1]
    # The head kept the checkpoint's direction (a fresh head would be uncorrelated with it).
    a = np.asarray(start["head"]["kernel"][...])
    b = np.asarray(params["head"]["kernel"][...])
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.9
    assert meta["sources"]["init_from"]["params"] == hf.source_record(rm)["params"]


def test_dpo_from_a_hf_checkpoint_exports_to_transformers(checkpoints, workdir, tmp_path):
    policy, _ = checkpoints
    config = dpo_exp.get_config("smoke")
    config.init_from = f"hf:{policy}"
    config.steps, config.save_every = 2, 2
    stage = preference.train(config, workdir)
    rows = _finite(stage / "metrics.jsonl")
    assert rows[0]["pref/loss"] == pytest.approx(np.log(2), abs=1e-4)   # policy == reference

    assert export_hf.main(["--stage", str(stage), "--out", str(tmp_path / "out")]) == 0
    graphdef, params, cfg, tok, _ = common.load_stage(stage)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    auto_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = common.testbed().sft_examples(1, seed=5)[0]["prompt"]
    ids = auto_tok(text)["input_ids"]
    assert ids == tok.encode(text)
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(M.apply(graphdef, params, jnp.asarray([ids]))[0])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # The stage moved away from the checkpoint it started from.
    start = hf.load(policy, tokenizer=False)[1]
    assert not np.array_equal(np.asarray(start["layers_0"]["mlp"]["up_proj"]["kernel"][...]),
                              np.asarray(params["layers_0"]["mlp"]["up_proj"]["kernel"][...]))


def test_grpo_with_a_hf_policy_and_a_hf_reward_model(checkpoints, workdir):
    policy, rm = checkpoints
    config = grpo_exp.get_config("smoke")
    config.init_from, config.reward_from = f"hf:{policy}", f"hf:{rm}"
    config.steps, config.save_every, config.eval_every = 2, 2, 0
    config.rollout.max_new_tokens = 8
    stage = rl.train(config, workdir)
    rows = _finite(stage / "metrics.jsonl")
    assert any("objective/kl" in r or "ppo/clipfrac" in r for r in rows)
    meta = checkpoint.Checkpointer(stage).restore_meta()
    assert meta["sources"]["reward_from"]["params"] == hf.source_record(rm)["params"]


def test_gold_reward_with_a_foreign_tokenizer_is_refused(checkpoints, workdir):
    policy, _ = checkpoints
    config = grpo_exp.get_config("smoke")
    config.init_from, config.reward = f"hf:{policy}", "gold"
    with pytest.raises(ConfigError, match="reward='gold' scores the testbed's own token ids"):
        rl.train(config, workdir / "gold")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(checkpoints, tmp_path):
    policy, _ = checkpoints
    import shutil
    shutil.copytree(policy, tmp_path / "p")
    c = json.loads((tmp_path / "p" / "config.json").read_text())
    (tmp_path / "p" / "config.json").write_text(json.dumps({**c, "vocab_size": 100}))
    with pytest.raises(ConfigError, match="the tokenizer has 600 tokens but the model's "
                                          "vocab_size is 100"):
        common.load_stage(f"hf:{tmp_path / 'p'}")


def test_a_testbed_model_trained_here_exports_to_transformers(workdir, tmp_path):
    """A model trained from scratch on the testbed (SentencePiece tokenizer, Llama options)
    exports as a Llama checkpoint: transformers gives the same logits and token ids."""
    config = sft_exp.get_config("smoke")
    config.steps, config.save_every = 2, 2
    stage = sft.train(config, workdir / "testbed")
    assert export_hf.main(["--stage", str(stage), "--out", str(tmp_path / "out")]) == 0
    graphdef, params, cfg, tok, _ = common.load_stage(stage)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(m).__name__ == "LlamaForCausalLM"
    auto_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = common.testbed().sft_examples(1, seed=7)[0]["prompt"]
    ids = tok.prefix_ids + tok.encode(text)
    assert auto_tok(text)["input_ids"] == ids
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(M.apply(graphdef, params, jnp.asarray([ids]))[0])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_checkpoints_written_before_new_config_keys_still_resume(tmp_path):
    """data.format and norm.policy_from came after checkpoints were written: a saved config
    without them was run as their neutral values are, so it resumes."""
    config = reward_exp.get_config("smoke")
    saved = config.to_dict()
    del saved["data"]["format"], saved["norm"]["policy_from"]
    common.check_same_config({"config": saved}, config, tmp_path)
    config.data.format = "chat"
    with pytest.raises(Exception, match="data.format"):
        common.check_same_config({"config": saved}, config, tmp_path)
