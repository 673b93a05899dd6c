"""What a training run writes as it goes: ``metrics.jsonl`` (and wandb), ``train.log`` (a
copy of the console), and console lines from rank 0 only."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from picollm import dist


def log(msg: str, rank_info: Optional[dist.DistInfo] = None) -> None:
    """Print ``msg`` once per run: on rank 0 (or anywhere, without ``rank_info``)."""
    if rank_info is None or rank_info.is_main:
        print(msg, flush=True)


class MetricsLog:
    """metrics.jsonl (every step and every evaluation) and optional wandb, rank 0 only.

    wandb: the run id is kept in ``run_dir/wandb_id``, so a resumed run continues the same
    wandb run. Records are logged against wandb's own step counter (which only grows) with
    the training step as the x-axis metric, because wandb drops records whose step goes
    backwards, as it does after a rollback or a resume from an earlier checkpoint."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.wandb = None
        if enabled and cfg.wandb.mode != "disabled":
            self.wandb = _wandb_run(run_dir, cfg)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(run_dir: Path, cfg: DictConfig):
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    w = cfg.wandb
    run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags),
                     name=w.name or run_dir.name, id=run_id, resume="allow", dir=str(run_dir), mode=w.mode,
                     config=OmegaConf.to_container(cfg, resolve=True))
    id_file.write_text(run_id)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


@contextlib.contextmanager
def console_log(path: Path):
    """Everything this process prints also goes to ``path`` (appended across resumes)."""
    with open(path, "a", buffering=1) as file:
        file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, file), _Tee(sys.stderr, file)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


class _Tee:
    def __init__(self, stream, file) -> None:
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)
