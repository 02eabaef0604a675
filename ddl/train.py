"""The training loop: CPU by default, CUDA with bf16 autocast, torch.compile, DDP under torchrun.

One process or many: under torchrun every rank draws its slice of the same global batch
(``ddl.data.get_batch``), so a 2-process run sees exactly what one process with twice the batch
sees. Probes are attached before compile and DDP; their sinks live on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ddl.config import presets, with_overrides
from ddl.data import Corpus, get_batch, load_shards, prepare_corpus
from ddl.model import DDLModel
from ddl.train_config import PRESET_TRAINING, TrainConfig

log = logging.getLogger("deltascope.train")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend)
    return d


def pick_device(name: str, local_rank: int) -> str:
    if name == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return name


def lr_at(step: int, cfg: TrainConfig, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine from peak to peak * min_lr_ratio at max_steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    floor = peak * cfg.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: DDLModel, cfg: TrainConfig, lr: float, device: str) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"))


def load_corpus(cfg: TrainConfig) -> Corpus:
    return load_shards(cfg.data) if cfg.data else prepare_corpus(vocab_size=cfg.vocab_size)


def build_sinks(cfg: TrainConfig, run_name: str, params: dict) -> list:
    """TensorBoard, MLflow and stats.jsonl under the run directory, plus the server if given."""
    from probes.sinks import JsonlSink, TensorBoardSink

    sinks = [TensorBoardSink(cfg.out / "tb"), JsonlSink(cfg.out / "stats.jsonl")]
    try:
        from probes.sinks import MLflowSink
    except ImportError:  # a GPU image without mlflow: train on, say so once
        log.warning("mlflow is not installed: the MLflow sink is off for this run")
    else:
        tags = {"deltascope.preset": cfg.preset}
        sinks.append(MLflowSink(cfg.tracking_uri, run_name=run_name, params=params, tags=tags))
    if cfg.server:
        from probes.http_sink import HttpSink

        sinks.append(HttpSink(cfg.server, run_name, config=params, beta_max=params.get("beta_max", 2.0),
                              spool_dir=cfg.out / "spool"))
    return sinks


@torch.no_grad()
def evaluate(model, corpus: Corpus, cfg: TrainConfig, B: int, T: int, d: Dist, device: str, amp) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(cfg.eval_batches):
        x, y = get_batch(corpus.val, B, T, step=i, seed=cfg.seed + 1, rank=d.rank, world=d.world, device=device)
        with amp:
            total += model(x, y)[1].float()
    if d.world > 1:
        dist.all_reduce(total)
    model.train()
    return total.item() / (cfg.eval_batches * d.world)  # sync: once per evaluation


def save_checkpoint(path: Path, model: DDLModel, opt, step: int, cfg: TrainConfig) -> None:
    """Atomic: a crash mid-save leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "model_config": model.cfg.model_dump(), "train_config": cfg.model_dump(mode="json")}, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns a summary (final losses, tokens/s, steps, stop reason)."""
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    d = setup_distributed(device)
    if d.world > 1 and device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(cfg)

    preset = presets[cfg.preset]
    defaults = PRESET_TRAINING[cfg.preset]
    B = cfg.batch_size or int(defaults["batch_size"])
    T = cfg.seq_len or preset.block_size
    peak = cfg.lr or defaults["lr"]
    warmup = cfg.warmup if cfg.warmup is not None else min(2000, max(1, cfg.max_steps // 10))
    vocab = 64 * math.ceil(corpus.vocab_size / 64)  # padded for matmul speed, as the paper's 50304
    mcfg = with_overrides(preset, **{**cfg.overrides, "vocab_size": vocab, "block_size": max(T, 8)})

    model = DDLModel(mcfg).to(device)
    opt = make_optimizer(model, cfg, peak, device)
    cfg.out.mkdir(parents=True, exist_ok=True)
    start = 0
    ckpt = cfg.out / "ckpt.pt"
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"] + 1
    run_name = cfg.out.name
    params = {**mcfg.model_dump(), "preset": cfg.preset, "batch_size": B, "seq_len": T, "lr": peak,
              "grad_accum": cfg.grad_accum, "world": d.world, "max_steps": cfg.max_steps,
              "params": model.num_params(), "corpus": corpus.source}
    if d.main:
        (cfg.out / "config.json").write_text(json.dumps(params, indent=2, default=str))
        print(f"deltascope: {cfg.preset} {model.num_params() / 1e6:.2f}M params on {device} x{d.world}, "
              f"corpus {corpus.source}, {B}x{T} tokens x{cfg.grad_accum} accum", file=sys.stderr)

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines about tables are noise here
    sinks = build_sinks(cfg, run_name, params) if d.main else []
    probe = None
    if cfg.probes and mcfg.residual == "delta":
        from probes import Probe
        from probes.callbacks import log_alert

        probe = Probe(model, every=cfg.every, sinks=sinks, run=run_name, on_alert=[log_alert],
                      start_step=start, token_stride=cfg.token_stride)
    else:
        from probes.sinks import FanoutSink

        fanout = FanoutSink(sinks)

    net: torch.nn.Module = model
    if cfg.compile:
        net = torch.compile(net)
    if d.world > 1:
        ids = [d.local_rank] if device.startswith("cuda") else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    use_amp = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()

    tokens_per_step = B * T * cfg.grad_accum * d.world
    show_bar = d.main and sys.stderr.isatty()  # logs and CI get the per-step lines only
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not show_bar, unit="step", dynamic_ncols=True,
               file=sys.stderr, leave=False)
    summary: dict = {"stopped_by": None, "val_loss": None}
    t_last, step_last = time.perf_counter(), start
    step = start
    try:
        for step in range(start, cfg.max_steps):
            lr = lr_at(step, cfg, peak, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = get_batch(corpus.train, B, T, step=step * cfg.grad_accum + micro, seed=cfg.seed,
                                 rank=d.rank, world=d.world, device=device)
                sync = net.no_sync() if d.world > 1 and micro < cfg.grad_accum - 1 else nullcontext()
                with sync, amp:
                    loss = net(x, y)[1] / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            scalars = {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm.detach()}
            if probe is not None:
                probe.step(step, scalars=scalars)
            bar.update(1)
            last = step == cfg.max_steps - 1
            if step % cfg.log_every == 0 or last:
                loss_val = loss_sum.item()  # sync: once per log_every steps, for the progress line
                now = time.perf_counter()
                tps = tokens_per_step * (step + 1 - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step + 1
                summary.update(loss=loss_val, tokens_per_s=tps)
                if probe is None and d.main:
                    fanout.write(step, {"loss": loss_val, "lr": lr, "tokens_per_s": tps})
                if d.main:
                    bar.write(f"step {step:>6}/{cfg.max_steps} | loss {loss_val:.4f} | lr {lr:.2e} | "
                              f"{tps / 1e3:.1f}k tok/s", file=sys.stderr)
            if step % cfg.eval_every == 0 and step > 0 or last:
                val = evaluate(net, corpus, cfg, B, T, d, device, amp)
                summary["val_loss"] = val
                if probe is not None:  # in order with its records; its worker may own the sinks
                    probe.log(step, {"val_loss": val})
                elif d.main:
                    fanout.write(step, {"val_loss": val})
                if d.main:
                    bar.write(f"step {step:>6} | val_loss {val:.4f}", file=sys.stderr)
            if probe is not None and probe.checkpoint_requested and d.main:
                save_checkpoint(ckpt, model, opt, step, cfg)
                probe.checkpoint_done()
            if step % cfg.ckpt_every == 0 and step > 0 and d.main:
                save_checkpoint(ckpt, model, opt, step, cfg)
            if probe is not None and probe.stop_requested:
                summary["stopped_by"] = "alert"
                if d.main:
                    bar.write(f"stopping at step {step}: an alert callback asked to stop", file=sys.stderr)
                break
    finally:
        bar.close()
        if d.main:
            save_checkpoint(ckpt, model, opt, step, cfg)
        if probe is not None:
            probe.close()
        elif d.main:
            fanout.close()
        if d.world > 1:
            dist.destroy_process_group()
    summary.update(steps=step + 1, alerts=[a.message for a in probe.alerts] if probe else [],
                   out=str(cfg.out))
    if d.main:
        (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
        _final_report(cfg, run_name)
    return summary


def _final_report(cfg: TrainConfig, run_name: str) -> None:
    """Render the run's figures into <out>/report and attach them to the MLflow run. A report is
    a courtesy: any failure is one warning, never a failed training run."""
    try:
        from dashboards.report import build_report, log_report_to_mlflow

        page = build_report(cfg.out)
        print(f"report: {page}", file=sys.stderr)
        log_report_to_mlflow(cfg.tracking_uri, run_name, page.parent)
    except Exception as e:  # noqa: BLE001 (the model is trained and saved; say why the report is missing)
        log.warning("no end-of-training report: %s", e)
