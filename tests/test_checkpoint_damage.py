"""Damaged checkpoints and changed sources: found, named, and never trained on.

Each kind of damage (a missing item, a truncated array file, an emptied step directory, bad or
edited meta JSON, flipped bytes in an array file) makes `restore` name the step and its path;
a resumption falls back to the newest step that restores, or fails with one message when none
does; the hand-off (`load_stage`) fails without falling back. Fingerprints do not depend on the
layout of the arrays. A stage refuses to resume from another source checkpoint than the one its
run started from, and accepts the same checkpoint at a moved path.
"""

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sft as sft_exp
from rlhf_jax import checkpoint
from rlhf_jax.checkpoint import (CHECKPOINTS, Checkpointer, DamagedCheckpointError, abstract,
                                 complete_steps, fingerprint, tree_equal)
from rlhf_jax.errors import CheckpointError
from rlhf_jax.trainers import common, sft

ROOT = Path(__file__).resolve().parents[1]

# A read that fails partway leaves Orbax's other pending reads to be collected later, which
# pytest reports as "Exception ignored in: <coroutine ...>"; that is the damage under test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
    """Collects them here rather than in whichever test runs next."""
    yield
    gc.collect()


def _state(seed):
    k = jax.random.key(seed)
    # 64 x 64 random floats do not compress: the middle of the array file is raw array bytes.
    params = {"w": jax.random.normal(k, (64, 64)), "b": jnp.arange(3.0) + seed}
    train = {"mu": jnp.full((4,), float(seed), jnp.bfloat16), "rng": jax.random.fold_in(k, 1)}
    return params, train


def _largest_file(item_dir: Path) -> Path:
    return max((f for f in item_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def _missing_item(step_dir):
    shutil.rmtree(step_dir / "train")


def _truncated(step_dir):
    f = _largest_file(step_dir / "params")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _emptied(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def _bad_json(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"data": {"index": 2}, "st')


def _edited_json(step_dir):
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["data"]["index"] += 1     # still valid JSON, but not what was saved
    path.write_text(json.dumps(meta))


def _flipped(step_dir):
    f = _largest_file(step_dir / "params")
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {
    "missing_item": (_missing_item, r"train: KeyError: Item \"train\" was not found"),
    "truncated_file": (_truncated, r"params: Exception: .*reading array"),
    "empty_step_dir": (_emptied, r"meta: KeyError: Item \"meta\" was not found"),
    "bad_json": (_bad_json, r"meta: JSONDecodeError"),
    "edited_json": (_edited_json, r"meta: its JSON does not match the digest"),
    "flipped_bytes": (_flipped, r"params: its arrays read back with fingerprint [0-9a-f]{16}, "
                                r"saved with [0-9a-f]{16}"),
}


def _save_steps(directory, steps=(1, 2)):
    with Checkpointer(directory) as ckpt:
        for step in steps:
            params, train = _state(step)
            assert ckpt.save(step, params=params, train=train, meta={"data": {"index": step}})
    return directory / CHECKPOINTS


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_step_is_named_and_resume_falls_back_to_the_previous(tmp_path, capsys,
                                                                            kind):
    damage, reason = DAMAGE[kind]
    ckpt_dir = _save_steps(tmp_path)
    params, train = _state(2)
    if kind == "flipped_bytes":
        # Orbax alone reads these bytes back without complaint, as other numbers: only the
        # checksum written at save time tells.
        with Checkpointer(tmp_path) as ckpt:
            damage(ckpt_dir / "2")
            raw = ckpt._manager.restore(2, args=checkpoint.ocp.args.Composite(
                params=checkpoint.ocp.args.StandardRestore(abstract(params))))["params"]
        assert not tree_equal(raw, params)
    else:
        damage(ckpt_dir / "2")
    target = dict(params=abstract(params), train=abstract(train))

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        with pytest.raises(DamagedCheckpointError,
                           match=rf"step 2 at {ckpt_dir / '2'} is damaged \({reason}"):
            ckpt.restore(**target)
        got_p, got_t, meta = ckpt.restore_newest(**target)
        assert meta["step"] == 1 and meta["data"] == {"index": 1}
        assert tree_equal(got_p, _state(1)[0]) and tree_equal(got_t, _state(1)[1])
        # The damaged step is moved aside, so the resumed run writes it afresh.
        assert ckpt.all_steps() == [1] and complete_steps(tmp_path) == [1]
        assert (ckpt_dir / "2.damaged").is_dir()
        assert ckpt.save(2, params=params, train=train, meta={"data": {"index": 2}})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: checkpoint step 2 at "), err
    assert f"{ckpt_dir / '2'} is damaged (" in err[0]
    assert err[0].endswith("moved it to 2.damaged and resuming from step 1")
    with Checkpointer(tmp_path) as ckpt:
        got_p, got_t, _ = ckpt.restore(**target)
    assert tree_equal(got_p, params) and tree_equal(got_t, train)


def test_when_no_step_restores_resume_fails_once_and_moves_nothing(tmp_path):
    ckpt_dir = _save_steps(tmp_path)
    _flipped(ckpt_dir / "2")
    _bad_json(ckpt_dir / "1")
    params, train = _state(2)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore_newest(params=abstract(params), train=abstract(train))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"no checkpoint in {ckpt_dir} restores: step 2 at ")
    assert "(params: its arrays read back" in message and "step 1 at " in message
    assert "(meta: JSONDecodeError" in message and "move that directory away" in message
    assert complete_steps(tmp_path) == [1, 2] and not list(ckpt_dir.glob("*.damaged"))


def test_a_config_mismatch_is_not_mistaken_for_damage(tmp_path):
    """`check` runs on each step's meta before any array is read; its errors propagate."""
    ckpt_dir = _save_steps(tmp_path)

    def refuse(meta):
        raise CheckpointError(f"another run (step {meta['step']})")

    params, train = _state(2)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"^another run \(step 2\)$"):
            ckpt.restore_newest(params=abstract(params), train=abstract(train), check=refuse)
    assert complete_steps(tmp_path) == [1, 2] and not list(ckpt_dir.glob("*.damaged"))


def test_part_sums_add_up_over_any_blocks_and_fingerprints_see_every_change():
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    whole = checkpoint._part_sum(x, (0, 0), x.shape)
    blocks = [((0, 0), x[:2, :3]), ((0, 3), x[:2, 3:]), ((2, 0), x[2:, :6]), ((2, 6), x[2:, 6:])]
    assert sum(checkpoint._part_sum(b, start, x.shape) for start, b in blocks) % 2**64 == whole

    base = fingerprint({"x": x, "k": jax.random.key(3)})
    assert fingerprint({"x": x.copy(), "k": jax.random.key(3)}) == base
    flipped = x.copy()
    flipped.view(np.uint32)[3, 4] ^= 1 << 7
    swapped = x.copy()
    swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
    for other in ({"x": flipped, "k": jax.random.key(3)},       # one bit
                  {"x": swapped, "k": jax.random.key(3)},       # two values trade places
                  {"x": x.view(np.int32), "k": jax.random.key(3)},   # same bytes, other dtype
                  {"x": x.reshape(7, 5), "k": jax.random.key(3)},    # same bytes, other shape
                  {"x": x, "k": jax.random.key(4)}):               # another key
        assert fingerprint(other) != base


_LAYOUT_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, sys
from jax.sharding import NamedSharding, PartitionSpec as P
from rlhf_jax.checkpoint import Checkpointer, abstract, fingerprint, tree_equal
mesh = jax.make_mesh((2, 2), ("a", "b"))
host = {"w": np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 7, "s": np.float32(3)}
def put(spec):
    return {"w": jax.device_put(host["w"], NamedSharding(mesh, spec)), "s": jnp.float32(3)}
on_a, on_ab, replicated = put(P("a", None)), put(P("b", "a")), put(P())
assert len({fingerprint(t) for t in (host, on_a, on_ab, replicated)}) == 1
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(1, params=on_a, train={"n": jnp.int32(0)}, meta={})
    got, _, _ = ckpt.restore(params=abstract(on_ab))     # verified against the saved checksum
assert tree_equal(got, host) and got["w"].sharding.spec == P("b", "a")
print("OK")
"""


def test_fingerprints_do_not_depend_on_the_layout(tmp_path):
    """Saved from one sharding, restored and verified onto another (4 simulated devices)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", _LAYOUT_SCRIPT, str(tmp_path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]


_MULTIPROCESS_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import faulthandler
faulthandler.dump_traceback_later(90, exit=True)   # a hang ends with where each process stood
import jax
port, pid, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import pathlib
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from rlhf_jax.checkpoint import Checkpointer, abstract, fingerprint, tree_equal
mesh = jax.make_mesh((4,), ("a",))           # two devices in each process
host = {"w": np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32),
        "b": np.arange(4, dtype=np.float32)}
def glob(x, spec):
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])
params = {"w": glob(host["w"], P("a")), "b": glob(host["b"], P())}
train = {"m": glob(2 * host["w"], P(None, "a"))}
assert fingerprint(params) == fingerprint(host)   # shards of both processes add up
def flip(step, process, at):   # a byte of the array data that `process` wrote for `step`
    d = pathlib.Path(directory, "checkpoints", str(step), "params", f"ocdbt.process_{process}")
    f = max((f for f in d.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data = bytearray(f.read_bytes())
    data[int(at * len(data))] ^= 0xFF
    f.write_bytes(bytes(data))
with Checkpointer(directory) as ckpt:
    for step in (1, 2, 3):
        ckpt.save(step, params=params, train=train, meta={})
    if pid == 0:
        flip(3, 1, 0.0)   # a frame header: only process 1, which reads that shard, fails
        flip(2, 0, 0.5)   # array bytes: every read succeeds, the fingerprint differs
    multihost_utils.sync_global_devices("flipped")
    got, got_train, meta = ckpt.restore_newest(params=abstract(params), train=abstract(train))
    assert meta["step"] == 1 and ckpt.all_steps() == [1], meta
assert tree_equal(jax.tree.map(np.asarray, got["b"]), host["b"])
print("OK", meta["checksums"]["params"], flush=True)
"""


def test_two_processes_agree_on_fingerprints_and_fall_back_together(tmp_path):
    """A job of two processes (two CPU devices each): each hashes its own shards and the sums
    are gathered; a shard only one process reads fails in that one, yet both skip the step;
    both resume from the same step."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", _MULTIPROCESS_SCRIPT, str(port), str(i),
                               str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(
        f"process {i} (rc {p.returncode}):\n{o[-1000:]}\n{e[-3000:]}"
        for i, (p, (o, e)) in enumerate(zip(procs, outs)))
    oks = [o.strip().splitlines()[-1] for o, _ in outs]
    assert oks[0] == oks[1] and oks[0].startswith("OK ")
    warnings = [line for _, e in outs for line in e.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings   # printed by process 0 alone
    assert "step 3 at " in warnings[0] and "(params: process 1 could not read it)" in warnings[0]
    assert "step 2 at " in warnings[1] and "(params: its arrays read back" in warnings[1]
    assert complete_steps(tmp_path) == [1]
    assert {p.name for p in (tmp_path / CHECKPOINTS).iterdir()} >= {"2.damaged", "3.damaged"}


def _record(path, step, params):
    return {"path": str(path), "step": step, "params": params}


def test_check_same_sources_compares_fingerprints_not_paths():
    meta = {"sources": {"init_from": _record("/a/sft", 24, "00ff"), "reward_from": None}}
    common.check_same_sources(meta, {"init_from": _record("/moved/sft", 24, "00ff"),
                                     "reward_from": None}, "/w/dpo")
    common.check_same_sources({}, {"init_from": None}, "/w/dpo")   # saved before sources
    with pytest.raises(CheckpointError) as info:
        common.check_same_sources(meta, {"init_from": _record("/b/sft", 24, "11ee"),
                                         "reward_from": None}, "/w/dpo")
    assert str(info.value).startswith(
        "/w/dpo holds a run that started from init_from=/a/sft (step 24, params fingerprint "
        "00ff) but init_from now gives /b/sft (step 24, params fingerprint 11ee)")
    with pytest.raises(CheckpointError, match=r"started from reward_from=none but reward_from "
                                              r"now gives /w/rm \(step 8"):
        common.check_same_sources(meta, {"init_from": _record("/a/sft", 24, "00ff"),
                                         "reward_from": _record("/w/rm", 8, "aa")}, "/w/ppo")


# --- one tiny SFT stage, then an SFT stage started from it ----------------------------------

def _sft_config(root, **changes):
    config = sft_exp.get_config("smoke")
    config.data.data_dir = str(root / "data")
    config.steps, config.save_every, config.keep, config.eval_batches = 2, 1, 2, 0
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished two-step SFT stage with checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("damage")
    stage = sft.train(_sft_config(root), root / "a")
    assert complete_steps(stage) == [1, 2]
    return root, stage


def test_a_damaged_step_is_retrained_and_the_stage_ends_as_if_undamaged(source, tmp_path,
                                                                        capsys):
    root, stage = source
    shutil.copytree(stage, tmp_path / "sft")
    _flipped(tmp_path / "sft" / CHECKPOINTS / "2")
    sft.train(_sft_config(root), tmp_path)
    err = capsys.readouterr().err
    assert f"warning: checkpoint step 2 at {tmp_path / 'sft' / CHECKPOINTS / '2'} is damaged" in err
    assert complete_steps(tmp_path / "sft") == [1, 2]
    _, want, _, _, meta_a = common.load_stage(stage)
    _, got, _, _, meta_b = common.load_stage(tmp_path / "sft")
    assert meta_a["checksums"]["params"] == meta_b["checksums"]["params"]
    assert tree_equal(jax.device_get(got), jax.device_get(want))


def test_a_damaged_stage_handed_off_fails_clearly_without_falling_back(source, tmp_path):
    _, stage = source
    shutil.copytree(stage, tmp_path / "sft")
    _truncated(tmp_path / "sft" / CHECKPOINTS / "2")
    step_dir = tmp_path / "sft" / CHECKPOINTS / "2"
    with pytest.raises(CheckpointError) as info:
        common.load_stage(tmp_path / "sft", key="reward_from")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"reward_from='{tmp_path / 'sft'}': checkpoint step 2 at "
                              f"{step_dir} is damaged (params: ")
    assert "run the stage that wrote it again" in message
    assert complete_steps(tmp_path / "sft") == [1, 2]   # the source is left as it was


def test_resuming_from_another_init_from_is_refused_and_a_moved_one_accepted(source, tmp_path):
    root, stage = source
    first = sft.train(_sft_config(root, init_from=str(stage)), tmp_path / "b")
    recorded = common.load_stage(first)[4]["sources"]
    saved_with_source = common.load_stage(stage)[4]["checksums"]["params"]
    assert recorded == {"init_from": {"path": str(stage), "step": 2, "params": saved_with_source}}

    # The same checkpoint at another path: accepted (the finished stage is left as it was).
    moved = tmp_path / "moved" / "sft"
    shutil.copytree(stage, moved)
    before = os.path.getmtime(first / CHECKPOINTS / "2")
    sft.train(_sft_config(root, init_from=str(moved)), tmp_path / "b")
    assert os.path.getmtime(first / CHECKPOINTS / "2") == before

    # Another checkpoint with the same step, structure and config: refused, by name.
    other = tmp_path / "other" / "sft"
    with Checkpointer(stage) as ckpt:
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            common.load_stage(stage)[1])
        params, _, saved = ckpt.restore(params=like)
    saved.pop("checksums")
    with Checkpointer(other) as ckpt:
        ckpt.save(2, params=jax.tree.map(lambda x: x + 1e-3, params),
                  train={"n": jnp.int32(0)}, meta=saved)
    with pytest.raises(CheckpointError) as info:
        sft.train(_sft_config(root, init_from=str(other)), tmp_path / "b")
    message = str(info.value)
    assert message.startswith(f"{first} holds a run that started from init_from={stage} (step 2,")
    assert f"but init_from now gives {other} (step 2, params fingerprint " in message
    assert "point init_from at its checkpoint" in message and "\n" not in message
