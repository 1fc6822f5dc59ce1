"""Connecting to Ray: a private local instance by default, or a cluster by address.

``None`` or ``"local"`` starts a fresh local Ray sized to this machine (never an unrelated
cluster that happens to run here); ``"auto"`` joins the cluster this machine belongs to (what a
job submitted to a `ray up` cluster uses); ``ray://HOST:PORT`` connects a Ray client. Ray's
token authentication stays on: the token is read from where Ray keeps it (``RAY_AUTH_TOKEN`` or
the token file Ray's own CLI manages), never from our configs or logs.
"""

from __future__ import annotations

import logging
import os

from introspect.errors import IntrospectError


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Initialise Ray once for this process; returns a description of what it joined."""
    import ray

    if ray.is_initialized():
        return "already connected"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if address in (None, "", "local"):
        # The dashboard (on loopback only) serves Ray's state API, which Train V2's placement-
        # group cleaner polls: without it, a Tune trial stopped early (ASHA) leaks its workers'
        # reservation and the next trial waits forever. Its address goes to every worker so the
        # cleaner never guesses among other Ray instances running on the same machine.
        port = _free_loopback_port()
        local_train_defaults()
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        return f"local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    if not (address == "auto" or address.startswith("ray://") or ":" in address):
        raise IntrospectError(
            f"address: {address!r} must be 'local', 'auto', HOST:PORT or ray://HOST:PORT"
        )
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IntrospectError(f"address: cannot connect to Ray at {address!r} ({first})") from None
    res = ray.cluster_resources()
    return f"Ray at {address} ({int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs)"


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray Train settings for a Ray that lives on this machine only, where nothing is preempted and
# a stage's training is short: no preemption watcher (one more Python process, ~2 s of CPU, for
# every training), and the controller notices a finished worker group within 0.5 s, not 2 s.
# Set in the environment before Ray starts, so the drivers Tune starts inherit them too.
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def local_train_defaults() -> None:
    """Apply :data:`LOCAL_TRAIN_ENV` where the user has not set those variables."""
    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
