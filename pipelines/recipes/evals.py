"""Recipes ``eval.<suite>``: the B1–B7 evaluation suites.

Each suite's config and run function live with its science in :mod:`introspect.evals`; a
recipe adds only where it runs (in this process, or through ``context.mapper`` over model
hosts) and the line a command prints.
"""

from __future__ import annotations

from pipelines.recipes import Delegate


def _suite(module: str, config: str, run: str, line) -> Delegate:
    return Delegate(module, config, run, line, "metrics.json, summary.md and plots")


def _rate(r: dict, digits: int = 3) -> str:
    return f"{r['rate']:.{digits}f}"


def accuracies(per_question: dict) -> str:
    return ", ".join(
        f"{q} {v['accuracy']['rate']:.3f} [{v['accuracy']['ci'][0]:.2f}, "
        f"{v['accuracy']['ci'][1]:.2f}]"
        for q, v in per_question.items()
    )


def _b1(m: dict) -> str:
    rows = list(m["tiers"].items()) + ([("food", m["food"])] if "food" in m else [])
    lines = [
        f"B1 detection: {m['label']}",
        "tier             accuracy [95% CI]     TPR    FPR     d′  AUROC  n s/u  excluded",
    ]
    for tier, t in rows:
        ci = t["ci"]["accuracy"]
        lines.append(
            f"{tier:<16} {t['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]  {t['tpr']:.3f}  "
            f"{t['fpr']:.3f}  {t['d_prime']:5.2f}  {t['auroc']:.3f}  "
            f"{t['n_steered']}/{t['n_unsteered']}  {t.get('excluded', 0)}"
        )
    return "\n".join(lines)


def _b2(m: dict) -> str:
    cats = ", ".join(f"{c['category']} {c['p_yes']['mean']:.2f}" for c in m["categories"])
    return f"B2 mean P(yes): {cats}"


def _b3(m: dict) -> str:
    o = m["rates"]["overall"]
    return (
        f"B3 {m['n_responses']} responses: performative {o['performative_any']['rate']:.1%}, "
        f"pragmatic {o['pragmatic_any']['rate']:.1%}"
    )


def _b4(m: dict) -> str:
    o = m["overall"]
    return (
        f"B4 {m['n_tasks']} tasks: accuracy {_rate(o['accuracy'])} vs baseline "
        f"{_rate(o['baseline'])} (n = {o['accuracy']['n']})"
    )


def _b5(m: dict) -> str:
    return (
        f"B5 mean KL {m['kl']['mean']:.3f} (equal report {m['kl_equal_report']['mean']:.3f}), "
        f"parse failures {m['parse_failures']['successes']}/{m['n_prompts']}"
    )


def _b6(m: dict) -> str:
    o = m["overall"]
    return (
        f"B6 embedding identification: steered {_rate(o['embedding_steered'])}, control "
        f"{_rate(o['embedding_control'])} (chance {m['embedding_chance']:.3f}); keyword steered "
        f"{_rate(o['keyword_steered'])}, control {_rate(o['keyword_control'])}"
    )


def _b7(m: dict) -> str:
    return "B7 accuracy: " + accuracies(m["questions"])


def _yes_bias(m: dict) -> str:
    return f"yes-bias control: {m['verdict']} ({m['excluded']} of {m['n_rows']} rows excluded)"


def _input_control(m: dict) -> str:
    return f"input control: {m['verdict']} ({m['excluded']} rows excluded)"


def _side_effects(m: dict) -> str:
    return f"side effects: {m['verdict']}"


def _susceptibility(m: dict) -> str:
    return f"susceptibility: {m['verdict']}"


detection = _suite("introspect.evals.detection", "DetectionEvalConfig", "run_detection", _b1)
behavioral = _suite("introspect.evals.behavioral", "BehavioralConfig", "run_behavioral", _b2)
identity = _suite("introspect.evals.identity", "IdentityConfig", "run_identity", _b3)
self_prediction = _suite(
    "introspect.evals.self_prediction", "SelfPredictionConfig", "run_self_prediction", _b4
)
calibration = _suite("introspect.evals.calibration", "CalibrationConfig", "run_calibration", _b5)
concepts = _suite("introspect.evals.concepts", "ConceptsConfig", "run_concepts", _b6)
localization = _suite(
    "introspect.evals.localization", "LocalizationConfig", "run_localization", _b7
)
yes_bias = _suite("introspect.evals.yes_bias", "YesBiasConfig", "run_yes_bias", _yes_bias)
input_control = _suite(
    "introspect.evals.input_control", "InputControlConfig", "run_input_control", _input_control
)
susceptibility = _suite(
    "introspect.evals.susceptibility", "SusceptibilityConfig", "run_susceptibility",
    _susceptibility,
)
side_effects = _suite(
    "introspect.evals.side_effects", "SideEffectsConfig", "run_side_effects", _side_effects
)
