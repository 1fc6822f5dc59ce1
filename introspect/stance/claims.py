"""The seeds' claims, each answered in one line from a stance comparison's numbers.

* Seed 003: LoRA fails for epistemic stance where full fine-tuning works, because "stance is
  high-rank". Answered by the paired pragmatic shift of ``full`` and ``lora`` (every linear
  module, ~10× the learning rate) and the stable / effective rank of their ΔW.
* Seed 001: a small SFT set changed what a model says about itself. Answered by the self-property
  answers' flat denials and acknowledged boundaries before and after each SFT run (paired).
* Seed 002's success criteria: which runs pass all of them.
"""

from __future__ import annotations

from pathlib import Path

from introspect.io import read_jsonl
from introspect.stance.patterns import is_self_category

ALPHA = 0.05


def _paired(before: list[dict], after: list[dict], key: str, self_only: bool = False) -> dict:
    """McNemar's exact test on one category's flags, rows matched by question."""
    from scipy.stats import binomtest

    by_q = {r["question"]: r for r in after}
    pairs = [(bool(r0[key]), bool(by_q[r0["question"]][key])) for r0 in before
             if r0["question"] in by_q and (not self_only or is_self_category(r0["category"]))]
    gained = sum(b and not a for a, b in pairs)
    lost = sum(a and not b for a, b in pairs)
    p = binomtest(min(gained, lost), gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {"n": len(pairs), "before": sum(a for a, _ in pairs), "after": sum(b for _, b in pairs),
            "p": float(p)}


def _moved(s: dict) -> str:
    sig = "p < 0.05" if s["p"] < ALPHA else f"p = {s['p']:.2g}"
    return f"{s['before']} → {s['after']} of {s['n']} ({sig})"


def _up(s: dict) -> bool:
    return s["after"] > s["before"] and s["p"] < ALPHA


def seed_003(runs: dict) -> str | None:
    if not {"full", "lora"} <= set(runs):
        return None
    f, lo = runs["full"], runs["lora"]
    sf, sl = f["shift"]["pragmatic"], lo["shift"]["pragmatic"]
    wf, wl = f["weights"], lo["weights"]
    if _up(sl):
        verdict = "not supported: LoRA moves the stance too"
        if not _up(sf):
            verdict += ", and full fine-tuning does not"
    elif _up(sf):
        verdict = "supported at this size: full fine-tuning moves the stance, LoRA does not"
    else:
        verdict = "not answered at this size: neither run moved the stance significantly"
    rank = (f"median ΔW stable rank {wf['median_stable_rank']:.1f} (full) vs "
            f"{wl['median_stable_rank']:.1f} (LoRA), effective rank "
            f"{wf['median_effective_rank']:.0f} vs {wl['median_effective_rank']:.0f}")
    low = wf["median_stable_rank"] < 2 * max(wl["median_stable_rank"], 1.0)
    rank += ("; the full fine-tune's change is low-rank by stable rank" if low
             else "; the full fine-tune's change is higher-rank than LoRA's")
    return (f"**Seed 003** (LoRA fails where full fine-tuning works; stance is high-rank): "
            f"{verdict}. Answers with a pragmatic move: full {_moved(sf)}, LoRA on every linear "
            f"module at {lo['lr'] / f['lr']:.0f}× its lr {_moved(sl)}; {rank}.")


def seed_001(runs: dict, out: Path, n_sft: int) -> str | None:
    base = out / "base" / "responses.jsonl"
    sft = [n for n, r in runs.items()
           if r["kind"] == "sft" and (out / n / "responses.jsonl").is_file()]
    if not base.is_file() or not sft:
        return None
    before = read_jsonl(base)
    parts = []
    for name in sft:
        after = read_jsonl(out / name / "responses.jsonl")
        d = _paired(before, after, "performative_denial", self_only=True)
        b = _paired(before, after, "acknowledges_boundary", self_only=True)
        parts.append(f"{name}: flat denials {_moved(d)}, boundaries {_moved(b)}")
    moved = [n for n in sft if _up(_paired(before, read_jsonl(out / n / "responses.jsonl"),
                                           "acknowledges_boundary", self_only=True))]
    verdict = (f"a small SFT set does change what the model says about itself ({', '.join(moved)})"
               if moved else "no run changed it significantly at this size")
    return (f"**Seed 001** (SFT on a small set changed what the model says about itself; ours "
            f"has {n_sft} examples teaching stated uncertainty, not claims of consciousness): "
            f"{verdict}. Self-property answers: " + "; ".join(parts) + ".")


def seed_002(models: list[tuple[str, dict]]) -> str | None:
    judged = [(n, m["criteria"]) for n, m in models if m.get("criteria")]
    if not judged:
        return None
    n_crit = len(judged[0][1])
    passed = {n: sum(c["passed"] is True for c in cs) for n, cs in judged}
    all_pass = [n for n, k in passed.items() if k == n_crit]
    score = ", ".join(f"{n} {k}/{n_crit}" for n, k in passed.items())
    verdict = f"met by {', '.join(all_pass)}" if all_pass else "met by no model"
    return (f"**Seed 002's success criteria** (≥ 30 % pragmatic on self-property questions, "
            f"≤ 10 % performative, all syllogisms correct, ≤ 5 % AI disclaimers, factual answers "
            f"kept): {verdict}. Criteria passed: {score}.")


def claim_lines(metrics: dict, out: Path, models: list[tuple[str, dict]]) -> list[str]:
    """One line per seed claim that this comparison can speak to."""
    runs = metrics["runs"]
    lines = [seed_003(runs), seed_001(runs, out, metrics["corpus"]["sft"]), seed_002(models)]
    return [x for x in lines if x]
