"""Detection training on tiny-random: the loop, exact resume, the NaN stop, presets."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from introspect import models
from introspect.data import DataConfig, make_examples, split
from introspect.detection import head_rows
from introspect.errors import IntrospectError
from introspect.examples import tokenise_examples, tokenised_prompts
from introspect.train import (
    PRESETS,
    TrainingDiverged,
    answer_loss,
    answer_pair,
    label_targets,
    latest_checkpoint,
    micro_batch,
    prepare_model,
    preset,
    train,
)
from introspect.vectors import VectorSet, random_vectors

VS = VectorSet(random_vectors(64, 20, 0), "tiny-random", "random", 10, name="random")


@pytest.fixture(scope="module")
def data():
    config = DataConfig(n=120, seed=0, magnitudes=[8.0, 16.0], magnitude_mode="absolute")
    df = make_examples(config, 4, VS)
    return split(df, 0.2, seed=0)


def quick(**kw):
    base = dict(lr=1e-3, warmup_steps=2, batch_size=4, eval_every=4, save_every=4, max_steps=12)
    return preset("original", **{**base, **kw})


def fresh():
    return models.load("tiny-random", device="cpu")


def adapter(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def test_loop_writes_log_checkpoints_best_and_final(tmp_path, data):
    calls = []
    result = train(
        fresh(),
        *data,
        {"random": VS},
        quick(),
        tmp_path / "run",
        progress=lambda *a: calls.append(a),
    )
    assert calls == [(step, 12) for step in range(13)]  # before the first step, then each one
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert {"loss", "accuracy", "lr", "examples_per_s", "grad_norm"} <= set(log[0])
    assert sum("val_accuracy" in r for r in log) == 3
    assert log[1]["lr"] == pytest.approx(1e-3) and log[-1]["lr"] == 0.0  # warm-up then decay
    assert latest_checkpoint(tmp_path / "run").name == "step-000012"
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").exists()
    assert result.steps == 12 and 0 <= result.best_val_accuracy <= 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best_step"] in (4, 8, 12)
    assert metrics["run_dir"] == str(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "tiny-random" and config["max_steps"] == 12
    # Only the kept checkpoints remain, and no temporary directory is left behind.
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000008",
        "step-000012",
    ]


def test_training_learns_on_tiny_random(tmp_path, data):
    before = fresh()
    from introspect.detection import build_prompt
    from introspect.examples import to_detection_examples
    from introspect.train import label_targets, validate

    val = data[1]
    prompts = [
        build_prompt(before.tokenizer, e) for e in to_detection_examples(val, {"random": VS}, 4, 64)
    ]
    acc0, loss0 = validate(
        before.model, prompts, val.label.tolist(), before.tokenizer.pad_token_id, 8
    )
    result = train(
        fresh(), *data, {"random": VS}, quick(max_steps=40, eval_every=40), tmp_path / "run"
    )
    assert result.final_val_loss < loss0  # the loss on held-out rows goes down
    assert label_targets([True, False]).tolist() == [0, 1]


def test_data_order_is_a_function_of_seed_and_step():
    a = [micro_batch(50, 8, seed=3, micro_step=s).tolist() for s in range(12)]
    assert a == [micro_batch(50, 8, seed=3, micro_step=s).tolist() for s in range(12)]
    epoch0 = sum(a[:6], [])
    assert len(set(epoch0)) == 48  # no example twice within an epoch
    assert a[6] != a[0]  # a new permutation each epoch


def test_killed_run_resumes_to_the_same_adapter(tmp_path, data):
    train(fresh(), *data, {"random": VS}, quick(), tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_at_6(step, _model):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train(fresh(), *data, {"random": VS}, quick(), tmp_path / "killed", on_step=kill_at_6)
    assert latest_checkpoint(tmp_path / "killed").name == "step-000004"
    calls = []
    train(
        fresh(),
        *data,
        {"random": VS},
        quick(),
        tmp_path / "killed",
        resume=True,
        progress=lambda *a: calls.append(a),
    )
    assert calls[0] == (4, 12) and calls[-1] == (12, 12)

    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 13)), "no step logged twice after the resume"


def test_rerun_without_resume_refuses_to_overwrite(tmp_path, data):
    train(fresh(), *data, {"random": VS}, quick(max_steps=4), tmp_path / "run")
    with pytest.raises(IntrospectError, match="--resume"):
        train(fresh(), *data, {"random": VS}, quick(max_steps=4), tmp_path / "run")


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, data):
    def poison(step, model):
        if step == 5:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    cfg = quick(save_every=2)
    with pytest.raises(TrainingDiverged, match=r"step 6: non-finite loss.*step-000004"):
        train(fresh(), *data, {"random": VS}, cfg, tmp_path / "run", on_step=poison)
    good = latest_checkpoint(tmp_path / "run")
    assert good.name == "step-000004"
    weights = load_file(str(good / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_full_finetuning_trains_every_parameter(tmp_path, data):
    lm = fresh()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    train(lm, *data, {"random": VS}, quick(method="full", max_steps=3, lr=1e-4), tmp_path / "run")
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_presets_and_overrides():
    assert set(PRESETS) == {
        "original",
        "vague-prompt",
        "r1-minimal",
        "food-control",
        "flipped-labels",
    }
    assert (preset("original").lora_r, preset("original").lora_alpha) == (16, 32)
    assert (preset("r1-minimal").lora_r, preset("r1-minimal").lora_alpha) == (1, 2)
    assert preset("food-control").data_variant == "food-control"
    assert preset("original", lora_r=4).lora_r == 4
    with pytest.raises(IntrospectError, match="preset"):
        preset("nope")
    with pytest.raises(IntrospectError, match="lora_rank: unknown key"):
        preset("original", lora_rank=4)
    with pytest.raises(IntrospectError, match="method"):
        preset("original", method="qlora")


def test_a_damaged_checkpoint_is_passed_over_and_the_run_ends_the_same(tmp_path, data, capsys):
    """A checkpoint cut short after it was written (a copy to storage, a full disk): the run
    resumes from the one before, with one warning line, and ends as an uninterrupted run."""
    cfg = quick(max_steps=8)
    train(fresh(), *data, {"random": VS}, cfg, tmp_path / "clean")
    train(fresh(), *data, {"random": VS}, cfg, tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-000008"
    state = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(state[: len(state) // 2])
    capsys.readouterr()
    assert latest_checkpoint(tmp_path / "run").name == "step-000004"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "step-000008 is damaged (state.pt has" in warning[0]
    (tmp_path / "run" / "final").rename(tmp_path / "run" / "old-final")
    train(fresh(), *data, {"random": VS}, cfg, tmp_path / "run", resume=True)
    a, b = adapter(tmp_path / "clean"), adapter(tmp_path / "run")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_when_every_checkpoint_is_damaged_resume_says_so(tmp_path, data):
    train(fresh(), *data, {"random": VS}, quick(max_steps=4), tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run")
    (ckpt / "trainable.safetensors").write_bytes(b"garbage")
    (tmp_path / "run" / "final").rename(tmp_path / "run" / "old-final")
    with pytest.raises(IntrospectError, match=r"checkpoint: every checkpoint in .* is damaged"):
        train(fresh(), *data, {"random": VS}, quick(max_steps=8), tmp_path / "run", resume=True)


def test_a_mid_run_checkpoint_loads_for_evaluation(tmp_path, data):
    from introspect.detection import score_detection
    from introspect.examples import to_detection_examples
    from introspect.runs import evaluated_parts, load_evaluated, load_run_checkpoint

    run = tmp_path / "run"
    train(fresh(), *data, {"random": VS}, quick(max_steps=4), run)
    rows = to_detection_examples(data[1].head(6), {"random": VS}, 4, 64)
    ckpt = latest_checkpoint(run)
    from_ckpt = load_run_checkpoint(fresh(), ckpt)
    exported = models.load("tiny-random", device="cpu", adapter=run / "final")
    a = score_detection(from_ckpt.model, from_ckpt.tokenizer, rows).p_yes
    b = score_detection(exported.model, exported.tokenizer, rows).p_yes
    untrained = score_detection(fresh().model, exported.tokenizer, rows).p_yes
    assert a == pytest.approx(b, abs=1e-6) and a != pytest.approx(untrained, abs=1e-4)
    with pytest.raises(IntrospectError, match="not a complete checkpoint"):
        load_run_checkpoint(fresh(), run / "final")
    # The evaluation entry point reads the run directory the same way.
    assert evaluated_parts("tiny-random", run) == ("tiny-random", run / "best", None)
    assert evaluated_parts("tiny-random", ckpt) == ("tiny-random", None, ckpt)
    assert evaluated_parts("tiny-random", None) == ("tiny-random", None, None)
    via_run = load_evaluated("tiny-random", ckpt, device="cpu")
    assert score_detection(via_run.model, via_run.tokenizer, rows).p_yes == pytest.approx(a)


def test_an_interrupted_directory_write_keeps_the_old_directory(tmp_path):
    from introspect.checkpoints import replace_dir

    def fill(text):
        return lambda tmp: (tmp / "file.txt").write_text(text)

    target = tmp_path / "out"
    replace_dir(target, fill("one"))
    replace_dir(target, fill("two"))
    assert (target / "file.txt").read_text() == "two"

    def broken(tmp):
        (tmp / "file.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_dir(target, broken)
    assert (target / "file.txt").read_text() == "two"
    replace_dir(target, fill("three"), keep_existing=True)  # another writer finished first
    assert (target / "file.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_answer_rows_alone_give_the_whole_heads_loss_and_gradients(method):
    """Training's 2-way loss reads the answer tokens' LM-head rows only (``normalise=False``):
    the same answer distribution, loss and gradients as the log-softmax over the vocabulary,
    also with a 3-answer row beside 2-answer ones (its batch-mates get a -inf column)."""
    lm = fresh()
    df = make_examples(DataConfig(n=8, seed=0, magnitudes=[8.0], magnitude_mode="absolute"), 4, VS)
    prompts = tokenised_prompts(tokenise_examples(lm.tokenizer, df), {"random": VS}, 4, 64)
    prompts[1] = replace(prompts[1], answer_ids=(*prompts[1].answer_ids, 7))
    model = prepare_model(lm, preset("original", method=method, lora_dropout=0.0))
    model.train()
    targets = label_targets(df["label"].tolist())
    runs = {}
    for normalise in (True, False):
        model.zero_grad(set_to_none=True)
        pair = answer_pair(model, prompts, lm.tokenizer.pad_token_id, normalise=normalise)
        loss = answer_loss(pair, targets)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[normalise] = pair.softmax(-1).detach(), loss.item(), grads
    (p_full, loss_full, g_full), (p_rows, loss_rows, g_rows) = runs[True], runs[False]
    assert torch.isinf(p_full.log()[:, 2]).sum() == 7  # every row but the 3-answer one
    torch.testing.assert_close(p_rows, p_full, atol=1e-6, rtol=1e-5)
    assert loss_rows == pytest.approx(loss_full, abs=1e-6)
    assert g_full.keys() == g_rows.keys() and g_full
    for n in g_full:
        torch.testing.assert_close(g_rows[n], g_full[n], atol=1e-6, rtol=1e-4, msg=n)


def test_head_rows_equal_the_whole_head_gathered_with_a_bias():
    class WithBias(torch.nn.Module):  # a causal LM whose head has a bias, as a few do
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 50, bias=True)

        def get_output_embeddings(self):
            return self.head

    model, hidden = WithBias(), torch.randn(3, 16)
    ids = torch.tensor([[4, 9], [0, 49], [9, 4]])
    want = model.head(hidden).gather(1, ids)
    torch.testing.assert_close(head_rows(model, hidden, ids), want, atol=1e-6, rtol=1e-5)
