"""Where a read-only trace runs: here (default), on NDIF, on another NDIF host, or simulated.

Every read-only entry point (`interventions.capture_acts`, `interventions.lens`, a gradient-free
`CompiledStep`, `interventions.token_logprobs` / `choice_logprobs`, and the evaluator built on
them, `unlearn.eval`) takes ``remote=``, spelled as nnsight spells it on ``model.trace``::

    capture_acts(model, ids, "blocks.{l}.hook_resid_post", layers="all")                # local
    capture_acts(model, ids, "blocks.{l}.hook_resid_post", layers="all", remote=True)   # NDIF
    capture_acts(model, ids, site, remote="https://my-ndif.example.org")               # a host
    capture_acts(model, ids, site, remote="local")    # serialize + deserialize, run here
    capture_acts(model, ids, site, remote=Remote(host=url, blocking=False, model_key=key))

NDIF rebuilds the model from its key (``model.to_model_key()``: a hub repo id and revision), so
``remote=True`` needs a model loaded by hub name (`unlearn.models.load_model("EleutherAI/...")`);
the API key comes from nnsight's config (``nnsight.CONFIG.set_default_api_key(...)``). A model
without a hub id can still run on a host that knows it, given ``Remote(model_key=...)``, and
``remote="local"`` works for any model.

Anything that needs a gradient (a graph step that trains, ``grad=True`` reads,
`unlearn.training.train`) runs only locally; asking for it remotely raises `RemoteTrainingError`.
Results come back detached, on the CPU, as NDIF returns them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from nnsight import Envoy
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.ndif import register
from nnsight.tracing.backend import Backend

__all__ = [
    "Execution",
    "Remote",
    "RemoteTrainingError",
    "as_remote",
    "make_backend",
    "require_local",
    "wait_for_result",
]

SIMULATE = "local"
"""The ``remote=`` string that asks for nnsight's local simulation rather than a host URL."""


SHIPPED_PACKAGES = ("interventions",)
"""Packages whose source travels with every remote request (they are not installed on NDIF)."""


class RemoteTrainingError(ValueError):
    """Training (anything that needs gradients) was asked to run remotely."""


@dataclass(frozen=True)
class Remote:
    """A non-local execution choice, with its options.

    ``Remote()`` is NDIF at nnsight's configured host; ``Remote(host=url)`` another host speaking
    NDIF's protocol; ``Remote(simulate=True)`` nnsight's local simulation (the trace is serialized
    and deserialized as NDIF would, with local modules hidden, then run on the local model).
    """

    host: str | None = None
    """Server URL (``http://`` or ``https://``); None for nnsight's ``CONFIG.API.HOST`` (NDIF)."""
    simulate: bool = False
    """Run nnsight's local simulation instead of contacting a host."""
    blocking: bool = True
    """Wait on a ``/subscribe`` websocket (NDIF's default); False submits, then polls over HTTP."""
    model_key: str | None = None
    """Override for ``model.to_model_key()``, for models the host knows by another name. It names
    every model of a step, so a step over two such models needs two calls (or hub-loaded models)."""
    poll_interval: float = 0.05
    """Seconds between polls when not blocking."""
    timeout: float = 600.0
    """Seconds to wait for a non-blocking job before giving up."""

    def __post_init__(self) -> None:
        if self.simulate and self.host is not None:
            raise ValueError("Remote(simulate=True) runs locally; drop host= or simulate=.")
        if self.host is not None and not self.host.startswith(("http://", "https://")):
            raise ValueError(f"host must start with http:// or https://, got {self.host!r}.")
        if self.poll_interval <= 0 or self.timeout <= 0:
            raise ValueError("poll_interval and timeout must be positive.")


Execution = bool | str | Remote | None
"""What ``remote=`` accepts: False/None (local), True (NDIF), ``"local"`` (simulation), a host
URL, or a `Remote`."""


def as_remote(remote: Execution) -> Remote | None:
    """Normalize a ``remote=`` argument: None for a plain local run, else a `Remote`.

    Raises:
        ValueError: A string that is neither ``"local"`` nor an http(s) URL.
        TypeError: Anything else that is not an `Execution`.
    """
    if remote is None or remote is False:
        return None
    if remote is True:
        return Remote()
    if isinstance(remote, Remote):
        return remote
    if isinstance(remote, str):
        return Remote(simulate=True) if remote == SIMULATE else Remote(host=remote)
    raise TypeError(f"remote= takes a bool, 'local', a host URL or a Remote; got {remote!r}.")


def require_local(remote: Execution, what: str) -> None:
    """Raise `RemoteTrainingError` if ``remote`` asks for a non-local run of ``what``.

    Args:
        remote: The caller's ``remote=`` argument.
        what: What needs gradients, for the message (e.g. "a step that trains").
    """
    if as_remote(remote) is not None:
        raise RemoteTrainingError(
            f"{what} needs gradients, and training cannot run remotely: NDIF (and nnsight's "
            "remote backends) only return saved values, never gradients or updated weights. "
            "Run it locally (remote=False); remote runs are for read-only analysis."
        )


class _Persistent:
    """Stands in for a `Remotable` wrapper where only the persistent-object map is needed."""

    def __init__(self, envoy: Envoy) -> None:
        self.envoy = envoy

    def _remoteable_persistent_objects(self) -> dict[str, Any]:
        objects: dict[str, Any] = {"Interleaver": self.envoy.interleaver}
        for envoy in self.envoy.modules():
            objects[f"Module:{envoy.path}"] = envoy._module
        return objects


def make_backend(envoy: Envoy, remote: Remote) -> Backend:
    """The nnsight backend that runs a trace of ``envoy`` as ``remote`` asks.

    Our own packages ship by value, as a server has neither installed: the trace body refers to
    `interventions` classes (and the simulation then checks that, too).

    Raises:
        ValueError: A host run of a model with no model key (not loaded by hub name) and no
            ``Remote(model_key=...)``.
    """
    for package in SHIPPED_PACKAGES:
        register(package)
    if remote.simulate:
        target = envoy if hasattr(envoy, "_remoteable_persistent_objects") else _Persistent(envoy)
        return LocalSimulationBackend(target)
    key = remote.model_key
    if key is None:
        try:
            key = envoy.to_model_key()
        except Exception as error:
            raise ValueError(
                "A remote run names the model by its hub id, and this model has none (it was "
                "not loaded by hub name, e.g. load_model('EleutherAI/pythia-70m')). Load it by "
                "name, pass Remote(model_key=...), or use remote='local'."
            ) from error
    env = envoy._remoteable_get_env() if hasattr(envoy, "_remoteable_get_env") else {}
    return RemoteBackend(key, host=remote.host, env=env, blocking=remote.blocking)


class CapturingBackend(Backend):
    """Wraps a backend to keep what it returns (a remote run's saved values)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.result: Any = None

    def __call__(self, tracer: Any) -> Any:
        self.result = self.inner(tracer)
        return self.result


def wait_for_result(backend: CapturingBackend, remote: Remote) -> dict[str, Any] | None:
    """The saved values of a finished trace: returned (blocking), polled for, or None (simulated).

    Raises:
        TimeoutError: A non-blocking job did not finish within ``remote.timeout``.
        nnsight.intervention.backends.remote.RemoteError: The job failed on the server.
    """
    if remote.simulate:
        return None  # the simulation runs in this process, like a local trace
    result = backend.result
    if remote.blocking:
        return result
    deadline = time.monotonic() + remote.timeout
    while result is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"The remote job did not finish within {remote.timeout} s.")
        time.sleep(remote.poll_interval)
        result = backend.inner()
    return result
