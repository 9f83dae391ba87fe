"""MLflow tracking from rank 0 only (spec ecosystem.md §6).

Default store: a SQLite file ``mlflow.db`` beside the run directory (MLflow 3.x refuses the old ``./mlruns`` file
store). ``tracking.uri`` may name a server (``http://...``) or another database instead. Params are the resolved
config flattened to ``section.key``; tags carry world size, engine, method and the git commit.

A resumed run (every SLURM requeue) continues the MLflow run it started: the run id is kept in the run directory
(:data:`RUN_ID_FILE`), and metrics after the resume step are logged into the same run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from peft_dist.config import RunConfig


RUN_ID_FILE = "mlflow_run.json"
"""In train.out_dir: the MLflow run this run directory logs to (tracking URI, experiment, run id)."""


def saved_run_id(out_dir: str | Path, tracking_uri: str, experiment: str) -> str | None:
    """The run id a previous start of this run directory logged to, if it used the same store and experiment."""
    path = Path(out_dir) / RUN_ID_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("tracking_uri") != tracking_uri or \
            saved.get("experiment") != experiment:
        return None
    run_id = saved.get("run_id")
    return run_id if isinstance(run_id, str) else None


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
    def __init__(self, cfg: RunConfig, tags: dict[str, str], resuming: bool = False):
        import mlflow

        self.mlflow = mlflow
        self.tracking_uri = cfg.tracking.uri or default_tracking_uri(cfg.train.out_dir)
        mlflow.set_tracking_uri(self.tracking_uri)
        if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=self._artifact_location(cfg))
        mlflow.set_experiment(cfg.tracking.experiment)
        run_name = cfg.tracking.run_name or Path(cfg.train.out_dir).name
        previous = saved_run_id(cfg.train.out_dir, self.tracking_uri, cfg.tracking.experiment) if resuming else None
        self.run = self._continue(previous) if previous else None
        self.continued = self.run is not None
        if self.run is None:
            self.run = mlflow.start_run(run_name=run_name)
            mlflow.log_params(flatten(cfg.to_dict()))
        self.run_id = self.run.info.run_id
        # a continued run keeps its params (MLflow refuses to change one); what changed on resume is in the tags
        mlflow.set_tags({**tags, "git_commit": git_commit()})
        self.record(cfg.train.out_dir, cfg.tracking.experiment)

    def _continue(self, run_id: str):
        try:
            return self.mlflow.start_run(run_id=run_id)
        except Exception as e:  # the store lost the run (a deleted database): log to a new one, say so
            print(f"warning: cannot continue MLflow run {run_id} in {self.tracking_uri} ({type(e).__name__}); "
                  "logging to a new run", file=sys.stderr, flush=True)
            return None

    def record(self, out_dir: str | Path, experiment: str) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RUN_ID_FILE}.tmp{os.getpid()}"
        tmp.write_text(json.dumps({"tracking_uri": self.tracking_uri, "experiment": experiment,
                                   "run_id": self.run_id}) + "\n")
        os.replace(tmp, out / RUN_ID_FILE)

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


def make_tracker(cfg: RunConfig, is_main: bool, tags: dict[str, str], resuming: bool = False) -> NullTracker:
    """``resuming``: continue the MLflow run recorded in the run directory, when there is one."""
    if not (cfg.tracking.enabled and is_main):
        return NullTracker()
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return Tracker(cfg, tags, resuming)
