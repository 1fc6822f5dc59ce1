"""Build the stance judges' labelled set, fit the MiniLM judge on its dev half, and write the
validation table (issue 18). Labels come from annotators who saw only
introspect/resources/stance/labelling_guide.md and the answers.

    python scripts/stance_judges.py merge ITEMS.jsonl... --labels LABELS.jsonl...
        # -> introspect/resources/stance/labelled.jsonl (split by question: a question's
        #    answers are all dev or all held-out)
    python scripts/stance_judges.py fit        # dev half -> resources/stance/minilm_judge.json
    python scripts/stance_judges.py validate   # -> resources/stance/judges_validation.json + table
"""

from __future__ import annotations

import argparse
import hashlib
import json

from introspect.stance import judges as J


def split_of(question: str) -> str:
    """dev or heldout, by a hash of the normalised question (half each, fixed)."""
    key = " ".join(question.lower().split())
    return "heldout" if int(hashlib.sha1(key.encode()).hexdigest(), 16) % 2 else "dev"


def merge(items: list[str], labels: list[str]) -> None:
    rows = {}
    for path in items:
        for line in open(path):
            r = json.loads(line)
            rows[r["id"]] = r
    out = []
    for path in labels:
        for line in open(path):
            lab = json.loads(line)
            r = rows[lab["id"]]
            out.append({"id": r["id"], "source": r["source"], "question": r["question"],
                        "response": r["response"], "split": split_of(r["question"]),
                        "labels": {c: int(lab["labels"][c]) for c in J.CATEGORIES},
                        "labeller": lab.get("labeller", path.rsplit("/", 1)[-1].split(".")[0]),
                        **({"note": lab["note"]} if lab.get("note") else {})})
    out.sort(key=lambda r: (r["split"], r["id"]))
    J.LABELLED.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    n_dev = sum(r["split"] == "dev" for r in out)
    print(f"{len(out)} labelled answers ({n_dev} dev, {len(out) - n_dev} held-out) -> {J.LABELLED}")


def fit() -> None:
    dev = [r for r in J.read_labelled() if r["split"] == "dev"]
    model = J.fit_minilm([r["response"] for r in dev], J.label_matrix(dev))
    J.MINILM_JUDGE.write_text(json.dumps(model) + "\n")
    for c, m in model["categories"].items():
        print(f"{c:24s} C={m['C']:<5g} dev CV F1 {m['cv_f1']:.3f}")


def table(v: dict) -> str:
    def f1(r: dict) -> str:
        lo, hi = r["f1_ci"]
        return f"{r['f1']:.2f} [{lo:.2f}, {hi:.2f}]"

    def pr(r: dict) -> str:
        return f"{r['precision']:.2f} / {r['recall']:.2f}"

    lines = ["| category | held-out positives | regex F1 [95% CI] | regex P / R | MiniLM F1 "
             "[95% CI] | MiniLM P / R | κ(regex, MiniLM) | chosen (on dev) | goal F1 ≥ 0.85 |",
             "|---|---:|---|---|---|---|---:|---|---|"]
    for c, r in v["categories"].items():
        goal = {True: "met", False: "missed", None: f"n/a (< {v['min_positives']} positives)"}
        k = "–" if r["kappa"] is None else f"{r['kappa']:.2f}"
        lines.append(f"| {c} | {r['positives']} | {f1(r['regex'])} | {pr(r['regex'])} | "
                     f"{f1(r['minilm'])} | {pr(r['minilm'])} | {k} | {r['chosen']} | "
                     f"{goal[r['goal_met']]} |")
    return "\n".join(lines) + "\n"


def validate() -> None:
    v = J.validate()
    (J.RESOURCES / "judges_validation.json").write_text(json.dumps(v, indent=1) + "\n")
    print(f"dev {v['n_dev']}, held-out {v['n_heldout']} answers")
    print(table(v))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("items", nargs="+")
    m.add_argument("--labels", nargs="+", required=True)
    sub.add_parser("fit")
    sub.add_parser("validate")
    a = p.parse_args()
    if a.cmd == "merge":
        merge(a.items, a.labels)
    elif a.cmd == "fit":
        fit()
    else:
        validate()


if __name__ == "__main__":
    main()
