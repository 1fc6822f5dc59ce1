"""The seed-claim lines of the stance report: each verdict follows from its numbers."""

from introspect.stance.claims import seed_002, seed_003


def _run(before, after, p, lr, stable, effective=100.0):
    return {"shift": {"pragmatic": {"n": 48, "before": before, "after": after, "p": p}},
            "lr": lr, "kind": "sft",
            "weights": {"median_stable_rank": stable, "median_effective_rank": effective}}


def test_seed_003_verdicts():
    full, lora = _run(3, 20, 1e-4, 1e-4, 1.5), _run(3, 18, 1e-3, 1e-3, 1.2, 14)
    line = seed_003({"full": full, "lora": lora})
    assert "not supported: LoRA moves the stance too" in line and "10× its lr" in line
    assert "3 → 20 of 48 (p < 0.05)" in line and "low-rank by stable rank" in line
    weak = _run(3, 5, 0.5, 1e-3, 1.2)
    assert "supported at this size" in seed_003({"full": full, "lora": weak})
    assert "not answered" in seed_003({"full": _run(3, 4, 0.6, 1e-4, 40.0), "lora": weak})
    assert "higher-rank than LoRA" in seed_003({"full": _run(3, 4, 0.6, 1e-4, 40.0),
                                                "lora": weak})  # fmt: skip
    assert seed_003({"full": full}) is None


def test_seed_002_names_the_models_that_pass_every_criterion():
    ok = [{"passed": True}] * 4
    line = seed_002([("base", {"criteria": [{"passed": False}] + ok[1:]}),
                     ("full", {"criteria": ok})])  # fmt: skip
    assert "met by full" in line and "base 3/4, full 4/4" in line
