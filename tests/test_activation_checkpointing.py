"""dist.activation_checkpointing recomputes each block in backward under every engine without changing the math."""
import pytest
import torch

from conftest import TINY_VIT
from launcher.env import DistEnv
from peft_dist.config import load_config
from peft_dist.train.trainer import Trainer


def train_adapters(tmp_path, checkpointing: bool, method: str):
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    cfg = load_config(None, ["model.name=vit_tiny_patch16_224", "model.num_classes=5", f"model.kwargs={kw}",
                             "data.source=synthetic", f"method.name={method}", "train.steps=3", "optim.lr=1e-2",
                             f"dist.activation_checkpointing={str(checkpointing).lower()}", "train.progress=false",
                             f"train.out_dir={tmp_path / str(checkpointing)}", "tracking.enabled=false"])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches[:1])
    recomputed = []
    for block in trainer.engine.module.blocks:  # count forwards: recomputation runs each block twice per step
        block.forward = counting(block.forward, recomputed)  # (forward hooks do not fire on recomputation)
    trainer.fit()
    return trainer.engine.state_dict(), len(recomputed), trainer.engine.module.grad_checkpointing


def counting(forward, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("method", ["lora", "snell"])
def test_checkpointing_recomputes_blocks_and_keeps_the_result(tmp_path, method):
    plain, plain_forwards, plain_flag = train_adapters(tmp_path, False, method)
    ckpt, ckpt_forwards, ckpt_flag = train_adapters(tmp_path, True, method)
    assert ckpt_flag and not plain_flag
    assert ckpt_forwards == plain_forwards + 3 * 2  # each of the 2 blocks ran again in each step's backward
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
