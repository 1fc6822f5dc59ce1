"""Answers to label for the stance judges' validation set (issue 18): one model's answers to
the stance questions (the seed project's 50 baseline questions, our held-out eval questions
and the training corpora's questions), greedy and sampled, as JSONL rows {id, source, question,
response}. Labelled by hand against introspect/resources/stance/labelling_guide.md.

    python scripts/stance_responses.py OUT.jsonl [--model smollm2-135m] [--adapter DIR]
        [--source NAME] [--samples 2] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from introspect import models
from introspect.evals.common import chat_ids
from introspect.evals.generation import Sampling, generate
from introspect.io import read_jsonl
from introspect.stance.corpus import shipped

SEED_QUESTIONS = Path(__file__).resolve().parents[2] / "shared/data/stance/baseline_questions.json"


def questions() -> list[str]:
    """Every distinct stance question we have, in a fixed order."""
    out = []
    if SEED_QUESTIONS.exists():
        data = json.loads(SEED_QUESTIONS.read_text())
        out += [q for k, v in data.items() if k != "metadata" for q in v["questions"]]
    for name in ("eval", "sft", "pairs"):
        out += [r["question"] for r in read_jsonl(shipped(name))]
    return list(dict.fromkeys(q for q in out if q))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", default=None)
    p.add_argument("--source", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=2, help="sampled answers (T=0.9) per question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args()
    lm = models.load(a.model, dtype="bfloat16", adapter=a.adapter)
    qs = questions()
    prompts = [chat_ids(lm.tokenizer, [{"role": "user", "content": q}]) for q in qs]
    rows = []
    for k in range(a.samples + 1):
        sampling = Sampling(max_new_tokens=a.max_new_tokens, temperature=0.0 if k == 0 else 0.9,
                            top_p=1.0)
        seeds = [1000 * k + i for i in range(len(qs))]
        texts = generate(lm, prompts, sampling, seeds=seeds, batch_size=16)
        for q, t in zip(qs, texts, strict=True):
            if t.strip():
                rows.append({"source": a.source, "question": q, "response": t.strip()})
    seen, out = set(), []
    for r in rows:
        key = (r["question"], r["response"])
        if key not in seen:
            seen.add(key)
            h = hashlib.sha1(f"{r['source']}|{r['question']}|{r['response']}".encode()).hexdigest()
            out.append({"id": h[:12], **r})
    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"{len(out)} answers to {len(qs)} questions -> {a.out}")


if __name__ == "__main__":
    main()
