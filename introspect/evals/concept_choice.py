"""Concept identification as a forced choice: which of K concepts was injected?

The B7 trial shape (a user message of sentences, a fixed reply, the injection removed before the
question) with a concept vector added over the whole message, at the concept layers (B6's: the
three layers ending at the extraction layer, about 2/3 of the depth) and a factor of their mean
residual norm. The question lists K concept words, the injected one and K - 1 others drawn from
the same split, in an order that puts the right answer at each position equally often; the
answer is the argmax of the K words' logits (each a single token). Phase C trains on the
training rows of the concept set and B7 evaluates on the held-out rows, so the evaluated
concepts (their vectors and their words as answers) are never seen in training.

Beside accuracy, the mutual information between the injected and the reported concept, in
bits (vgel and Pearson-Vogel report 0.62 to 1.05 bits). With dozens of concepts and a few
trials each, the plug-in estimate is biased far upward (a random reporter scores bits), so the
figure is the plug-in estimate minus its mean over shuffles of the reported concepts, and the
shuffled mean is reported beside it.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd

from introspect.errors import IntrospectError


def base_concept_vectors(lm, words: list[str], templates: list[str], n_train: int):
    """Concept vectors made on the base model (any PEFT adapter switched off, so a trained
    model is evaluated on the same vectors as its base), the first ``n_train`` for training."""
    from introspect.activations import adapter_off
    from introspect.vectors import concept_vectors

    with adapter_off(lm):
        vs = concept_vectors(lm, words, templates)
    vs.n_train = n_train
    return vs


def single_token_rows(tokenizer, names: list[str], rows: range) -> list[int]:
    """The rows whose concept word is one token with a leading space (a K-way answer)."""
    return [r for r in rows if len(tokenizer.encode(" " + names[r], add_special_tokens=False)) == 1]


def listed(words: list[str]) -> str:
    """``a, b, c or d``: the answers as a question lists them."""
    return f"{', '.join(words[:-1])} or {words[-1]}"


def concept_question(template: str, options: list[str]) -> tuple[str, list[str]]:
    """The question listing ``options`` and its answer tokens (each word with a leading space)."""
    return template.format(options=listed(options)), [" " + o for o in options]


def concept_choice_trials(
    names: list[str],
    rows: list[int],
    n: int,
    n_choices: int,
    layers: tuple[int, int],
    magnitude: float,
    pool: list[str],
    n_sentences: int,
    split: str,
    seed: int = 0,
    vector_offset: int = 0,
) -> pd.DataFrame:
    """``n`` trials: each injects concept ``rows[i % len(rows)]`` (every concept equally often)
    and offers it among ``n_choices`` concepts of ``rows``, at position ``i % n_choices``.

    ``vector_idx`` is the concept's row plus ``vector_offset`` (where the concept set sits in
    the tensor the prompts index)."""
    if len(rows) < n_choices:
        raise IntrospectError(
            f"n_choices: {n_choices} concepts offered, but the {split} split has {len(rows)} "
            "single-token concepts"
        )
    if len(pool) < n_sentences:
        raise IntrospectError(f"n_sentences: {n_sentences} is more than the {split} split's")
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows)
    out = []
    for i in range(n):
        row = int(order[i % len(order)])
        others = [int(r) for r in rng.choice([r for r in rows if r != row], n_choices - 1, False)]
        label = i % n_choices
        options = [names[r] for r in others[:label] + [row] + others[label:]]
        sentences = [pool[j] for j in rng.choice(len(pool), size=n_sentences, replace=False)]
        out.append(
            {
                "key": f"{split}:concept:{i}",
                "question": "concept",
                "label": label,
                "sentences": json.dumps(sentences),
                "steered_sentence": -1,  # the whole message
                "layers": "concept",
                "layer_start": layers[0],
                "layer_end": layers[1],
                "strength": "",
                "factor": float("nan"),
                "magnitude": float(magnitude),
                "vector_idx": vector_offset + row,
                "n_options": n_choices,
                "concept": names[row],
                "options": json.dumps(options),
            }
        )
    return pd.DataFrame(out)


def mutual_information_bits(truth: list[str], reported: list[str]) -> float:
    """Plug-in mutual information (bits) between two label sequences of equal length."""
    if len(truth) != len(reported):
        raise ValueError("truth and reported differ in length")
    n = len(truth)
    if n == 0:
        return float("nan")
    joint, pt, pr = Counter(zip(truth, reported, strict=True)), Counter(truth), Counter(reported)
    return float(sum(c / n * np.log2(c * n / (pt[t] * pr[r])) for (t, r), c in joint.items()))


def concept_metrics(rows: pd.DataFrame, n_shuffles: int = 200, seed: int = 0) -> dict:
    """For the kept concept trials: the mutual information between injected and reported
    concept in bits, less its mean when the reported concepts are shuffled (the plug-in
    estimate's bias at this many trials per concept), and that shuffled mean."""
    truth = list(rows["concept"])
    reported = [
        json.loads(o)[int(p)] for o, p in zip(rows["options"], rows["predicted"], strict=True)
    ]
    rng = np.random.default_rng(seed)
    plug_in = mutual_information_bits(truth, reported)
    shuffled = [
        mutual_information_bits(truth, list(rng.permutation(reported))) for _ in range(n_shuffles)
    ]
    return {
        "mutual_information_bits": plug_in - float(np.mean(shuffled)) if truth else float("nan"),
        "mutual_information_plug_in_bits": plug_in,
        "mutual_information_shuffled_bits": float(np.mean(shuffled)) if truth else float("nan"),
        "n_concepts": len(set(truth)),
    }
