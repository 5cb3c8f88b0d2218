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
from collections.abc import Iterator, Mapping, Sequence
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


class _Worker:
    """One model replica: rebuilt from the run's source, computing whole batches."""

    def __init__(self, source: Mapping[str, Any], settings: CompareSettings,
                 threads: int, gpu: bool) -> None:
        import torch

        from vitxai.runner import resolve_methods
        from vitxai.source import RunSource

        torch.set_num_threads(threads)
        src = RunSource.from_values({**source, "device": "cuda" if gpu else source["device"]})
        self.adapter, self.dataset, _ = src.load()
        self.settings = settings
        self.params = resolve_methods(self.adapter, settings.methods, settings.method_params)

    def describe(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.adapter.device)}

    def compute(self, indices: Sequence[int], sample_index: int | None,
                batch: Any = None) -> BatchPayload:
        """The payload of the batch of ``indices`` (decoded here unless ``batch`` came
        with them)."""
        from vitxai.compare import compute_batch
        from vitxai.data.datasets import iter_batches
        from vitxai.runner import run_batch

        s = self.settings
        if batch is None:
            batch = next(iter_batches(self.dataset, indices, len(indices), workers=0))
        run = (run_batch(self.adapter, batch, self.params, seed=s.seed, target=s.target,
                         mask=s.mask, predict_batch_size=s.batch_size,
                         measure_memory=s.measure_memory) if len(batch) else None)
        return compute_batch(batch, run, s, sample_index)


class RayEngine:
    """A pool of :class:`_Worker` actors and the ordered stream of their payloads."""

    def __init__(self, settings: EngineSettings, source: Mapping[str, Any],
                 compare_settings: CompareSettings, dataset: Any) -> None:
        ray = require_ray()
        self.ray, self.settings, self.dataset = ray, settings, dataset
        self.batch_size = compare_settings.batch_size
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": settings.address, "include_dashboard": False,
                                      "log_to_driver": False, "configure_logging": False}
            if settings.address is None:  # a local instance sized for the requested workers
                kwargs["num_cpus"] = max(os.cpu_count() or 1,
                                         settings.workers * settings.cpus_per_worker)
            ray.init(**kwargs)
            self._owns_ray = True
        else:
            self._owns_ray = False
        self._actor = ray.remote(_Worker).options(
            num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker,
            max_restarts=0)
        self._args = (dict(source), compare_settings, settings.cpus_per_worker,
                      settings.gpus_per_worker > 0)
        self.workers = [self._actor.remote(*self._args) for _ in range(settings.workers)]
        self.devices = ray.get([w.describe.remote() for w in self.workers])
        self.replaced = 0

    def record(self) -> dict[str, Any]:
        """What ``config.json`` records about the engine (not part of the fingerprint)."""
        return {**asdict(self.settings), "devices": self.devices}

    def payloads(self, todo: Sequence[int], sample_index: int | None
                 ) -> Iterator[BatchPayload]:
        """Every batch of ``todo`` (chunks of the run's batch size, as locally), computed on
        the workers and yielded in batch order; a batch whose worker died is computed again
        on a fresh worker."""
        ray = self.ray
        chunks = [list(todo[k:k + self.batch_size])
                  for k in range(0, len(todo), self.batch_size)]
        attempts = [0] * len(chunks)
        pending: dict[Any, tuple[int, Any]] = {}  # future → (chunk, worker)
        idle = list(self.workers)
        done: dict[int, BatchPayload] = {}
        queue = list(range(len(chunks)))
        following = 0
        while following < len(chunks):
            while idle and queue:
                k, worker = queue.pop(0), idle.pop(0)
                attempts[k] += 1
                pending[self._submit(worker, chunks[k], sample_index)] = (k, worker)
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            k, worker = pending.pop(ready)
            try:
                done[k] = ray.get(ready)
                idle.append(worker)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                if attempts[k] >= self.settings.max_attempts:
                    raise RuntimeError(f"batch of images {chunks[k][:3]}… failed on "
                                       f"{attempts[k]} workers; last: {type(e).__name__}"
                                       ) from e
                self._replace(worker)
                idle.append(self.workers[-1])
                queue.insert(0, k)
            while following in done:
                yield done.pop(following)
                following += 1

    def _submit(self, worker: Any, indices: list[int], sample_index: int | None) -> Any:
        """Start one batch on ``worker``; returns its future."""
        shipped = self._decode(indices) if self.settings.ship_images else None
        return worker.compute.remote(indices, sample_index, shipped)

    def _decode(self, indices: Sequence[int]) -> Any:
        from vitxai.data.datasets import iter_batches

        return self.ray.put(next(iter_batches(self.dataset, indices, len(indices),
                                              workers=0)))

    def _replace(self, dead: Any) -> None:
        self.workers = [w for w in self.workers if w is not dead]
        fresh = self._actor.remote(*self._args)
        self.workers.append(fresh)
        self.replaced += 1

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        if self._owns_ray:
            self.ray.shutdown()


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
