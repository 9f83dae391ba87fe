"""bf16 without losing the delta (issue 17): how ``train.precision`` resolves, and the precision matrix."""
import pytest
import torch

from launcher.env import DistEnv
from peft_dist.engines.engine import resolve_precision


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_native_bf16_support(monkeypatch, native, want):
    """``auto`` asks CUDA for native bf16 (emulated bf16 on pre-Ampere GPUs is slower than fp32): no GPU needed,
    the capability query is replaced."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", torch.device("cuda")) == want
    assert asked == [False]
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"  # explicit: taken as given
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert len(asked) == 1  # the CPU and explicit cases never query the GPU


def test_summary_and_mlflow_record_the_resolved_precision(tmp_path):
    """``auto`` on a CPU runs fp32: the summary and the MLflow tag carry that, the params keep what was asked."""
    import mlflow

    from peft_dist.train.trainer import Trainer
    from test_baselines import fixed_batches, tiny_cfg

    batches = fixed_batches(n=1)
    cfg = tiny_cfg(tmp_path, "lora", "train.precision=auto", "train.steps=1", "tracking.enabled=true",
                   "tracking.experiment=precision")
    summary = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches).fit()
    assert summary["precision"] == "fp32"
    mlflow.set_tracking_uri(summary["mlflow_tracking_uri"])
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.tags["precision"] == "fp32" and run.data.params["train.precision"] == "auto"
