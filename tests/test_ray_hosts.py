"""ModelHost on a local 2-CPU Ray: every method equals the same introspect call in-process."""

import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch

from actors.model_host import Host, host_pool
from introspect import models
from introspect.activations import last_token_activations
from introspect.errors import IntrospectError
from introspect.evals.common import chat_ids
from introspect.evals.detection import detection_trials
from introspect.evals.generation import Sampling, generate
from introspect.examples import score_examples
from introspect.logprobs import continuation_logprobs
from introspect.vectors import VectorSet, random_vectors, save_vectors
from pipelines.fanout import AS_IS, fan_out, score_on_pool

pytestmark = pytest.mark.ray

RANDOM = VectorSet(random_vectors(64, 12, 0), "tiny-random", "random", 6, name="random")
CONCEPTS = VectorSet(random_vectors(64, 4, 9), "tiny-random", "concept", 0, name="concepts")
SETS = {"random": RANDOM, "concepts": CONCEPTS}
PROMPTS = ["Hello there.", "What is the capital of France?", "Name a colour."]

# Shard functions defined here are shipped to the hosts by value (workers cannot import tests).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def reversed_scores(lm, df, vector_sets):
    """Scores in the reverse row order, with a fresh index: fan_out must restore the order."""
    return score_examples(lm, df, vector_sets, batch_size=8).iloc[::-1].reset_index(drop=True)


def doubled_scores(lm, df, vector_sets):
    """A broken shard function that returns every row twice."""
    out = score_examples(lm, df, vector_sets, batch_size=8)
    return pd.concat([out, out])


def held_scores(lm, df, vector_sets, flag_dir):
    """score_examples, except that the first call given row t000 hangs (a host that neither
    answers nor dies) until the test releases it."""
    held = Path(flag_dir, "held")
    if df.trial.iloc[0] == "t000" and not held.exists():
        held.touch()
        deadline = time.monotonic() + 120
        while not Path(flag_dir, "release").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return score_examples(lm, df, vector_sets, batch_size=8)


@pytest.fixture(scope="module")
def pool():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Two hosts of half a CPU each: the other CPU stays free for the load-error test.
    with host_pool("tiny-random", num_cpus=0.5, max_hosts=2) as hosts:
        yield hosts
    ray.shutdown()


@pytest.fixture(scope="module")
def trials():
    df = detection_trials(4, RANDOM, CONCEPTS, n_per_tier=6, magnitudes=[4.0, 16.0], seed=1)
    df["trial"] = [f"t{i:03d}" for i in range(len(df))]
    return df


def lora_dir(path, seed):
    """A LoRA adapter for tiny-random whose B matrices are not zero, so it changes answers."""
    import peft

    lm = models.load("tiny-random", device="cpu")
    model = peft.get_peft_model(lm.model, peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def test_pool_fills_the_cpus_one_model_each(pool):
    assert len(pool) == 2 and len(pool.infos) == 2
    assert len({i["pid"] for i in pool.infos}) == 2
    for info in pool.infos:
        assert info["model"] == "tiny-random" and info["device"] == "cpu"
        assert info["gpu_ids"] == [] and info["adapter"] is None and info["base_loads"] == 1
        assert info["node_id"] == ray.get_runtime_context().get_node_id()


def test_score_equals_in_process(pool, tiny, trials, tmp_path):
    expected = score_examples(tiny, trials, SETS, batch_size=8)
    got = ray.get(pool[0].score.remote(trials, SETS, 8))
    pd.testing.assert_frame_equal(got.drop(columns=["p_yes", "yes_no_mass"]), trials)
    assert (got.p_yes - expected.p_yes).abs().max() <= 1e-6
    assert (got.yes_no_mass - expected.yes_no_mass).abs().max() <= 1e-6
    # Vector files instead of objects: the set is named by the file's stem.
    for name, vs in SETS.items():
        save_vectors(tmp_path / f"{name}.safetensors", vs)
    paths = [str(tmp_path / f"{name}.safetensors") for name in SETS]
    from_files = ray.get(pool[1].score.remote(trials, paths, 8))
    assert (from_files.p_yes - expected.p_yes).abs().max() <= 1e-6
    # The generic call runs any introspect function on the host's model.
    called = ray.get(pool[1].call.remote(score_examples, trials, SETS, 8))
    assert (called.p_yes - expected.p_yes).abs().max() <= 1e-6


def test_generate_logprobs_activations_equal_in_process(pool, tiny):
    sampling = {"max_new_tokens": 6, "temperature": 1.0}
    texts = ray.get(pool[0].generate.remote(PROMPTS, seeds=[1, 2, 3], **sampling))
    ids = [chat_ids(tiny.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    assert texts == generate(tiny, ids, Sampling(**sampling), seeds=[1, 2, 3])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)

    conts = [" Hi.", " Paris", " Blue, I think."]
    got = ray.get(pool[1].logprobs.remote(PROMPTS, conts))
    assert got == pytest.approx(continuation_logprobs(tiny, PROMPTS, conts), abs=1e-5)
    # Independently: full forward of prompt + continuation, log-softmax over every position.
    tok = tiny.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPTS[2]}], tokenize=False, add_generation_prompt=True
    )
    ctx = tok.encode(text, add_special_tokens=False)
    cont = tok.encode(conts[2], add_special_tokens=False)
    with torch.no_grad():
        logits = tiny.model(torch.tensor([ctx + cont])).logits[0].float()
    steps = logits[len(ctx) - 1 : -1].log_softmax(-1)
    reference = steps.gather(1, torch.tensor(cont)[:, None]).sum().item()
    assert got[2] == pytest.approx(reference, abs=1e-4)
    assert all(v < 0 for v in got)

    acts = ray.get(pool[0].activations.remote(PROMPTS, [1, 3]))
    assert acts.shape == (3, 2, 64)
    for j, layer in enumerate([1, 3]):
        ref = last_token_activations(tiny, PROMPTS, layer).numpy()
        assert abs(acts[:, j] - ref).max() <= 1e-5
    with pytest.raises(IntrospectError, match="layers"):
        ray.get(pool[0].activations.remote(PROMPTS, [4]))


def test_adapters_switch_without_reloading_the_base(pool, trials, tmp_path):
    host = pool[0]
    a = lora_dir(tmp_path / "a" / "lora", seed=1)
    b = lora_dir(tmp_path / "b" / "lora", seed=2)  # same directory name: gets a distinct name
    base = ray.get(host.score.remote(trials, SETS, 8)).p_yes
    name_a = ray.get(host.use_adapter.remote(str(a)))
    with_a = ray.get(host.score.remote(trials, SETS, 8)).p_yes
    name_b = ray.get(host.use_adapter.remote(str(b)))
    with_b = ray.get(host.score.remote(trials, SETS, 8)).p_yes
    assert name_a != name_b
    assert (with_a - base).abs().max() > 1e-3 and (with_b - with_a).abs().max() > 1e-3
    ray.get(host.use_adapter.remote(None))
    assert ray.get(host.score.remote(trials, SETS, 8)).p_yes.equals(base)
    ray.get(host.use_adapter.remote(name_a))  # by name this time
    assert ray.get(host.score.remote(trials, SETS, 8)).p_yes.equals(with_a)
    info = ray.get(host.info.remote())
    assert info["adapter"] == name_a and info["base_loads"] == 1 and len(info["adapters"]) == 2
    # The adapter on the host equals the adapter loaded in-process the ordinary way.
    lm = models.load("tiny-random", device="cpu", adapter=a)
    reference = score_examples(lm, trials, SETS, batch_size=8).p_yes
    assert (with_a - reference).abs().max() <= 1e-6
    # A host started with an adapter (the plain object behind the actor, in this process).
    local = Host("tiny-random", adapter=a)
    assert local.info()["adapter"] == "lora" and local.info()["base_loads"] == 1
    assert (local.score(trials, SETS, 8).p_yes - with_a).abs().max() <= 1e-6
    # fan_out pins the adapter per shard, whatever each host had active.
    out = fan_out(pool, score_examples, trials, "trial", 9, SETS, 8, adapter=None, progress=False)
    assert (out.p_yes - base).abs().max() <= 1e-5
    with pytest.raises(IntrospectError, match="not a LoRA adapter"):
        ray.get(host.use_adapter.remote(str(tmp_path)))


def test_fan_out_keeps_input_order_and_every_key_once(pool, tiny, trials):
    shuffled = trials.sample(frac=1.0, random_state=3)
    out = fan_out(pool, score_examples, shuffled, "trial", 5, SETS, 8, adapter=None, progress=False)
    assert list(out.index) == list(shuffled.index)
    assert list(out.trial) == list(shuffled.trial)
    assert out.attrs["fan_out"]["shards"] == -(-len(trials) // 5)
    expected = score_examples(tiny, shuffled, SETS, batch_size=8)
    # Shards batch rows differently; padding may move fp32 results in the last digits only.
    assert (out.p_yes - expected.p_yes).abs().max() <= 1e-5
    keyless = shuffled.drop(columns="trial")
    scored = score_on_pool(pool, keyless, SETS, 8, shard_size=4, adapter=None, progress=False)
    pd.testing.assert_frame_equal(scored.drop(columns=["p_yes", "yes_no_mass"]), keyless)
    assert (scored.p_yes - expected.p_yes).abs().max() <= 1e-5
    # A shard function that returns its rows in another order and index is merged by key.
    back = fan_out(pool, reversed_scores, shuffled, "trial", 7, SETS, progress=False)
    assert list(back.index) == list(shuffled.index) and list(back.trial) == list(shuffled.trial)
    assert (back.p_yes - expected.p_yes).abs().max() <= 1e-5


def test_fan_out_errors_are_one_clear_line(pool, trials):
    with pytest.raises(IntrospectError, match="key: .* not unique"):
        fan_out(pool, score_examples, trials, "tier", 5, SETS, progress=False)
    with pytest.raises(IntrospectError, match="key: .* not a column"):
        fan_out(pool, score_examples, trials, "nope", 5, SETS, progress=False)
    with pytest.raises(IntrospectError, match=r"fn: shard \d+ returned 14 rows"):
        fan_out(pool, doubled_scores, trials, "trial", 7, SETS, progress=False)
    # fn fails on the host: its IntrospectError comes back as is, with no retries.
    with pytest.raises(IntrospectError, match="vector_set 'concepts'"):
        fan_out(pool, score_examples, trials, "trial", 50, {"random": RANDOM}, progress=False)


def test_host_pool_errors(pool):
    with pytest.raises(IntrospectError, match="do not fit"):
        host_pool("tiny-random", n=5, num_cpus=0.5)
    # The runner's pool waits for a node being restarted; one that never comes is the same line.
    t = time.monotonic()
    with pytest.raises(IntrospectError, match="do not fit"):
        host_pool("tiny-random", n=5, num_cpus=0.5, wait_for_cluster_s=3)
    assert time.monotonic() - t >= 3
    with pytest.raises(IntrospectError, match="model: cannot load 'no-such-model'"):
        host_pool("no-such-model", n=1, num_cpus=0.5)


def test_fan_out_keeps_merged_shards_and_a_retry_runs_only_the_rest(pool, trials, tmp_path):
    """What the runner relies on when it retries a pooled evaluation: the shards a lost try
    merged are read back, the missing ones run, and the rows equal an uncached fan-out."""
    args = (pool, score_examples, trials, "trial", 5, SETS)
    plain = fan_out(*args, adapter=None, progress=False)
    first = fan_out(*args, adapter=None, progress=False, cache=tmp_path)
    kept = sorted(tmp_path.glob("*.parquet"))
    assert len(kept) == first.attrs["fan_out"]["shards"] and first.attrs["fan_out"]["cached"] == 0
    for f in kept[::2]:  # as if the try was lost with these shards not yet merged
        f.unlink()
    again = fan_out(*args, adapter=None, progress=False, cache=tmp_path)
    assert again.attrs["fan_out"]["cached"] == len(kept) - len(kept[::2])
    for out in (first, again):
        pd.testing.assert_frame_equal(out, plain, check_exact=False, atol=1e-6)
    # Other work (another adapter, other arguments) never reads these shards.
    other = fan_out(pool, score_examples, trials, "trial", 5, {**SETS}, adapter=AS_IS,
                    progress=False, cache=tmp_path)  # fmt: skip
    assert other.attrs["fan_out"]["cached"] == 0


def test_work_that_cannot_be_digested_is_not_cached(tmp_path, trials):
    from pipelines.fanout import _shard_files

    shards = [trials.iloc[:5], trials.iloc[5:]]
    assert _shard_files(tmp_path, score_examples, None, (lambda: 0,), {}, shards) == [None] * 2
    named = _shard_files(tmp_path, score_examples, None, (SETS,), {}, shards)
    assert len(set(named)) == 2 and all(f.parent == tmp_path for f in named)


def test_a_shard_held_by_a_hung_host_runs_again_on_an_idle_one(pool, tiny, trials, tmp_path):
    """One host hangs on its first shard; the other does the rest, then a backup copy of the
    held shard, and the fan-out ends with every row once instead of waiting on the hung host."""
    try:
        out = fan_out(pool, held_scores, trials, "trial", 5, SETS, str(tmp_path), adapter=None,
                      progress=False, straggler_s=2)  # fmt: skip
    finally:
        (tmp_path / "release").touch()  # frees the hung host for the tests after this one
    assert (tmp_path / "held").exists()
    assert out.attrs["fan_out"]["backups"] == 1 and out.attrs["fan_out"]["retries"] == 0
    assert list(out.trial) == list(trials.trial) and list(out.index) == list(trials.index)
    expected = score_examples(tiny, trials, SETS, batch_size=8)
    assert (out.p_yes - expected.p_yes).abs().max() <= 1e-5
