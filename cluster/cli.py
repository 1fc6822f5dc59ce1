"""The ``introspect`` command line.

Recipe commands (``vectors``, ``data``, ``train``, ``eval detection``, ...) are generated from
their recipes' configs (:mod:`cluster.commands`): every field is a flag with its help text and
default, ``--config FILE.yaml`` and ``--set key=value`` work everywhere, and a value a plan
would refuse is refused the same way here. Engine commands (``run``, ``submit``, ``status``,
``report``) are in :mod:`cluster.engine`.

Bad input raises IntrospectError deep down; :func:`main` turns it, and any usage error, into
one ``error:`` line on stderr and exit code 2. A training that diverges exits with code 3.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import click

from cluster import engine
from cluster.commands import LazyGroup, recipe_command
from introspect.errors import IntrospectError
from pipelines.recipes import EVAL_SUITES, RECIPES


def _cmd(name: str, recipe_name: str, **kw):
    return (RECIPES[recipe_name].help, partial(recipe_command, name, recipe_name, **kw))


_EVAL = {"engine": (engine.HOSTS, engine.ADDRESS), "prepare": engine.hosts_mapper}

vectors = LazyGroup(
    "vectors",
    help="Make steering vector sets.",
    lazy={
        "random": _cmd(
            "random", "vectors", fixed={"type": "random"},
            hide=("layer", "concepts", "batch_size", "dtype"),
        ),
        "concepts": _cmd("concepts", "vectors", fixed={"type": "concepts"}),
        "matched": _cmd("matched", "vectors", fixed={"type": "matched"}),
        "contrast": _cmd("contrast", "vectors", fixed={"type": "contrast"}),
    },
)  # fmt: skip
evals = LazyGroup(
    "eval",
    help="Evaluation suites B1-B7 and the controls.",
    lazy={s: _cmd(s, f"eval.{s}", **_EVAL) for s in EVAL_SUITES},
)
stance = LazyGroup(
    "stance",
    help="Epistemic-stance track.",
    lazy={
        "train": _cmd("train", "stance.train", arguments=("kind",)),
        "weights": _cmd("weights", "stance.weights"),
        "compare": _cmd("compare", "stance.compare"),
        "patterns": _cmd("patterns", "stance.patterns"),
    },
)
app = LazyGroup(
    "introspect",
    help="A lab for training and measuring introspection in language models.",
    lazy={
        "norms": _cmd("norms", "norms"),
        "data": _cmd("data", "data"),
        "score": _cmd("score", "score"),
        "baseline": _cmd("baseline", "baseline"),
        "train": _cmd("train", "train"),
        "sweep": _cmd(
            "sweep", "sweep",
            aliases={"lora_r": ("--ranks",), "lr": ("--lrs",), "use_gpu": ("--gpu",)},
            engine=(engine.ADDRESS,), prepare=engine.connected,
        ),
        "train-localization": _cmd("train-localization", "localize"),
        "export": _cmd("export", "export", arguments=("run",)),
    },
    commands=[vectors, evals, stance, engine.run, engine.check, engine.report, engine.submit,
              engine.status],
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one ``error:`` line and exit 2 on bad input, 3 on divergence."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app.main(args=argv, prog_name="introspect", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help())
    except (click.exceptions.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except IntrospectError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if type(e).__name__ == "TrainingDiverged":
            print(f"error: {e}", file=sys.stderr)
            sys.exit(3)
        raise


if __name__ == "__main__":
    main()
