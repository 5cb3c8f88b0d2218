"""Where a comparison's batches are computed: this process, or Ray actors on many GPUs/nodes.

The run directory is a journal of batches (:mod:`vitxai.store`), and a batch is the unit
that distributes. With ``engine="ray"`` each worker is a Ray actor that loads the model once
(from the run's recorded :class:`~vitxai.source.RunSource`) and computes whole batches —
methods, masks, rows, maps — and returns a :class:`~vitxai.compare.BatchPayload`; the driver
alone commits payloads, in batch order, through the same journal as a local run. Resume, the
lock and the fingerprint therefore behave exactly as locally, batches already committed are
never recomputed, and results do not depend on the engine (randomness is per image).

Faults: a worker that dies mid-batch (``ray.kill``, a crashed process, a lost node) is
replaced and its batch computed again by another worker (up to ``max_attempts`` times); a
killed driver is resumed by rerunning the command; a worker short of GPU memory backs its
batch off inside the methods exactly as a local run does.

Data: by default each worker reads (or, for the synthetic benchmark, generates) its images
itself, which needs ``--data`` on a path every node sees; ``ship_images=True`` makes the
driver decode each batch and send the tensors through Ray's object store (``--data`` local to
the driver only).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitxai.compare import BatchPayload, CompareSettings

ENGINES = ("local", "ray")
RAY_EXTRA = 'pip install -e ".[ray]"'


@dataclass(frozen=True)
class EngineSettings:
    """How a comparison's batches are computed.

    Attributes:
        name: "local" (this process) or "ray".
        address: None starts a local Ray instance; "auto" or "ray://HOST:PORT" joins a
            cluster.
        workers: Ray actors, each with its own copy of the model.
        gpus_per_worker: GPUs per actor (0: CPU workers); a worker with a GPU runs on
            "cuda" whatever the run's device says.
        cpus_per_worker: CPU cores per actor (its torch threads).
        ship_images: the driver decodes batches and ships tensors (data local to the driver)
            instead of each worker reading the data path itself.
        max_attempts: tries per batch before the run fails (worker deaths).
    """

    name: str = "local"
    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1
    ship_images: bool = False
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"engine={self.name!r} must be one of {', '.join(ENGINES)}")
        if self.workers < 1 or self.cpus_per_worker < 1 or self.max_attempts < 1:
            raise ValueError("workers, cpus_per_worker and max_attempts must be ≥ 1")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker} must be ≥ 0")


def require_ray() -> Any:
    """The ``ray`` module; one line naming the extra when it is not installed."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"engine 'ray' needs Ray: {RAY_EXTRA}") from None
    return ray


class _Actor:
    """One Ray actor: builds its state once (a model replica and its data), then runs jobs."""

    def __init__(self, setup: Callable[..., Any], args: tuple[Any, ...], threads: int,
                 gpu: bool) -> None:
        import torch

        torch.set_num_threads(threads)
        self.state = setup(*args, gpu=gpu)

    def describe(self) -> dict[str, Any]:
        adapter = getattr(self.state, "adapter", None)
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "device": str(getattr(adapter, "device", "cpu"))}

    def run(self, job: Callable[[Any, Any], Any], item: Any) -> Any:
        return job(self.state, item)


class RayPool:
    """Ray actors holding one state each, and :meth:`map`, an ordered stream of job results
    in which an item whose actor died runs again on a fresh actor.

    Args:
        settings: the engine settings (workers, resources, address).
        setup: ``setup(*args, gpu=bool) -> state``, run once in every actor (a module-level
            function: actors import it by name).
    """

    def __init__(self, settings: EngineSettings, setup: Callable[..., Any],
                 args: tuple[Any, ...]) -> None:
        ray = require_ray()
        self.ray, self.settings = ray, settings
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": settings.address, "include_dashboard": False,
                                      "log_to_driver": False, "configure_logging": False}
            if settings.address is None:  # a local instance sized for the requested workers
                kwargs["num_cpus"] = max(os.cpu_count() or 1,
                                         settings.workers * settings.cpus_per_worker)
                # Ray runs workers at nice 15; here they do all the work while the driver
                # waits, and on a shared machine niced workers ran 4-7× slower than a local run
                os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(**kwargs)
            self._owns_ray = True
        else:
            self._owns_ray = False
        self._actor = ray.remote(_Actor).options(
            num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker,
            max_restarts=0)
        self._args = (setup, args, settings.cpus_per_worker, settings.gpus_per_worker > 0)
        self.workers = [self._actor.remote(*self._args) for _ in range(settings.workers)]
        self.devices = ray.get([w.describe.remote() for w in self.workers])
        self.replaced = 0

    def record(self) -> dict[str, Any]:
        """What ``config.json`` records about the engine (not part of the fingerprint)."""
        return {**asdict(self.settings), "devices": self.devices}

    def map(self, job: Callable[[Any, Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        """``job(state, item)`` for every item on the actors, yielded in item order."""
        ray = self.ray
        attempts = [0] * len(items)
        pending: dict[Any, tuple[int, Any]] = {}  # future → (item, actor)
        idle, queue = list(self.workers), list(range(len(items)))
        done: dict[int, Any] = {}
        following = 0
        while following < len(items):
            while idle and queue:
                k, worker = queue.pop(0), idle.pop(0)
                attempts[k] += 1
                pending[self._submit(worker, job, items[k])] = (k, worker)
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            k, worker = pending.pop(ready)
            try:
                done[k] = ray.get(ready)
                idle.append(worker)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                if attempts[k] >= self.settings.max_attempts:
                    raise RuntimeError(f"item {k} failed on {attempts[k]} Ray workers; last: "
                                       f"{type(e).__name__}") from e
                idle.append(self._replace(worker))
                queue.insert(0, k)
            while following in done:
                yield done.pop(following)
                following += 1

    def _submit(self, worker: Any, job: Callable[[Any, Any], Any], item: Any) -> Any:
        """Start one job on ``worker``; returns its future."""
        return worker.run.remote(job, item)

    def _replace(self, dead: Any) -> Any:
        fresh = self._actor.remote(*self._args)
        self.workers = [w for w in self.workers if w is not dead] + [fresh]
        self.replaced += 1
        return fresh

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        if self._owns_ray:
            self.ray.shutdown()


# --- compare on Ray -------------------------------------------------------------------------

@dataclass
class _CompareState:
    adapter: Any
    dataset: Any
    settings: Any
    params: Any


def _compare_setup(source: Mapping[str, Any], settings: CompareSettings, *, gpu: bool
                   ) -> _CompareState:
    """A worker's model and data, rebuilt from the run's recorded source."""
    from vitxai.runner import resolve_methods
    from vitxai.source import RunSource

    src = RunSource.from_values({**source, "device": "cuda" if gpu else source["device"]})
    adapter, dataset, _ = src.load()
    return _CompareState(adapter, dataset, settings,
                         resolve_methods(adapter, settings.methods, settings.method_params))


def _compare_job(state: _CompareState, item: tuple[list[int], int | None, Any]
                 ) -> BatchPayload:
    """The payload of one batch (decoded here unless the driver shipped it)."""
    from vitxai.compare import compute_batch
    from vitxai.data.datasets import iter_batches
    from vitxai.runner import run_batch

    indices, sample_index, batch = item
    s = state.settings
    if batch is None:
        batch = next(iter_batches(state.dataset, indices, len(indices), workers=0))
    run = (run_batch(state.adapter, batch, state.params, seed=s.seed, target=s.target,
                     mask=s.mask, predict_batch_size=s.batch_size,
                     measure_memory=s.measure_memory) if len(batch) else None)
    return compute_batch(batch, run, s, sample_index)


class RayEngine(RayPool):
    """Compare's batches on Ray: each actor a model replica computing whole batches."""

    def __init__(self, settings: EngineSettings, source: Mapping[str, Any],
                 compare_settings: CompareSettings, dataset: Any) -> None:
        super().__init__(settings, _compare_setup, (dict(source), compare_settings))
        self.dataset, self.batch_size = dataset, compare_settings.batch_size

    def payloads(self, todo: Sequence[int], sample_index: int | None
                 ) -> Iterator[BatchPayload]:
        """Every batch of ``todo`` (chunks of the run's batch size, as locally), computed on
        the workers and yielded in batch order."""
        chunks = [list(todo[k:k + self.batch_size])
                  for k in range(0, len(todo), self.batch_size)]
        return self.map(_compare_job, [(c, sample_index, None) for c in chunks])

    def _submit(self, worker: Any, job: Callable[[Any, Any], Any], item: Any) -> Any:
        if self.settings.ship_images:  # decoded here, when the batch starts
            from vitxai.data.datasets import iter_batches

            indices, sample_index, _ = item
            batch = next(iter_batches(self.dataset, indices, len(indices), workers=0))
            item = (indices, sample_index, batch)  # large arguments travel by object store
        return super()._submit(worker, job, item)


#: the engines that compute batches elsewhere (today: Ray)
Engine = RayEngine


def start_engine(settings: EngineSettings | None, source: Mapping[str, Any] | None,
                 compare_settings: CompareSettings, dataset: Any) -> RayEngine | None:
    """The engine's workers, started (None for the local engine).

    Raises:
        ValueError: Ray missing (naming the extra), or no recorded source to rebuild the
            model from.
    """
    if settings is None or settings.name == "local":
        return None
    if not source:
        raise ValueError("engine 'ray' rebuilds the model on every worker from the run's "
                         "source: pass source=RunSource(...).record() (vitxai compare does)")
    return RayEngine(settings, source, compare_settings, dataset)
