"""A run directory copied to another machine evaluates as it did where it was trained: the method's own files (SPT's
allocation, sparse_masked's sparsity table) travel inside the run, so deleting the originals loses nothing."""
import shutil

import pytest
import torch

from launcher.env import DistEnv
from peft_dist.config import ConfigError
from peft_dist.train.evaluate import restore_run
from peft_dist.train.trainer import Trainer
from test_baselines import fixed_batches, tiny_cfg
from test_spt import mixed_allocation

MATRICES = [f"blocks.{b}.{k}" for b in range(2) for k in ("q", "k", "v", "proj", "fc1", "fc2")]


def sparsity_table(path):
    rows = [f"{name},{0.5 + 0.04 * i:.2f}" for i, name in enumerate(MATRICES)]
    path.write_text("matrix,sparsity\n" + "\n".join(rows) + "\n")
    return path


def method_file(tmp_path, method):
    if method == "spt_lora":
        path, _ = mixed_allocation(tmp_path, "lora")
        return [f"method.allocation={path}", "method.budget=0.004"], path
    path = sparsity_table(tmp_path / "table.csv")
    return [f"method.sparsity_file={path}"], path


@pytest.mark.parametrize("method", ["spt_lora", "sparse_masked"])
def test_a_copied_run_uses_the_method_files_it_kept(tmp_path, method):
    source = tmp_path / "machine-a"
    source.mkdir()
    options, original = method_file(source, method)
    batches = fixed_batches(n=2)
    cfg = tiny_cfg(source, method, "train.steps=4", "optim.lr=1e-2", *options)
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"), batches, batches)
    trainer.fit()
    trained = trainer.model.eval()
    x = batches[0][0]
    with torch.no_grad():
        expected = trained(x)

    copied = tmp_path / "machine-b" / "run"
    shutil.copytree(source / method, copied)
    shutil.rmtree(source)
    cfg, model, _ = restore_run(copied)
    kept = copied / ("spt_allocation.json" if method == "spt_lora" else "sparse_masked_sparsity.csv")
    assert str(kept) == (cfg.method.options["allocation"] if method == "spt_lora"
                         else cfg.method.options["sparsity_file"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)

    kept.unlink()  # neither the copy nor the original: validation names the option and the file
    option = "method.allocation" if method == "spt_lora" else "method.sparsity_file"
    with pytest.raises(ConfigError, match=rf"^{option}: .*{original.name}"):
        restore_run(copied)
