"""MLflow tracking from rank 0 only (spec ecosystem.md §6).

Default store: a SQLite file ``mlflow.db`` beside the run directory (MLflow 3.x refuses the old ``./mlruns`` file
store). ``tracking.uri`` may name a server (``http://...``) or another database instead. Params are the resolved
config flattened to ``section.key``; tags carry world size, engine, method and the git commit.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from peft_dist.config import RunConfig


def default_tracking_uri(out_dir: str | Path) -> str:
    return f"sqlite:///{(Path(out_dir).resolve().parent / 'mlflow.db').as_posix()}"


def git_commit() -> str:
    """The commit of the peft-dist checkout (or of the working directory), 'unknown' outside git."""
    for where in (Path(__file__).resolve().parents[2], Path.cwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]  # MLflow's param value limit
    return out


class NullTracker:
    """Used on ranks > 0 and when ``tracking.enabled=false``."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class Tracker(NullTracker):
    def __init__(self, cfg: RunConfig, tags: dict[str, str]):
        import mlflow

        self.mlflow = mlflow
        self.tracking_uri = cfg.tracking.uri or default_tracking_uri(cfg.train.out_dir)
        mlflow.set_tracking_uri(self.tracking_uri)
        if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=self._artifact_location(cfg))
        mlflow.set_experiment(cfg.tracking.experiment)
        run_name = cfg.tracking.run_name or Path(cfg.train.out_dir).name
        self.run = mlflow.start_run(run_name=run_name)
        self.run_id = self.run.info.run_id
        mlflow.log_params(flatten(cfg.to_dict()))
        mlflow.set_tags({**tags, "git_commit": git_commit()})

    def _artifact_location(self, cfg: RunConfig) -> str | None:
        """With a local SQLite store, artifacts go beside the database (MLflow's default, ``./mlruns``, would
        follow the working directory). A server decides for itself."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        db = Path(self.tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            if Path(p).is_file():
                self.mlflow.log_artifact(str(p), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def make_tracker(cfg: RunConfig, is_main: bool, tags: dict[str, str]) -> NullTracker:
    if not (cfg.tracking.enabled and is_main):
        return NullTracker()
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return Tracker(cfg, tags)
