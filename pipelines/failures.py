"""What went wrong in a Ray task or training run, in one line, and whether a retry can help.

A stage whose worker process, or the node under it, went away (a box lost mid-plan, a worker
killed) ends with one of Ray's lost-worker errors, possibly wrapped by Ray Train. Those are worth
a retry from the last checkpoint. Anything else (a config error, a non-finite loss, a bug) would
fail the same way again, so it stops at once.
"""

from __future__ import annotations

import re

import ray

from introspect.errors import IntrospectError

# Ray's errors for a lost worker or node (seen behind Ray Train's error: ActorDiedError).
LOST = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.RayActorError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.ObjectLostError,
)
# "module.SomeError: message", the line of a formatted traceback that names the error.
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.*)$")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def cause(e: BaseException) -> BaseException:
    """The error behind Ray's and Ray Train's wrappers: a task's own error, a training run's
    first worker failure, or its controller's failure."""
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    for _ in range(8):  # they nest a few deep at most
        if isinstance(e, ray.exceptions.RayTaskError) and getattr(e, "cause", None) is not None:
            e = e.cause
        elif isinstance(e, WorkerGroupError) and e.worker_failures:
            e = e.worker_failures[min(e.worker_failures)]
        elif isinstance(e, ControllerError) and e.controller_failure is not None:
            e = e.controller_failure
        elif isinstance(getattr(e, "_base_exc", None), BaseException):  # a Train worker's error
            e = e._base_exc
        elif isinstance(getattr(e, "health_check_failure", None), BaseException):
            e = e.health_check_failure  # a Train worker that stopped answering: why
        else:
            break
    return e


def _named(e: BaseException) -> tuple[str, str]:
    """The cause's type name and first line (an unpicklable error's from its traceback)."""
    name = type(e).__name__
    text = _COLOUR.sub("", str(e)).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(e, ray.exceptions.UnserializableException):
        # Ray's notice, then the original traceback: name the error that traceback ends with.
        trace = _COLOUR.sub("", getattr(e, "_original_stack_trace", "")).splitlines()
        named = [m for m in map(_ERROR_LINE.match, reversed(trace)) if m]
        if named:
            name, line = named[0].group(1), named[0].group(2).strip()
    return name, line


def is_lost(e: BaseException) -> bool:
    """Whether ``e`` means a worker or node went away (worth a retry), not a failure of ours.

    A training run is lost when any of its workers was: when one rank dies the others fail with
    collateral errors (a collective aborted, a connection reset), whatever their rank.
    """
    from ray.train.v2.api.exceptions import WorkerGroupError

    if isinstance(e, WorkerGroupError) and e.worker_failures:
        return any(_lost(cause(w)) for w in e.worker_failures.values())
    return _lost(cause(e))


def _lost(c: BaseException) -> bool:
    return isinstance(c, LOST) or _named(c)[0] in _names(LOST) | {"WorkerHealthCheckTimeoutError"}


def failure_line(e: BaseException) -> str:
    """One line for a failed unit: an IntrospectError as is, anything else with its type; a lost
    worker or node says so and how to go on."""
    c = cause(e)
    name, line = _named(c)
    if isinstance(c, IntrospectError):
        return line
    if _lost(c):
        return (
            f"{name}: {line} (a Ray worker or node this stage used was lost; run the plan "
            "again: finished stages are skipped)"
        )
    return f"{name}: {line}"


def _names(types: tuple[type, ...]) -> set[str]:
    """The names of these classes and of all their subclasses (ActorDiedError, ...)."""
    names, todo = set(), list(types)
    while todo:
        t = todo.pop()
        if t.__name__ not in names:
            names.add(t.__name__)
            todo.extend(t.__subclasses__())
    return names
