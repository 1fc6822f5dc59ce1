"""Are the steered sentence's tokens visible in the base model's residual stream?

A diagnostic behind issue 16's sentence question: B7's sentence trials (ten sentences, one
steered) are read by the base model with the steering on, and each decoder layer's outputs at
every prefix token are kept. A logistic-regression probe per layer, fitted on trials drawn from
the training sentences and vector rows, scores each token "steered or not"; on trials drawn
from the held-out sentences and vectors it reports the token AUROC and how often the sentence
holding the highest-scoring token is the steered one (chance 1/10). One direction for all
held-out vectors: a high rate says the model itself marks steered tokens in a way a readout can
find, so a trained model at chance fails in the readout, not the signal.

Usage: python benchmarks/probe_steered_tokens.py --out OUT.json [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from introspect.activations import base_residual_norms
from introspect.detection import DetectionExample, collate, position_mask, steered_cache
from introspect.evals.common import read_resource
from introspect.evals.localization import (
    context_text,
    default_vectors,
    localization_prompts,
    localization_trials,
    norm_contexts,
    sentence_positions,
)
from introspect.models import decoder_layers
from introspect.runs import load_evaluated


@torch.no_grad()
def token_states(lm, trials, vectors, texts, layers: list[int]):
    """Per trial: ``{layer: [T, d]}`` unit-normalised layer outputs of the prefix, the 0/1
    steered mask, and every sentence's token slice."""
    prompts = localization_prompts(lm.tokenizer, trials, vectors, texts)
    blocks = decoder_layers(lm.model)
    out = []
    for start in range(0, len(prompts), 8):
        batch = collate(prompts[start : start + 8], 0)
        mask = position_mask(batch.steerings, batch.prefix_lens.tolist(), batch.prefix_ids.shape[1])
        grabbed: list[torch.Tensor] = []

        def grab(_module, _inputs, output, grabbed=grabbed):
            grabbed.append(output[0] if isinstance(output, tuple) else output)

        # registered before the steering's hooks: each layer's output as it was before the
        # injection is added at that layer
        hooks = [blocks[i].register_forward_hook(grab) for i in layers]
        try:
            steered_cache(lm.model, batch)
        finally:
            for h in hooks:
                h.remove()
        for b in range(len(batch.steerings)):
            real = batch.prefix_mask[b].bool()
            states = {}
            for layer, g in zip(layers, grabbed, strict=True):
                x = g[b][real].float().numpy()
                states[layer] = x / np.linalg.norm(x, axis=1, keepdims=True)
            out.append((states, mask[b][real].numpy()))
    spans = []
    for r in trials.itertuples():
        sentences = json.loads(r.sentences)
        ex = DetectionExample(context_text(sentences, r.marks), texts["reply"], "?")
        spans.append([sentence_positions(lm.tokenizer, ex, sentences, k, r.marks, r.steer_marks)
                      for k in range(len(sentences))])  # fmt: skip
    return out, spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-train", type=int, default=150, help="training trials per range")
    parser.add_argument("--n-eval", type=int, default=100, help="held-out trials per range")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(0)
    lm = load_evaluated(args.model, None, "float32")
    texts = read_resource("localization.json")
    norms = base_residual_norms(lm, prompts=norm_contexts(texts))
    vs = default_vectors(lm.d_model, None, args.model)
    layers = sorted({round(f * (lm.n_layers - 1)) for f in (0.15, 0.35, 0.5, 0.65, 0.85, 1.0)})
    result: dict = {"model": args.model, "layers": layers, "chance_sentence": 0.1, "ranges": {}}
    for name in ("early", "middle", "late"):

        def trials(split: str, n: int, seed: int, name=name):
            rows = range(vs.n_train) if split == "train" else range(vs.n_train, len(vs.vectors))
            return localization_trials(
                lm.n_layers, norms, rows, n, split, ["sentence"], None, seed, texts, 10,
                allowed_ranges=[name],
            )

        train, _ = token_states(lm, trials("train", args.n_train, 0), vs.vectors, texts, layers)
        evaluated = trials("eval", args.n_eval, 1)
        held, spans = token_states(lm, evaluated, vs.vectors, texts, layers)
        labels = evaluated["label"].to_numpy()
        per_layer = {}
        for layer in layers:
            x = np.concatenate([s[layer] for s, _ in train])
            y = np.concatenate([m for _, m in train])
            probe = LogisticRegression(max_iter=300, class_weight="balanced").fit(x, y)
            scores = [probe.decision_function(s[layer]) for s, _ in held]
            found = [int(np.argmax([sc[a:b].max() for a, b in sp]) == lab)
                     for sc, sp, lab in zip(scores, spans, labels, strict=True)]  # fmt: skip
            per_layer[layer] = {
                "token_auroc": float(roc_auc_score(np.concatenate([m for _, m in held]),
                                                   np.concatenate(scores))),  # fmt: skip
                "sentence_accuracy": float(np.mean(found)),
            }
            print(name, layer, per_layer[layer], flush=True)
        result["ranges"][name] = per_layer
    result["seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
