"""``peft-dist export --format peft``: a LoRA run as a Hugging Face ``peft`` adapter directory.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` in the layout ``peft`` itself saves
(``PeftModel.save_pretrained``), so ``PeftModel.from_pretrained(timm_model, directory)`` loads it onto the same timm
backbone (peft adapts any ``nn.Module`` whose ``target_modules`` name Linear layers) and gives the same logits.
``peft`` itself is not needed to write it, only to read it.

Our LoRA adapts q, k and v as independent row slices of timm's fused ``attn.qkv`` Linear; peft has one low-rank
update per Linear. The slices are expressed exactly as one ``attn.qkv`` update of rank (number of slices) x r: the
slices' A matrices stacked, their B matrices placed block-diagonally on their rows (zeros elsewhere, so a slice
still changes only its own rows), and ``lora_alpha`` multiplied by the number of slices so that peft's
``lora_alpha / r`` stays our ``alpha / rank``. The trained, re-sized classification head travels as one of peft's
``modules_to_save``. Before anything is written, every exported update is checked against the method's own merge
(``merged()``): a LoRA parameterisation the peft layout cannot express is refused, never exported approximately.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from peft_dist.config import ConfigError

EXPORT_FORMATS = ("merged", "peft")
PEFT_FORMAT_METHODS = ("lora",)
UNMERGEABLE_METHODS = ("adapter", "spt_adapter")
"""Methods whose modules cannot fold into the backbone (a GELU bottleneck): no export format at all."""
PEFT_KEY_PREFIX = "base_model.model."
"""Where ``PeftModel`` keeps the wrapped model; peft's saved keys carry it."""
BASE_MODEL_FILE = "base_model.json"
"""Beside the adapter: how to create the timm backbone the adapter is loaded onto."""

_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<factor>[AB])\.(?P<target>\w+)$")


def supported_formats(method: str) -> tuple[str, ...]:
    if method in UNMERGEABLE_METHODS:
        return ()
    return ("peft", "merged") if method in PEFT_FORMAT_METHODS else ("merged",)


def check_export_format(method: str, export_format: str, run_dir: str | Path) -> None:
    """One line naming the formats this run's method exports to, when ``export_format`` is not one of them."""
    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"export --format: unknown format {export_format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    formats = supported_formats(method)
    if export_format in formats:
        return
    if not formats:
        raise ConfigError(f"export --format {export_format}: run {run_dir} trained {method}, which has no export "
                          "format (its bottleneck modules are non-linear and do not fold into the backbone); "
                          "evaluate it with peft-dist eval --run")
    raise ConfigError(f"export --format {export_format}: run {run_dir} trained {method}, which exports with "
                      f"--format {' or '.join(formats)} (peft: {', '.join(PEFT_FORMAT_METHODS)} only)")


@dataclass
class PeftLinearUpdate:
    """One Linear's LoRA update in peft's layout: ``ΔW = (lora_alpha / rank) · B · A``."""

    path: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    lora_alpha: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


def peft_updates(model: nn.Module, trained: dict[str, torch.Tensor], alpha: float, rank: int,
                 head_names: set[str]) -> list[PeftLinearUpdate]:
    """Our per-target factors (``<linear>.lora_A.<target>``, ``<linear>.lora_B.<target>``), grouped by Linear: each
    Linear's targets become one update, A's stacked in row order, B's block-diagonal on their rows."""
    from peft_dist.models.targets import TARGET_NAMES, base_linear, find_targets

    rows = {(t.path, t.name): t.rows for t in find_targets(model, TARGET_NAMES)}
    factors: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in trained.items():
        if key in head_names:
            continue
        match = _LORA_KEY.match(key)
        if match is None or (match["path"], match["target"]) not in rows:
            raise ConfigError(f"export --format peft: trained tensor {key} has no Hugging Face peft LoRA "
                              "equivalent (expected <linear>.lora_A.<target> / .lora_B.<target> and the head)")
        factors.setdefault(match["path"], {}).setdefault(match["target"], {})[match["factor"]] = tensor
    updates = []
    for path, by_target in factors.items():
        out_features = base_linear(model.get_submodule(path)).out_features
        ordered = sorted(by_target.items(), key=lambda item: rows[(path, item[0])].start)
        lora_A = torch.cat([f["A"] for _, f in ordered], dim=0)
        lora_B = torch.zeros(out_features, lora_A.shape[0], dtype=lora_A.dtype)
        column = 0
        for target, f in ordered:
            target_rank = f["A"].shape[0]
            lora_B[rows[(path, target)], column:column + target_rank] = f["B"]
            column += target_rank
        if lora_A.shape[0] % rank:
            raise ConfigError(f"export --format peft: {path} has rank {lora_A.shape[0]}, not a multiple of "
                              f"method.rank={rank}")
        # peft scales by lora_alpha / r: n slices of rank r keep our alpha / rank with n·alpha over n·rank, which
        # is the same float as alpha / rank (both integers are exact, the quotient is rounded once)
        slices = lora_A.shape[0] // rank
        updates.append(PeftLinearUpdate(path, lora_A.contiguous(), lora_B.contiguous(), alpha * slices))
    return updates


def check_against_merge(model: nn.Module, updates: list[PeftLinearUpdate]) -> None:
    """Each exported update, applied as peft applies it, must give the weight the method's own merge gives."""
    for update in updates:
        module = model.get_submodule(update.path)
        merged = module.merged().weight.detach().double()
        base = module.base.weight.detach().double()
        ours = base + (update.lora_alpha / update.rank) * (update.lora_B.double() @ update.lora_A.double())
        tolerance = 1e-6 * max(1.0, float(base.abs().max()))
        error = float((ours - merged).abs().max())
        if error > tolerance:
            raise ConfigError(f"export --format peft: the peft layout of {update.path} differs from the method's "
                              f"merge by {error:.3g} (max |ΔW| error); this LoRA parameterisation cannot be exported "
                              "to peft exactly")


def _common_suffix(paths: list[str]) -> dict[str, list[str]]:
    """``blocks.3.attn.qkv`` → ``attn.qkv``: the module name peft's ``target_modules`` matches in every block."""
    by_suffix: dict[str, list[str]] = {}
    for path in paths:
        suffix = re.sub(r"^blocks\.\d+\.", "", path)
        by_suffix.setdefault(suffix, []).append(path)
    return by_suffix


def adapter_config(rank: int, alpha: float, dropout: float, updates: list[PeftLinearUpdate],
                   head_modules: list[str]) -> dict:
    """``adapter_config.json``: peft's defaults for what we do not set; one r / lora_alpha for single-slice
    Linears, and rank_pattern / alpha_pattern for the fused qkv where several slices share it."""
    by_path = {u.path: u for u in updates}
    rank_pattern, alpha_pattern = {}, {}
    for suffix, paths in _common_suffix(list(by_path)).items():
        shapes = {(by_path[p].rank, by_path[p].lora_alpha) for p in paths}
        if len(shapes) != 1:
            raise ConfigError(f"export --format peft: the {suffix} layers differ in rank across blocks "
                              f"({sorted(shapes)}); peft's rank_pattern needs one rank per module name")
        (module_rank, module_alpha), = shapes
        if module_rank != rank:
            rank_pattern[suffix], alpha_pattern[suffix] = module_rank, module_alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        # not the timm name: peft would look it up on the Hugging Face hub; base_model.json says what to build
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(_common_suffix(list(by_path))),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": head_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no half-written temporary behind


def export_peft(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's LoRA adapters and head as a peft adapter directory (default ``RUN/peft``); returns it."""
    import peft_dist
    from peft_dist.methods.base import head_parameter_names
    from peft_dist.train.evaluate import load_run_config, restore_run

    out = Path(out) if out else Path(run_dir) / "peft"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export --out: {out} is a file; --format peft writes a directory "
                          "(adapter_config.json + adapter_model.safetensors)")
    check_export_format(load_run_config(run_dir).method.name, "peft", run_dir)  # before the model is built
    cfg, model, method = restore_run(run_dir)
    rank, alpha = int(method.options.rank), float(method.options.alpha)
    head_names = head_parameter_names(model)
    trained = {k: v.detach().cpu() for k, v in peft_dist.trainable_state_dict(model).items()}
    updates = peft_updates(model, trained, alpha, rank, head_names)
    check_against_merge(model, updates)
    head_modules = sorted({name.rsplit(".", 1)[0] for name in head_names})
    tensors = {}
    for update in updates:
        tensors[f"{PEFT_KEY_PREFIX}{update.path}.lora_A.weight"] = update.lora_A
        tensors[f"{PEFT_KEY_PREFIX}{update.path}.lora_B.weight"] = update.lora_B
    for name in sorted(head_names):
        tensors[f"{PEFT_KEY_PREFIX}{name}"] = trained[name].contiguous()
    config = adapter_config(rank, alpha, float(getattr(method.options, "dropout", 0.0)), updates, head_modules)
    base = {"timm_model": cfg.model.name, "num_classes": cfg.model.num_classes, "kwargs": cfg.model.kwargs,
            "checkpoint": cfg.model.checkpoint,
            "load": "model = timm.create_model(timm_model, num_classes=num_classes, **kwargs); load the checkpoint's "
                    "weights (the head is in the adapter); peft.PeftModel.from_pretrained(model, this_directory)"}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"export --out: cannot create the directory {out}: "
                          f"{'a file of that name exists' if isinstance(e, FileExistsError) else e.strerror or e}") \
            from None
    _atomic_write(out / "adapter_model.safetensors",
                  lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out / "adapter_config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    _atomic_write(out / BASE_MODEL_FILE, lambda p: p.write_text(json.dumps(base, indent=2) + "\n"))
    return out
