"""Probe: attach gate and direction statistics to a DDL model in one line.

    with Probe(model, every=10, sinks=[TensorBoardSink(dir)], on_alert=[log_alert]) as probe:
        for step in range(n):
            ...; opt.step()
            probe.step(step, scalars={"loss": loss.detach(), "lr": lr})
            if probe.stop_requested:
                break

Life of a log step s (the hooks are active during step s iff s is a log step):
1. forward hooks (``_hooks``) add every micro-batch's partial sums into one device buffer;
2. ``step(s)`` waits for the host thread to finish the previous log step and applies its alerts
   (callbacks, stop/checkpoint flags): the same decisions on every rank at the same step;
3. it runs the fixed probe batch if due, merges the buffer under DDP (one all-gather, then a
   SUM over sums and device scalars and a MAX over maxima and negated minima, on the device; on
   CUDA on a side stream, the hooks writing a second buffer meanwhile), copies the buffer into
   pinned host memory with one non-blocking copy, records a CUDA event and hands the lot to the
   host thread (bounded queue);
4. the host thread waits for the event (blocked in the driver without the GIL; the training
   thread never waits on the device), then either hands the raw buffer to the probe's worker
   process, which finishes the statistics (``_finish``), runs the Detector and writes to the sinks
   (``host="process"``, the default on CUDA: ``_worker`` says why), or does that work itself
   (``host="thread"``).
Between log steps nothing happens but a Python bool flip.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from probes._discover import find_sites, unwrap
from probes._hooks import ACCUM, OFF, PROBE, Attachment, _Shared
from probes._layout import Layout
from probes._worker import HostConfig, HostSide, StepMeta, Worker, WorkerLost, apply_report, movable
from probes.sink import Sink
from probes.sinks.fanout import FanoutSink
from server.rules import Alert, Transition
from server.thresholds import Thresholds

log = logging.getLogger("deltascope.probes")

TOKEN_STRIDE = 8
"""Default ``token_stride``: d-vector statistics from every 8th token position."""
HOSTS = ("auto", "thread", "process")
"""Where a probe's host work runs: ``Probe(host=)``."""
ACTIONS = ("log", "checkpoint", "stop")
"""What an ``on_alert`` callback may return (or None)."""
AlertCallback = Callable[[Transition], str | None]


@dataclass
class ProbeStats:
    """What the probe did: log steps handed to the host thread, dropped, failed on the host."""

    log_steps: int = 0
    dropped: int = 0
    errors: int = 0
    probe_runs: int = 0


@dataclass
class _Job:
    """One log step for the host thread; or, with ``extra``, host scalars written in order."""

    step: int
    event: Any  # torch.cuda.Event or None
    host: torch.Tensor | None
    pooled: bool
    layout: Layout | None
    scalar_names: list[str]
    host_scalars: dict[str, float]
    world: int
    extra: bool = False


class Probe:
    """Forward-hook statistics of every delta residual, computed on the device every ``every``
    steps, finished on a host thread, judged by :class:`server.rules.Detector`, written to sinks.

    ``model``: a DDL model, DDP-wrapped or not, not yet compiled (compile after attaching).
    ``every``: log period in steps: step s is a log step iff s % every == 0.
    ``sinks``: destinations (:class:`probes.sink.Sink`); wrapped in a FanoutSink.
    ``thresholds``: regime edges and rule thresholds (default: from the environment).
    ``beta_max``: default ``model.cfg.beta_max``. ``run``: the run name on alerts.
    ``on_alert``: callables receiving each Transition, returning "log", "checkpoint", "stop" or None.
    ``probe_batch`` / ``probe_every``: a fixed (B, T) index tensor re-run without grad at the first
        log step at least ``probe_every`` steps after its previous run, for ``k_cos_probe``.
    ``modules``: ``{"attn/0": "blocks.0.attn_delta", ...}`` instead of discovery (forward order).
    ``queue_size``: log steps that may wait for the host thread before one is dropped.
    ``start_step``: the first step the loop will report; log steps are the multiples of ``every``
        (so a resumed run logs the steps it would have logged), the first step too when 0.
    ``fuse``: run the hooks' statistics as torch.compile'd fused kernels when the model runs
        eagerly (None: on CUDA only; a model compiled by the user inlines them either way).
    ``host``: where the host work (finishing, the Detector, the sinks) runs. "process": a child
        process (``probes._worker``), so that its Python never holds the training process's GIL;
        sinks that can (TensorBoard, MLflow, JSONL) move there, the others (MemorySink, your own)
        get the finished records back in this process. "thread": the probe's host thread.
        "auto" (default): "process" when the model is on CUDA, else "thread". If the worker cannot
        start or dies, the probe says so once and goes on with "thread".
    ``token_stride``: the statistics of d-vectors (||h||, every k statistic, the update ratio)
        read token positions 0, s, 2s, ... of every sequence (and t + 1 for ``k_cos_token``);
        1 reads every token, at about 8x the device cost of the default. The gate (beta, logit),
        write/erase and non-finite counts of beta and of the update always read every token.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        sinks: Iterable[Sink] = (),
        thresholds: Thresholds | None = None,
        beta_max: float | None = None,
        run: str = "",
        on_alert: AlertCallback | Iterable[AlertCallback] = (),
        probe_batch: torch.Tensor | None = None,
        probe_every: int = 0,
        modules: Mapping[str, str] | None = None,
        queue_size: int = 4,
        start_step: int = 0,
        fuse: bool | None = None,
        token_stride: int = TOKEN_STRIDE,
        host: str = "auto",
    ) -> None:
        if host not in HOSTS:
            raise ValueError(f"host must be one of {', '.join(HOSTS)}, got {host!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if token_stride < 1:
            raise ValueError(f"token_stride must be >= 1, got {token_stride}")
        if probe_batch is not None and probe_every < 1:
            raise ValueError("probe_batch needs probe_every >= 1")
        self.model, self.every, self.run = model, every, run
        self._root = unwrap(model)
        self._group = model.process_group if isinstance(model, nn.parallel.DistributedDataParallel) else None
        found = find_sites(self._root, modules)
        if not found:
            log.warning("Probe found no delta residuals (additive model?): only scalars are logged")
        self.sites: list[tuple[str, int]] = [(s.site, s.layer) for s in found]
        cfg = getattr(self._root, "cfg", None)
        if beta_max is None:
            beta_max = float(cfg.beta_max) if cfg is not None else 2.0
        self.beta_max = float(beta_max)
        self._d_hint = int(cfg.d_model) if cfg is not None else 1
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self._on_alert: list[AlertCallback] = [on_alert] if callable(on_alert) else list(on_alert)
        self.probe_batch, self.probe_every = probe_batch, probe_every
        self._last_probe: int | None = None

        self.token_stride = token_stride
        self._sh = _Shared(len(found), fuse, stride=token_stride, beta_max=self.beta_max,
                           thresholds=self.thresholds)
        self._sh.mode = ACCUM if start_step % every == 0 else OFF
        param = next(self._root.parameters(), None)
        if found and cfg is not None and param is not None and param.device.type != "meta":
            # the buffer exists before the first forward: a model compiled after attaching traces
            # it as it will stay (allocated mid-trace, it cost a second compile of the whole model)
            self._sh.ensure(param.device, self._d_hint)
        self._attached = Attachment(self._sh)
        for i, s in enumerate(found):
            m = s.module
            for role, mod in (("logit", getattr(m.beta_gate, "logit", None)),
                              ("k_dir", m.k_dir), ("write", m.write), ("residual", m)):
                if isinstance(mod, nn.Module):  # the logit is absent when beta is fixed
                    self._attached.add(mod, role, i)

        self.stats = ProbeStats()
        self._faults: set[str] = set()
        self._cfg = HostConfig(self.sites, self.beta_max, self.thresholds, run)
        self._sinks = list(sinks)
        on_cuda = param is not None and param.device.type == "cuda"
        self._worker: Worker | None = None
        self._moved: list[Sink] = []  # written by the worker; this process keeps them idle, as fallback
        if host == "process" or (host == "auto" and on_cuda):
            self._start_worker()
        local = [s for s in self._sinks if not any(s is m for m in self._moved)]
        self._host: HostSide | None = None if self._worker is not None else HostSide(self._cfg, local)
        self.sink = self._host.sink if self._host is not None else FanoutSink(local)
        """The sinks written in this process: all of them on the host thread; in process mode
        those that stayed (each moved sink's ``stats`` are updated at ``flush`` and ``close``)."""
        self.stop_requested = False
        self.checkpoint_requested = False
        self.transitions: list[Transition] = []
        """Every alert transition applied so far, in order."""
        self._alerts: list[Alert] = []
        self._verdict = "healthy"
        self._lock = threading.Lock()
        self._done: list[Transition] = []  # host thread -> training thread, applied at a log step
        self._latest: tuple[list[Alert], str] = ([], "healthy")
        self._pool: list[torch.Tensor] = []  # free pinned host buffers
        self._pinned = 0
        # DDP on CUDA: the side stream that merges a log step, and the buffer it hands back
        self._side: Any = None
        self._spare: torch.Tensor | None = None
        self._spare_ready: Any = None
        self._queue_size = queue_size
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._loop, name="deltascope-probe", daemon=True)
        self._thread.start()
        self._closed = False

    def _start_worker(self) -> None:
        blobs = [(s, b) for s in self._sinks if (b := movable(s)) is not None]
        try:
            self._worker = Worker(self._cfg, [b for _, b in blobs])
        except (OSError, WorkerLost) as e:
            log.warning("deltascope probe worker did not start (%s): the probe's host thread does its work", e)
            return
        self._moved = [s for s, _ in blobs]

    @property
    def host(self) -> str:
        """Where the host work runs now: "process" or "thread"."""
        return "process" if self._worker is not None else "thread"

    # -- the training thread --------------------------------------------------------------------
    def step(self, step: int, scalars: Mapping[str, float | torch.Tensor] | None = None) -> None:
        """End of optimizer step ``step``. On a log step: apply the previous log step's alerts and
        ship this one's statistics; otherwise only arm or disarm the hooks for ``step + 1``."""
        if self._closed:
            return
        if self._sh.mode == ACCUM:
            self._sh.flush()  # sites kept by a forward that stopped short of the last one
            self._join()
            self._submit(step, scalars or {})
        self._sh.mode = ACCUM if (step + 1) % self.every == 0 else OFF

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write host scalars that are not part of a training step's record (e.g. a validation
        loss) to the probe's sinks, in order with its records. In process mode this is the way to
        reach a sink the worker writes."""
        if self._closed:
            return
        self._enqueue(_Job(step, None, None, False, None, [], {k: float(v) for k, v in scalars.items()}, 1,
                           extra=True), count=False)

    def flush(self) -> None:
        """Drain the host thread, apply every pending alert, flush the sinks."""
        self._join()
        if self._worker is not None:  # the host thread is idle after the join: the socket is ours
            try:
                self._reports(self._worker.flush(timeout=120))
            except WorkerLost as e:
                self._worker_lost(e)
        self.sink.flush()

    def _reports(self, reports: list[dict[str, Any]] | None) -> None:
        for s, rep in zip(self._moved, reports or [], strict=False):
            apply_report(s, rep)

    def close(self) -> None:
        """Flush, remove every hook, stop the host thread, close the sinks. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._attached.remove()
        self._closed = True
        self._q.put(None)
        self._thread.join(timeout=30)
        if self._worker is not None:
            self._reports(self._worker.close(timeout=120))
            self._worker = None
        for s in self._moved:  # idle copies: their threads never wrote
            s.close()
        self.sink.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def checkpoint_done(self) -> None:
        """The trainer saved the checkpoint a callback asked for."""
        self.checkpoint_requested = False

    @property
    def alerts(self) -> list[Alert]:
        """Pending and firing alerts as of the last applied log step."""
        return list(self._alerts)

    @property
    def verdict(self) -> str:
        """"healthy", "warning" or "failing", as of the last applied log step."""
        return self._verdict

    def _join(self) -> None:
        # sync: the one deliberate wait of a log step. The host thread must have finished the
        # previous log step (whose copy has long left the device) so that every rank applies the
        # same alerts at the same step. The training thread never waits on the device itself.
        self._q.join()
        with self._lock:
            done, self._done = self._done, []
            self._alerts, self._verdict = self._latest
        for t in done:
            self.transitions.append(t)
            for cb in self._on_alert:
                try:
                    action = cb(t)
                except Exception as e:  # a callback never takes training down
                    self._fault("callback", e)
                    continue
                if action == "stop":
                    self.stop_requested = True
                elif action == "checkpoint":
                    self.checkpoint_requested = True
                elif action not in (None, "log"):
                    self._fault("callback", ValueError(f"unknown action {action!r}"))

    def _submit(self, step: int, scalars: Mapping[str, float | torch.Tensor]) -> None:
        sh = self._sh
        host_sc = {k: float(v) for k, v in scalars.items() if not isinstance(v, torch.Tensor)}
        tensors = {k: v.detach() for k, v in scalars.items() if isinstance(v, torch.Tensor)}
        if sh.buf is None and tensors:  # no forward ran with the hooks: room for the scalars
            sh.ensure(next(iter(tensors.values())).device, self._d_hint)
        if sh.buf is None:  # nothing measured and nothing on a device
            self._enqueue(_Job(step, None, None, False, None, [], host_sc, 1))
            return
        dev_sc: dict[str, torch.Tensor] = {}
        for k, v in tensors.items():
            if v.device == sh.buf.device or v.device.type != "cpu":
                dev_sc[k] = v  # packed into the buffer: leaves with the one copy, never .item()
            else:
                host_sc[k] = float(v)  # a CPU tensor in a GPU run: no device sync
        names = sorted(dev_sc)  # same order on every rank: the SUM is positional
        if names:
            self._pack(names, dev_sc)
        if self._probe_due(step):
            self._run_probe_batch(step)
        world = self._world()
        layout = sh.layout
        if world > 1 and sh.buf.device.type == "cuda":
            event, host, pooled = self._merge_aside(world)
        else:
            if world > 1:
                self._merge(sh.buf, world)
            event, host, pooled = self._copy_out(sh.buf)
            sh.reset()
        if host is None:
            self.stats.dropped += 1
            self._fault("queue", RuntimeError("no free host buffer: log step dropped"))
            return
        self._enqueue(_Job(step, event, host, pooled, layout, names, host_sc, world))

    def _enqueue(self, job: _Job, count: bool = True) -> None:
        try:
            self._q.put_nowait(job)
            self.stats.log_steps += count
        except queue.Full:
            self.stats.dropped += 1
            self._fault("queue", RuntimeError("host queue full: log step dropped"))

    def _pack(self, names: list[str], dev: dict[str, torch.Tensor]) -> None:
        """Device scalars go into the buffer's scalar slots: they leave with the same copy."""
        sh = self._sh
        L = sh.layout
        assert sh.buf is not None and L is not None
        if len(names) > L.n_scalars:
            sh.allocate(sh.buf.device, Layout(L.n_sites, L.d, max(len(names), 2 * L.n_scalars)), sh.buf)
            L = sh.layout
        vals = torch.stack([dev[k].reshape(()).to(sh.buf.device, sh.buf.dtype) for k in names])
        sh.buf.narrow(0, L.scalars, len(names)).copy_(vals)

    def _probe_due(self, step: int) -> bool:
        return (
            self.probe_batch is not None
            and self.sites != []
            and (self._last_probe is None or step - self._last_probe >= self.probe_every)
        )

    def _run_probe_batch(self, step: int) -> None:
        """The fixed probe batch through the eager model (never the DDP wrapper), without grad."""
        sh = self._sh
        assert sh.buf is not None and self.probe_batch is not None
        if self.probe_batch.device != sh.buf.device:
            self.probe_batch = self.probe_batch.to(sh.buf.device)
        was, sh.mode = sh.mode, PROBE
        try:
            with torch.no_grad():
                self._root(self.probe_batch)
        finally:
            sh.mode = was
        self._last_probe = step
        self.stats.probe_runs += 1

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self._group)

    def _merge(self, buf: torch.Tensor, world: int) -> None:
        """DDP: one collective per log step (an all-gather of every rank's buffer, ~90 KB on the
        small model), then the sums added and the maxima taken on the device, in the same order
        on every rank, so every rank sees the same merged numbers."""
        L = self._sh.layout
        assert L is not None
        flat = torch.empty(world * buf.numel(), dtype=buf.dtype, device=buf.device)  # gloo wants it flat
        dist.all_gather_into_tensor(flat, buf, group=self._group)
        every = flat.view(world, buf.numel())
        torch.sum(every[:, : L.sum_end], dim=0, out=buf[: L.sum_end])
        torch.amax(every[:, L.sum_end :], dim=0, out=buf[L.sum_end :])

    def _merge_aside(self, world: int) -> tuple[Any, torch.Tensor | None, bool]:
        """DDP on CUDA: merge, copy out and reset this log step's buffer on a side stream, while
        the hooks write the next log step into a second buffer. On the training stream the
        collective waited for the slowest rank and for NCCL's latency (~0.15 ms a log step on 2 x
        H200); there only one event wait is left, on a reset that finished a log step ago."""
        sh = self._sh
        merged = sh.buf
        assert merged is not None
        main = torch.cuda.current_stream(merged.device)
        spare, ready = self._spare, self._spare_ready
        if spare is None or spare.shape != merged.shape or spare.device != merged.device:
            spare = torch.empty_like(merged)
            sh.reset(spare)  # on the training stream, before any write to it
        elif ready is not None:
            main.wait_event(ready)  # its merge, copy and reset (the previous log step) are done
        if self._side is None or self._side.device != merged.device:
            self._side = torch.cuda.Stream(device=merged.device)
        side = self._side
        side.wait_stream(main)  # this log step's partials are all written
        with torch.cuda.stream(side):
            merged.record_stream(side)
            self._merge(merged, world)
            event, host, pooled = self._copy_out(merged)
            sh.reset(merged)
            ready = torch.cuda.Event()
            ready.record(side)
        sh.buf, self._spare, self._spare_ready = spare, merged, ready
        return event, host, pooled

    def _copy_out(self, buf: torch.Tensor) -> tuple[Any, torch.Tensor | None, bool]:
        """The one device-to-host copy of the log step: pinned and non-blocking on CUDA, its event
        recorded on the current stream."""
        if buf.device.type == "cpu":
            return None, buf.clone(), False
        if buf.device.type != "cuda":  # e.g. MPS: no events to wait on; this copy syncs
            return None, buf.to("cpu"), False
        with self._lock:
            host = next((h for h in self._pool if h.numel() == buf.numel()), None)
            if host is not None:
                self._pool.remove(host)
            elif self._pinned < self._queue_size + 1:
                host = torch.empty(buf.numel(), dtype=buf.dtype, pin_memory=True)
                self._pinned += 1
        if host is None:
            return None, None, False
        host.copy_(buf, non_blocking=True)
        event = torch.cuda.Event(blocking=True)
        event.record()
        return event, host, True

    # -- the host thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                self._work(job)
            except Exception as e:  # never let one bad step kill the thread
                self.stats.errors += 1
                self._fault("host", e)
            finally:
                self._q.task_done()

    def _work(self, job: _Job) -> None:
        raw = None
        if job.host is not None and job.layout is not None:
            if job.event is not None:
                # this thread sleeps in the driver, without the GIL, until the copy has landed:
                # polling woke it ~500 times per step, and each wake-up took the GIL from the
                # training thread between two of its ops (a blocking event: no spinning core)
                job.event.synchronize()
            raw = job.host.numpy()
        try:
            if self._worker is not None:
                try:
                    self._remote(job, raw)
                    return
                except WorkerLost as e:
                    self._worker_lost(e)
            self._local(job, raw)
        finally:
            if job.pooled:
                with self._lock:
                    self._pool.append(job.host)

    def _remote(self, job: _Job, raw: np.ndarray | None) -> None:
        """Process mode: ~30 us of this process's Python per log step; the child does the rest."""
        assert self._worker is not None
        if job.extra:
            self._worker.write(job.step, job.host_scalars)
            self.sink.write(job.step, job.host_scalars)
            return
        meta = StepMeta(job.step, job.layout, job.scalar_names, job.host_scalars, job.world,
                        None if raw is None else str(raw.dtype), want_record=bool(self.sink.sinks))
        done = self._worker.step(meta, raw)
        if done.error is not None:
            self.stats.errors += 1
            self._fault("host", RuntimeError(f"in the probe worker: {done.error}"))
        if done.record is not None:
            self.sink.write(job.step, *done.record)
        self._publish(done.transitions, done.alerts, done.verdict)

    def _local(self, job: _Job, raw: np.ndarray | None) -> None:
        assert self._host is not None
        if job.extra:
            self._host.sink.write(job.step, job.host_scalars)
            return
        arr = None if raw is None else raw.astype(np.float64)
        transitions, _, _ = self._host.process(job.step, arr, job.layout, job.scalar_names, job.host_scalars,
                                               job.world)
        d = self._host.detector
        self._publish(transitions, d.alerts(), d.verdict())

    def _publish(self, transitions: list[Transition], alerts: list[Alert], verdict: str) -> None:
        """Hand a log step's judgement to the training thread, which applies it at its next join."""
        with self._lock:
            self._done.extend(transitions)
            self._latest = (alerts, verdict)

    def _worker_lost(self, e: WorkerLost) -> None:
        """The worker exited or hung: finish on this thread from now on, with the sinks' idle copies
        in this process (so files are reopened, not lost; alert state and drift restart)."""
        log.warning("deltascope probe: the worker process is lost (%s); the host thread finishes the statistics "
                    "from now on, with alert state restarted", e)
        w, self._worker = self._worker, None
        if w is not None:
            w.kill()
        self._host = HostSide(self._cfg, [*self._moved, *self.sink.sinks])
        self.sink = self._host.sink
        self._moved = []

    def _fault(self, kind: str, e: BaseException) -> None:
        """One warning per fault kind, not one per step."""
        if kind not in self._faults:
            self._faults.add(kind)
            log.warning("deltascope probe %s fault (further ones are counted, not logged): %r", kind, e)
