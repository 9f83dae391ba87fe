"""Fault injection through the real CLI: each fault hits a run, the run is continued the way a user (or SLURM's
requeue) would, and its final adapters must equal those of an uninterrupted run bitwise. Prints a tally, then one
JSON line: ``{"faults": N, "runs_lost": 0, ...}``.

    python tests/fault_injection.py            # the whole suite (about 2 minutes on 2 cores)

Faults are injected into the child process itself (``--child FAULT``): a SIGKILL it sends itself at a chosen step or
in the middle of writing a checkpoint, a NaN loss at a chosen step, a SIGUSR1 during start-up or during the final
evaluation. Damage to files is done from outside, between runs. tests/test_fault_injection.py runs this suite.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
TINY = "{img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}"
BASE = ["data.source=synthetic", "data.synthetic_samples=64", "model.name=vit_tiny_patch16_224",
        f"model.kwargs={TINY}", "model.num_classes=10", "data.img_size=32", "data.batch_size=8", "method.name=lora",
        "method.dropout=0.1", "optim.lr=3e-3", f"train.steps={STEPS}", "train.save_every_steps=2",
        "train.keep_checkpoints=3", "train.log_every=1", "train.progress=false", "tracking.enabled=false"]
REQUEUE = 75


# ---------------------------------------------------------------------- the child: the CLI with one fault armed
def child(fault: str, arg: int, cli_args: list[str]) -> int:
    from peft_dist import cli
    from peft_dist.engines.engine import Engine
    from peft_dist.train import checkpoint
    from peft_dist.train.trainer import Trainer

    if fault == "kill_at_step":  # SIGKILL while step `arg` runs (its forward has been done)
        original_step = Trainer.train_step

        def train_step(self, step, batches):
            if step == arg:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_step(self, step, batches)

        Trainer.train_step = train_step
    elif fault == "kill_in_save":  # SIGKILL after the `arg`-th safetensors file of all saves is written
        original_write, calls = checkpoint._write_safetensors, [0]

        def write(path, tensors, metadata=None):
            original_write(path, tensors, metadata)
            calls[0] += 1
            if calls[0] == arg:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._write_safetensors = write
    elif fault == "nan_at_step":  # the `arg`-th forward returns a NaN loss (gradients stay finite)
        original_fb, calls = Engine.forward_backward, [0]

        def forward_backward(self, images, labels, sync=True):
            loss = original_fb(self, images, labels, sync)
            calls[0] += 1
            return loss * float("nan") if calls[0] == arg else loss

        Engine.forward_backward = forward_backward
    elif fault == "usr1_at_start":  # SIGUSR1 as soon as the trainer is set up, before the first step
        original_set_up = Trainer.set_up

        def set_up(self, *a, **kw):
            original_set_up(self, *a, **kw)
            os.kill(os.getpid(), signal.SIGUSR1)

        Trainer.set_up = set_up
    elif fault == "usr1_in_final_eval":  # SIGUSR1 while the final evaluation runs
        original_eval = Trainer.evaluate

        def evaluate(self):
            if self.eval_history == [] and self.start_step < self.total_steps:
                os.kill(os.getpid(), signal.SIGUSR1)
            return original_eval(self)

        Trainer.evaluate = evaluate
    elif fault != "none":
        raise SystemExit(f"unknown fault {fault}")
    return cli.main(["train", *cli_args])


# ---------------------------------------------------------------------- the parent: runs, damage, verdicts
class Run:
    def __init__(self, root: Path):
        self.root = root

    def train(self, out: Path, *extra: str, fault: str = "none", arg: int = 0) -> subprocess.CompletedProcess:
        cmd = [sys.executable, __file__, "--child", fault, str(arg), "--", *BASE, f"train.out_dir={out}", *extra]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def adapter_digest(out: Path) -> str | None:
    """sha256 over the final adapter tensors in name order (the file's header may order its metadata freely)."""
    import torch
    from safetensors.torch import load_file

    path = out / "adapter.safetensors"
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tree_digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def last_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    return lines[-1] if lines else ""


class Planted:
    """Unpickling this creates ``marker``: a checkpoint loader that unpickles anything executes code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def run_suite(work: Path) -> list[dict]:
    runner = Run(work)
    results: list[dict] = []

    def record(fault: str, happened: str, out: Path | None, expect_final: bool = True, ok: bool = True) -> None:
        final = adapter_digest(out) if out is not None else None
        lost = not ok or (expect_final and final != reference)
        results.append({"fault": fault, "what happened": happened, "lost": lost})

    straight = work / "straight"
    r = runner.train(straight)
    assert r.returncode == 0, r.stderr
    reference = adapter_digest(straight)

    # 1. kill -9 in the middle of step 6 (checkpoints at 2 and 4 exist), then resume
    out = work / "kill9"
    first = runner.train(out, fault="kill_at_step", arg=5)
    again = runner.train(out, "train.resume=auto")
    record("kill -9 mid-step", f"killed (status {first.returncode}); resumed: {_resumed_line(again)}", out,
           ok=first.returncode == -signal.SIGKILL and again.returncode == 0)

    # 2. kill -9 while the step-4 checkpoint is being written (rng, model written; optimizer not)
    out = work / "kill_save"
    first = runner.train(out, fault="kill_in_save", arg=5)  # saves write 3 files each: the 5th is step 4's model
    leftover = sorted(p.name for p in (out / "checkpoints").iterdir())
    again = runner.train(out, "train.resume=auto")
    record("kill -9 mid-save", f"killed (status {first.returncode}), left {leftover}; resumed: "
           f"{_resumed_line(again)}", out, ok=first.returncode == -signal.SIGKILL and again.returncode == 0
           and ".tmp-step-00000004" in leftover)

    # an interrupted run with checkpoints at 2, 4 and 6 to damage (killed in step 7)
    damaged_base = work / "damaged_base"
    r = runner.train(damaged_base, fault="kill_at_step", arg=6)
    assert r.returncode == -signal.SIGKILL, r.stderr
    newest = Path("checkpoints") / "step-00000006"

    def damaged_copy(name: str) -> Path:
        copy = work / name
        shutil.copytree(damaged_base, copy)
        return copy

    # 3. a truncated file in the newest checkpoint
    out = damaged_copy("truncated")
    target = out / newest / "optimizer.safetensors"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    again = runner.train(out, "train.resume=auto")
    record("truncated file in newest checkpoint", f"{_warning(again)}; {_resumed_line(again)}", out,
           ok=again.returncode == 0 and "step-00000006" in _warning(again) and "step-00000004" in again.stdout)

    # 4. a deleted file in the newest checkpoint
    out = damaged_copy("deleted")
    (out / newest / "rng-rank0.safetensors").unlink()
    again = runner.train(out, "train.resume=auto")
    record("deleted file in newest checkpoint", f"{_warning(again)}; {_resumed_line(again)}", out,
           ok=again.returncode == 0 and "rng-rank0.safetensors is missing" in _warning(again))

    # 5. planted pickles: beside a good checkpoint's files, and as a whole fake checkpoint
    out = damaged_copy("pickle")
    marker = work / "PICKLE-EXECUTED"
    payload = pickle.dumps(Planted(marker))
    for name in ("trainer.pt", ".metadata", "__0_0.distcp"):
        (out / newest / name).write_bytes(payload)
    fake = out / "checkpoints" / "step-00000007"
    fake.mkdir()
    (fake / "trainer.pt").write_bytes(payload)
    (fake / "COMPLETE").write_text("step 7\n")
    again = runner.train(out, "train.resume=auto")
    explicit = runner.train(work / "pickle_explicit", f"train.resume={fake}")
    record("planted pickle", f"{_warning(again)}; {_resumed_line(again)}; explicit resume: "
           f"status {explicit.returncode}: {last_line(explicit)}", out,
           ok=again.returncode == 0 and explicit.returncode == 2 and not marker.exists()
           and "step-00000006" in again.stdout)

    # 6. a bad manifest in the newest checkpoint
    out = damaged_copy("manifest")
    (out / newest / "manifest.json").write_text('{"format": "peft-dist-checkpoint/1", "step": ')
    again = runner.train(out, "train.resume=auto")
    record("bad manifest", f"{_warning(again)}; {_resumed_line(again)}", out,
           ok=again.returncode == 0 and "not valid JSON" in _warning(again))

    # 7. a repeat run into the finished directory (resume none)
    out = work / "repeat"
    shutil.copytree(straight, out)
    before = tree_digest(out)
    again = runner.train(out, "optim.lr=1e-3")
    record("repeat run into a finished directory", f"status {again.returncode}: {last_line(again)}", out,
           ok=again.returncode == 2 and tree_digest(out) == before)

    # 8. NaN loss at step 5: the run stops before applying it, keeps step 4, and resumes to the same end
    out = work / "nan"
    first = runner.train(out, fault="nan_at_step", arg=5)
    summary = json.loads((out / "summary.json").read_text())
    again = runner.train(out, "train.resume=auto")
    record("NaN at step 5", f"status {first.returncode}: {last_line(first)[:90]}...; summary {summary['status']}; "
           f"resumed: {_resumed_line(again)}", out,
           ok=first.returncode == 2 and summary["status"] == "failed" and again.returncode == 0)

    # 9. SIGUSR1 during start-up: requeue status, nothing saved; the requeued job runs the whole thing
    out = work / "usr1_start"
    first = runner.train(out, "train.resume=auto", fault="usr1_at_start")
    again = runner.train(out, "train.resume=auto")
    record("SIGUSR1 during start-up", f"status {first.returncode} ({_preempted_line(first)}); requeued: "
           f"status {again.returncode}", out, ok=first.returncode == REQUEUE and again.returncode == 0)

    # 10. SIGUSR1 during the final evaluation: checkpoint at the end, requeue; the requeued job only evaluates
    out = work / "usr1_eval"
    first = runner.train(out, "train.resume=auto", fault="usr1_in_final_eval")
    again = runner.train(out, "train.resume=auto")
    record("SIGUSR1 during the final evaluation", f"status {first.returncode} ({_preempted_line(first)}); "
           f"requeued: {_resumed_line(again)}", out,
           ok=first.returncode == REQUEUE and again.returncode == 0 and f"at step {STEPS}" in again.stdout)
    return results


def _resumed_line(r: subprocess.CompletedProcess) -> str:
    found = [ln for ln in r.stdout.splitlines() if ln.startswith("resumed from")]
    where = found[0].split("/checkpoints/")[-1] if found else "not resumed"
    return f"{where}, status {r.returncode}"


def _warning(r: subprocess.CompletedProcess) -> str:
    found = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: skipping damaged checkpoint")]
    return found[0].split("checkpoints/", 1)[0] + "…" + found[0].rsplit("/", 1)[-1] if found else "no warning"


def _preempted_line(r: subprocess.CompletedProcess) -> str:
    found = [ln for ln in r.stdout.splitlines() if ln.startswith("preempted")]
    return found[0] if found else "no preemption line"


def tally(results: list[dict]) -> str:
    width = max(len(r["fault"]) for r in results)
    lines = [f"{'fault':<{width}}  lost  what happened"]
    lines += [f"{r['fault']:<{width}}  {'YES ' if r['lost'] else 'no  '}  {r['what happened']}" for r in results]
    lines.append(f"runs lost: {sum(r['lost'] for r in results)}")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        fault, arg = sys.argv[2], int(sys.argv[3])
        return child(fault, arg, sys.argv[5:])
    with tempfile.TemporaryDirectory(prefix="faults-") as work:
        results = run_suite(Path(work))
    print(tally(results))
    print(json.dumps({"faults": len(results), "runs_lost": sum(r["lost"] for r in results),
                      "lost": [r["fault"] for r in results if r["lost"]]}))
    return 0 if not any(r["lost"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
