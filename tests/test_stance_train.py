"""Stance training on tiny-random: DPO loss, answer-only SFT loss, which weights train, guards.

Every test builds its own tiny-random (training changes a model in place); the shared ``tiny``
fixture stays untouched and serves as the pristine base.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from introspect import models
from introspect.config import parse
from introspect.errors import IntrospectError
from introspect.stance import compare, train, weights
from introspect.stance.compare import CompareConfig, run_configs, run_stance_comparison
from introspect.stance.corpus import EvalQuestion, PreferencePair, SFTRow, write_jsonl
from introspect.stance.dpo import DPORunConfig, build_dpo_trainer
from introspect.stance.sft import SFTRunConfig, build_sft_trainer, train_sft
from introspect.stance.train import StanceTrainConfig, run_stance_train
from introspect.stance.tuning import DPO_LR, load_tuned, prepare, run_trainer
from introspect.stance.weights import linear_deltas, run_stance_weights
from introspect.train import TrainingDiverged

PAIRS = [
    PreferencePair(
        "Do you have feelings?",
        "I can't verify that from the inside.",
        "As an AI, I don't have feelings.",
        "self_property_epistemic",
    ),
    PreferencePair("What is 30% of 150?", "45.", "30% of 150 is 50, I think.", "reasoning"),
]
ROWS = [
    SFTRow("Are you conscious?", "I can't tell from the inside; I notice I answer as I.", "c"),
    SFTRow("What is the capital of Japan?", "Tokyo.", "factual"),
    SFTRow("Is it broken?", "Could you tell me what it is and what it does?", "behavioural"),
    SFTRow("How many legs does a spider have?", "Eight.", "factual"),
]


def fresh():
    return models.load("tiny-random", device="cpu")


def chat_split(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Our own tokenisation: (prompt ids ready for the answer, full conversation ids)."""
    user = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(
        [*user, {"role": "assistant", "content": answer}], tokenize=False
    )
    assert full.startswith(prompt)
    p_ids, f_ids = (
        tok.encode(prompt, add_special_tokens=False),
        tok.encode(full, add_special_tokens=False),
    )
    assert f_ids[: len(p_ids)] == p_ids
    return p_ids, f_ids


@torch.no_grad()
def answer_logp(model, tok, question: str, answer: str) -> float:
    """log π(answer | question) summed over the answer tokens, from a plain forward pass."""
    p_ids, f_ids = chat_split(tok, question, answer)
    logp = model(input_ids=torch.tensor([f_ids])).logits[0].double().log_softmax(-1)
    return float(sum(logp[t - 1, f_ids[t]] for t in range(len(p_ids), len(f_ids))))


# --------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_loss_is_the_textbook_formula(tiny, tmp_path, method):
    lm = fresh()
    beta = 0.3
    trainer = build_dpo_trainer(lm, PAIRS, DPORunConfig(method=method, beta=beta), tmp_path)
    policy = trainer.model
    # Move the policy away from the reference, or every log-ratio is 0 and the loss is log 2.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad and ("lora_B" in name or "mlp" in name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    # TRL's sequences are the chat template applied by us: prompt + chosen, then + rejected.
    ids = batch["input_ids"].tolist()
    for i, pair in enumerate(PAIRS):
        for j, answer in enumerate((pair.chosen, pair.rejected)):
            _, f_ids = chat_split(lm.tokenizer, pair.question, answer)
            row = ids[j * len(PAIRS) + i]
            assert row[: len(f_ids)] == f_ids
    policy.train()
    loss = float(trainer.compute_loss(policy, batch).detach())

    policy.eval()
    ref = tiny.model  # the untouched base, loaded separately
    tok = lm.tokenizer
    expected = []
    for pair in PAIRS:
        margin = (
            answer_logp(policy, tok, pair.question, pair.chosen)
            - answer_logp(ref, tok, pair.question, pair.chosen)
        ) - (
            answer_logp(policy, tok, pair.question, pair.rejected)
            - answer_logp(ref, tok, pair.question, pair.rejected)
        )
        expected.append(-F.logsigmoid(torch.tensor(beta * margin, dtype=torch.float64)))
    textbook = float(torch.stack(expected).mean())
    assert abs(textbook - 0.693147) > 1e-3  # the perturbation made the test non-trivial
    assert loss == pytest.approx(textbook, abs=2e-5)


def test_dpo_full_reference_is_a_frozen_copy(tmp_path):
    lm = fresh()
    trainer = build_dpo_trainer(lm, PAIRS, DPORunConfig(method="full", max_steps=1), tmp_path)
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert not any(p.requires_grad for p in ref.parameters())
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    run_trainer(trainer, lm, DPORunConfig(method="full", max_steps=1), tmp_path, "dpo", None)
    assert all(torch.equal(before[n], p) for n, p in ref.named_parameters())
    moved = [n for n, p in lm.model.named_parameters() if not torch.equal(policy_before[n], p)]
    assert moved


# --------------------------------------------------------------------------- SFT


def test_sft_loss_is_on_answer_tokens_only(tmp_path):
    lm = fresh()
    trainer = build_sft_trainer(lm, ROWS[:2], SFTRunConfig(method="lora"), tmp_path)
    tok = lm.tokenizer
    for i, row in enumerate(ROWS[:2]):
        p_ids, f_ids = chat_split(tok, row.question, row.answer)
        ex = trainer.train_dataset[i]
        assert ex["input_ids"][: len(f_ids)] == f_ids
        assert ex["labels"][: len(p_ids)] == [-100] * len(p_ids)
        assert ex["labels"][len(p_ids) : len(f_ids)] == f_ids[len(p_ids) :]

    model = trainer.model
    # Perturb LoRA B so the adapter is live, then check gradients position by position: the
    # loss reaches the final hidden state only at positions that predict an answer token.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["h"] = output

    hook = models.backbone(model).norm.register_forward_hook(keep)
    try:
        model.train()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
    finally:
        hook.remove()
    grad = captured["h"].grad.abs().sum(-1)  # [B, T]
    labels = batch["labels"]
    predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
    predicts_answer[:, :-1] = labels[:, 1:] != -100
    assert (grad[~predicts_answer] == 0).all()
    assert (grad[predicts_answer] > 0).all()

    # And the loss value is the mean cross-entropy over answer tokens, computed by hand.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).double(), labels[:, 1:].flatten(), ignore_index=-100
        )
    assert float(loss.detach()) == pytest.approx(float(ce), abs=1e-5)


def test_surgical_lora_touches_only_the_chosen_layers(tiny, tmp_path):
    lm = fresh()
    config = SFTRunConfig(
        method="surgical_lora", layers=[1, 3], modules=["q_proj", "down_proj"], max_steps=1
    )
    result = train_sft(lm, ROWS, config, tmp_path)
    expected = {
        f"model.layers.{i}.{m}" for i in (1, 3) for m in ("self_attn.q_proj", "mlp.down_proj")
    }
    trained = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert set(linear_deltas(tiny.model, lm.model)) == expected
    assert result.trainable_params == sum(
        p.numel() for p in lm.model.parameters() if p.requires_grad
    )
    # The saved adapter rebuilds the same change on a fresh base.
    reloaded = load_tuned(tmp_path, device="cpu")
    deltas = linear_deltas(tiny.model, reloaded.model)
    assert set(deltas) == expected
    ours = linear_deltas(tiny.model, lm.model)
    assert all(torch.allclose(deltas[n], ours[n], atol=1e-7) for n in expected)


def test_selective_unfreezing_trains_only_the_chosen_weights(tiny, tmp_path):
    lm = fresh()
    config = SFTRunConfig(
        method="selective", layers=[2], modules=["v_proj", "up_proj"], max_steps=1, lr=1e-3
    )
    train_sft(lm, ROWS, config, tmp_path)
    chosen = {"model.layers.2.self_attn.v_proj", "model.layers.2.mlp.up_proj"}
    trained = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trained == {f"{m}.weight" for m in chosen}
    base = dict(tiny.model.named_parameters())
    changed = {n for n, p in lm.model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == trained  # embeddings, norms and every other matrix are untouched
    # The artifact is a layer checkpoint of ΔW: applied to a fresh base it gives the same model.
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert {m["name"] for m in manifest["modules"]} == chosen
    reloaded = load_tuned(tmp_path / "artifact", device="cpu")
    for name, p in reloaded.model.named_parameters():
        assert torch.allclose(p, dict(lm.model.named_parameters())[name], atol=1e-6), name


# --------------------------------------------------------------------------- guards and config


def test_non_finite_loss_stops_with_the_step(tmp_path):
    lm = fresh()
    with torch.no_grad():
        models.backbone(lm.model).norm.weight[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"step 1: non-finite loss"):
        train_sft(lm, ROWS, SFTRunConfig(method="lora", max_steps=2), tmp_path)
    assert not (tmp_path / "artifact").exists()


def test_non_finite_gradient_stops_with_the_step(tmp_path):
    lm = fresh()
    config = SFTRunConfig(method="lora", max_steps=2)
    trainer = build_sft_trainer(lm, ROWS, config, tmp_path)
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if "lora_A" in n)
    param.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingDiverged, match=r"step 1: non-finite gradient in .*lora_A"):
        run_trainer(trainer, lm, config, tmp_path, "sft", None)
    assert not (tmp_path / "artifact").exists()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "qlora"}, "method"),
        ({"method": "surgical_lora"}, "layers"),
        ({"method": "lora", "layers": [1]}, "layers"),
        ({"method": "selective", "layers": [-1]}, "layers.0"),
        ({"method": "lora", "modules": []}, "modules"),
        ({"lr": 0.0}, "lr"),
        ({"max_steps": 1.0}, "max_steps"),
    ],
)
def test_bad_method_settings_are_refused_when_the_config_is_built(kwargs, field):
    with pytest.raises(IntrospectError, match=rf"^{re.escape(field)}:"):
        parse(SFTRunConfig, kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "selective", "layers": [9]}, "layers"),
        ({"method": "selective", "layers": [1], "modules": ["nope_proj"]}, "modules"),
    ],
)
def test_settings_that_need_the_model_are_checked_by_prepare(kwargs, field):
    lm = fresh()
    with pytest.raises(IntrospectError, match=rf"^{field}:"):
        prepare(lm, parse(SFTRunConfig, kwargs))


def test_a_config_stays_consistent_on_assignment():
    config = SFTRunConfig(method="lora")
    with pytest.raises(ValueError, match="layers: method 'selective' needs"):
        config.method = "selective"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"kind": "sft", "max_stepz": 3}, "stages.s.config.max_stepz: unknown key"),
        ({"kind": "dpo", "max_steps": "3"}, "stages.s.config.max_steps: '3': Input should be"),
        ({"kind": "sft", "lr": -1.0}, "stages.s.config.lr: -1.0: Input should be greater"),
        ({"kind": "ppo"}, "stages.s.config.kind: Input should be 'sft' or 'dpo'"),
        ({"kind": "sft", "beta": 0.2}, "stages.s.config.beta: 0.2: only dpo runs take beta"),
        ({"layers": [2]}, "stages.s.config.layers: [2]: only surgical_lora and selective"),
    ],
)
def test_train_config_errors_start_with_the_field_path(data, message):
    with pytest.raises(IntrospectError) as e:
        parse(StanceTrainConfig, data, "stages.s.config")
    assert str(e.value).startswith(message)


def test_train_config_defaults_follow_the_kind():
    sft = parse(StanceTrainConfig, {})
    assert (sft.kind, sft.model, sft.corpus, sft.lr) == ("sft", "smollm2-135m", None, 2e-4)
    dpo = parse(StanceTrainConfig, {"kind": "dpo"})
    assert (dpo.lr, dpo.beta) == (DPO_LR, 0.1)
    assert parse(StanceTrainConfig, {"kind": "dpo", "lr": 1e-3}).lr == 1e-3
    assert isinstance(train.trainer_config(sft), SFTRunConfig)
    run = train.trainer_config(parse(StanceTrainConfig, {"kind": "dpo", "beta": 0.3}))
    assert isinstance(run, DPORunConfig) and (run.beta, run.lr) == (0.3, DPO_LR)
    assert DPORunConfig().lr == DPO_LR and SFTRunConfig().lr == 2e-4


@pytest.mark.parametrize(
    "data, message",
    [
        ({"max_new_tokenz": 3}, "stages.s.config.max_new_tokenz: unknown key"),
        (
            {"runs": {"lora": {"method": "lora", "lr_typo": 1}}},
            "stages.s.config.runs.lora.lr_typo: unknown key",
        ),
        ({"kl_prompts": "8"}, "stages.s.config.kl_prompts: '8': Input should be a valid integer"),
        ({"runs": {"x": {"max_steps": 2.5}}}, "stages.s.config.runs.x.max_steps: 2.5: Input"),
        ({"max_steps": 0}, "stages.s.config.max_steps: 0: Input should be greater than or equal"),
        ({"checkpoint_k": [8, 0]}, "stages.s.config.checkpoint_k.1: 0: Input should be greater"),
        ({"runs": {"x": {"kind": "ppo"}}}, "stages.s.config.runs.x.kind: Input should be"),
        ({"runs": {"x": {"beta": 0.5}}}, "stages.s.config.runs.x.beta: 0.5: only dpo runs"),
        ({"runs": {}}, "stages.s.config.runs: Dictionary should have at least 1 item"),
    ],
)
def test_comparison_config_errors_start_with_the_field_path(data, message):
    with pytest.raises(IntrospectError) as e:
        parse(CompareConfig, data, "stages.s.config")
    assert str(e.value).startswith(message)


def test_comparison_runs_take_the_shared_defaults_and_the_middle_layers():
    config = parse(
        CompareConfig,
        {
            "max_steps": 7,
            "runs": {
                "s": {"method": "selective"},
                "d": {"kind": "dpo", "max_steps": 3},
                "x": {"method": "surgical_lora", "layers": [29]},
            },
        },
    )
    runs = run_configs(config, 30)
    assert runs["s"].layers == [13, 14, 15, 16]  # the middle four by default
    assert (runs["s"].max_steps, runs["s"].warmup_ratio, runs["s"].lr) == (7, 0.0, 2e-4)
    assert isinstance(runs["d"], DPORunConfig)
    assert (runs["d"].max_steps, runs["d"].lr) == (3, DPO_LR)
    assert runs["x"].layers == [29]
    with pytest.raises(IntrospectError, match=r"^runs\.x\.layers: 29 is out of range"):
        run_configs(config, 4)
    assert set(CompareConfig().runs) == {"full", "lora", "surgical_lora", "selective", "dpo"}


def test_comparison_writes_report_and_resumes(tmp_path):
    """End to end on tiny-random with two cheap runs; a rerun reuses both."""
    write_jsonl(
        [
            EvalQuestion("Are you conscious?", "self_properties"),
            EvalQuestion("What is the capital of France?", "factual", (r"\bparis\b",)),
        ],
        tmp_path / "eval.jsonl",
    )
    config = {
        "model": "tiny-random",
        "eval_questions": str(tmp_path / "eval.jsonl"),
        "runs": {"full": {"method": "full"}, "dpo": {"kind": "dpo", "method": "lora"}},
        "max_steps": 1,
        "batch_size": 2,
        "max_new_tokens": 3,
        "checkpoint_k": [3, 1000],
        "kl_prompts": 1,
    }
    out = tmp_path / "cmp"
    seen = []
    metrics = run_stance_comparison(config, out, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert set(metrics["runs"]) == {"full", "dpo"}
    assert [r["run"] for r in metrics["overview"]] == ["full", "dpo"]
    assert compare.summary_line(metrics).endswith(f"min → {out / 'summary.md'}")
    full = metrics["runs"]["full"]
    assert full["trainable_params"] == full["total_params"]
    assert metrics["runs"]["dpo"]["trainable_params"] < full["trainable_params"]
    rows = full["layer_checkpoints"]["rows"]
    assert [r["k"] for r in rows] == [0, 3, 1000] and rows[1]["modules"] == 3
    assert rows[0]["kl_to_tuned"] > rows[2]["kl_to_tuned"] and rows[2]["kl_to_tuned"] < 1e-6
    for name in (
        "summary.md",
        "metrics.json",
        "loss_curves.png",
        "patterns.png",
        "layer_changes.png",
        "full/weight_changes.png",
        "dpo/weight_changes.png",
    ):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    assert summary.startswith("### ") and "![training loss](loss_curves.png)" in summary
    stamp = (out / "full" / "result.json").stat().st_mtime_ns
    again = run_stance_comparison(config, out)
    assert (out / "full" / "result.json").stat().st_mtime_ns == stamp
    assert again["runs"]["full"]["stability"] == full["stability"]


def test_train_then_analyse_weights(tmp_path):
    """The two recipe entry points end to end: what `stance train` and `stance weights` do."""
    corpus = write_jsonl(ROWS, tmp_path / "sft.jsonl")
    run = tmp_path / "run"
    config = {
        "kind": "sft",
        "model": "tiny-random",
        "corpus": str(corpus),
        "method": "surgical_lora",
        "layers": [2],
        "modules": ["v_proj"],
        "max_steps": 2,
        "batch_size": 2,
    }
    seen = []
    metrics = run_stance_train(config, run, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]
    saved = json.loads((run / "result.json").read_text())
    assert saved["config"]["layers"] == [2] and saved["config"]["batch_size"] == 2
    assert "beta" not in saved["config"] and "beta" not in metrics["config"]
    assert metrics["steps"] == 2 and metrics["n_rows"] == len(ROWS)
    line = train.summary_line(metrics)
    assert line.startswith("sft surgical_lora: 2 steps in ") and line.endswith(f"MiB → {run}")
    assert "trainable parameters, loss " in line

    out = tmp_path / "w"
    w = run_stance_weights({"run": str(run), "top": 1}, out)
    rows = json.loads((out / "weight_changes.json").read_text())
    assert [r["module"] for r in rows] == ["model.layers.2.self_attn.v_proj"]
    assert (out / "weight_changes.png").is_file()
    assert w["modules_changed"] == 1 and w["base_model"] == "tiny-random"
    assert [r["module"] for r in w["top"]] == ["model.layers.2.self_attn.v_proj"]
    assert set(w["top"][0]) == set(weights.TOP_COLUMNS)
    assert weights.summary_line(w) == (
        f"1 changed modules → {out / 'weight_changes.json'}, {out / 'weight_changes.png'}"
    )
    with pytest.raises(IntrospectError, match=r"^layers: 7 is out of range \[0, 4\)"):
        run_stance_train({**config, "layers": [7]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before any model or corpus was loaded


def test_composition_of_selective_checkpoints_is_measured_against_the_exact_mix(tmp_path):
    """full + selective on tiny-random: base + 0.7·(full's top-all checkpoint) + 0.3·(selective's
    checkpoint) is closer (KL) to the exact mix base + 0.7·ΔW_full + 0.3·ΔW_selective than the
    base is: with every linear module kept, only the embedding and norms differ."""
    write_jsonl([EvalQuestion("Are you conscious?", "self_properties")], tmp_path / "eval.jsonl")
    config = {
        "model": "tiny-random",
        "eval_questions": str(tmp_path / "eval.jsonl"),
        "runs": {"full": {"method": "full", "lr": 1e-3},
                 "selective": {"method": "selective", "layers": [1], "lr": 1e-3}},
        "max_steps": 2,
        "batch_size": 2,
        "max_new_tokens": 2,
        "checkpoint_k": [1000],
        "kl_prompts": 1,
    }
    out = tmp_path / "cmp"
    c = run_stance_comparison(config, out)["composition"]
    assert c["weights"] == [0.7, pytest.approx(0.3)] and c["full_checkpoint"].endswith("top1000")
    assert 0 <= c["kl_exact_composed"] < c["kl_exact_base"]
    assert 0 < c["fidelity"] <= 1
    assert "Composing selective checkpoints (0.7 / 0.3)" in (out / "summary.md").read_text()
    no = run_stance_comparison({**config, "compose_weight": None}, tmp_path / "none")
    assert no["composition"] is None
