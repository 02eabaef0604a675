"""The ``deltascope`` command: train, serve, demo, report, experiment, flush-spool.

Flags are validated (pydantic) before anything heavy is imported; a user mistake ends with one
line on stderr that says what to do and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError


def _fail(msg: str) -> int:
    print(f"deltascope: error: {msg}", file=sys.stderr)
    return 2


def _parse_set(items: list[str]) -> dict:
    """``--set d_v=4 --set residual=additive`` -> {"d_v": 4, "residual": "additive"}."""
    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def _validation_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny (CPU, minutes), small (124M), medium (353M)")
    p.add_argument("--max-steps", type=int, default=600, help="optimizer steps (default 600)")
    p.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run directory (default runs/tiny)")
    p.add_argument("--every", type=int, default=10, help="probe statistics every N steps (default 10)")
    p.add_argument("--token-stride", type=int, default=8,
                   help="probe d-vector statistics (||h||, k) from every Nth token position; 1 = all (default 8)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///<out parent>/mlflow.db)")
    p.add_argument("--server", help="deltascope server URL to stream stats and alerts to")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-probes", action="store_true", help="train without probes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="model config override, e.g. --set d_v=4 --set residual=additive")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="warmup steps (default 10%% of max steps)")
    p.add_argument("--eval-every", type=int, default=200, help="validation every N steps")
    p.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--data", help="directory or glob of uint16 token shards (*.bin) instead of Shakespeare")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary for the default corpus")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")


def train_config_from_args(a: argparse.Namespace):
    from ddl.config import presets, with_overrides
    from ddl.train_config import TrainConfig

    overrides = _parse_set(a.overrides)
    cfg = TrainConfig(
        preset=a.preset, overrides=overrides, out=a.out, max_steps=a.max_steps, batch_size=a.batch_size,
        seq_len=a.seq_len, grad_accum=a.grad_accum, lr=a.lr, warmup=a.warmup, log_every=a.log_every,
        eval_every=a.eval_every, ckpt_every=a.ckpt_every, seed=a.seed, vocab_size=a.vocab_size,
        data=a.data, device=a.device, compile=a.compile, probes=not a.no_probes, every=a.every,
        token_stride=a.token_stride,
        mlflow_uri=a.mlflow_uri, server=a.server, resume=a.resume,
    )
    with_overrides(presets[cfg.preset], **overrides)  # validates the model overrides now
    return cfg


def cmd_train(a: argparse.Namespace) -> int:
    try:
        cfg = train_config_from_args(a)
    except ValidationError as e:
        return _fail(f"{_validation_line(e)} (see deltascope train --help)")
    except ValueError as e:
        return _fail(str(e))
    from ddl.data import DataError
    from ddl.train import train

    try:
        summary = train(cfg)
    except DataError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("deltascope: interrupted; the last checkpoint is in " + str(cfg.out), file=sys.stderr)
        return 130
    print(json.dumps({k: summary[k] for k in ("steps", "loss", "val_loss", "tokens_per_s", "stopped_by")
                      if k in summary}))
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import server
    from server.settings import Settings

    try:
        settings = Settings(host=a.host, port=a.port, **({"db_url": a.db} if a.db else {}))
    except ValidationError as e:
        return _fail(_validation_line(e))
    server.serve(settings)
    return 0


def _free_port(preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


def _wait_healthy(url: str, proc, timeout: float = 60.0) -> bool:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def cmd_demo(a: argparse.Namespace) -> int:
    """Server on SQLite, a tiny DDL run on Shakespeare with every sink, alerts as they fire."""
    import subprocess

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port(a.port)
    url = f"http://127.0.0.1:{port}"
    db = f"sqlite:///{out / 'deltascope.db'}"
    server_log = open(out / "server.log", "ab")  # noqa: SIM115 (outlives this block; closed in finally)
    proc = subprocess.Popen([sys.executable, "-m", "ddl.cli", "serve", "--port", str(port), "--db", db],
                            stdout=server_log, stderr=subprocess.STDOUT)
    try:
        if not _wait_healthy(url, proc):
            return _fail(f"the server did not start; see {out / 'server.log'}")
        run_dir = out / "tiny"
        print(f"""
deltascope demo
  live page    {url}/
  API          {url}/docs
  TensorBoard  .venv/bin/tensorboard --logdir {run_dir / 'tb'} --host 127.0.0.1
  MLflow       .venv/bin/mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}
  stats        {run_dir / 'stats.jsonl'}
""", file=sys.stderr, flush=True)
        args = ["--preset", "tiny", "--max-steps", str(a.max_steps), "--out", str(run_dir),
                "--every", str(a.every), "--server", url, "--eval-every", "100",
                "--mlflow-uri", f"sqlite:///{out / 'mlflow.db'}"]
        if a.resume:
            args.append("--resume")
        rc = main(["train", *args])
        if rc == 0 and a.keep_serving:
            print(f"training done; the server keeps running at {url}/ (Ctrl-C to stop)", file=sys.stderr)
            proc.wait()
        return rc
    except KeyboardInterrupt:
        return 130
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        server_log.close()


def cmd_flush_spool(a: argparse.Namespace) -> int:
    """Send the spools that dead jobs left behind; 0 all delivered, 1 something remains, 2 misuse."""
    import os

    import httpx

    from probes.http_sink import DEFAULT_SPOOL_DIR
    from probes.spool_replay import replay_orphans

    spool_dir = a.dir or DEFAULT_SPOOL_DIR
    if a.url is not None:
        try:
            u = httpx.URL(a.url)
        except httpx.InvalidURL:
            u = None
        if u is None or u.scheme not in ("http", "https") or not u.host:
            return _fail(f"--url expects the server's address, e.g. http://127.0.0.1:8765, got {a.url!r}")
    if not spool_dir.is_dir():
        return _fail(f"no spool directory {spool_dir}; pass --dir with the one your job spooled to "
                     "(deltascope train: <out>/spool; HttpSink: its spool_dir)")
    if not os.access(spool_dir, os.R_OK | os.W_OK | os.X_OK):
        return _fail(f"cannot read and write {spool_dir} (delivered spools are removed); run as the job's user")
    try:
        done = replay_orphans(spool_dir, url=a.url, each=lambda r: print(r.line(), flush=True))
    except OSError as e:
        return _fail(f"cannot list {spool_dir}: {e}")
    left = [r for r in done if not r.in_use and not r.delivered]
    if not done:
        hint = f" (a run directory? try --dir {spool_dir / 'spool'})" if (spool_dir / "spool").is_dir() else ""
        print(f"nothing to send: no spools in {spool_dir}{hint}")
    if left:
        print(f"deltascope: {len(left)} spool(s) not fully delivered (see above); what remains is kept "
              "for the next flush-spool", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltascope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a DDL model with probes attached")
    add_train_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("serve", help="run the diagnostics server")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--db", help="SQLAlchemy URL (default sqlite:///./deltascope.db)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("demo", help="the main job on embedded defaults: server, training, all sinks")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo directory (default runs/demo)")
    p.add_argument("--max-steps", type=int, default=600, help="training steps (default 600)")
    p.add_argument("--every", type=int, default=5, help="probe statistics every N steps (default 5)")
    p.add_argument("--port", type=int, default=8765, help="server port (a free one if taken)")
    p.add_argument("--resume", action="store_true", help="continue the previous demo run")
    p.add_argument("--keep-serving", action="store_true", help="keep the server up after training")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("flush-spool", help="send the stats that killed jobs spooled while the server was away")
    p.add_argument("--dir", type=Path, help="spool directory (default: HttpSink's, <tmp>/deltascope-spool; "
                   "deltascope train spools to <out>/spool)")
    p.add_argument("--url", help="server address to send to instead of the one each spool recorded "
                   "(the same server reached another way)")
    p.set_defaults(fn=cmd_flush_spool)
    sub.add_parser("report", help="render a run's figures (PNG + HTML); see deltascope report --help",
                   add_help=False)
    sub.add_parser("experiment", help="run a spec's variants x seeds and compare them; see "
                   "deltascope experiment --help", add_help=False)
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "experiment":  # its own parser lives with the experiment code
        from ddl.experiment import main as experiment_main

        return experiment_main(args[1:])
    if args and args[0] == "report":  # its own parser lives with the report code
        from dashboards.report import main as report_main

        return report_main(args[1:])
    a = parser.parse_args(args)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
