"""Run configuration: one dataclass per component, one YAML section each.

YAML only sets dataclass fields. ``section.key=value`` overrides (values parsed as YAML scalars) apply on top.
Everything is validated before any work starts: an unknown key, a wrong type or an out-of-range value raises
:class:`ConfigError` naming the key and what is allowed.

The ``method`` section is ``name`` plus that method's options; the options are validated against the options
dataclass the method registered (``peft_dist.methods.registry``), so ``method.rank=abc`` fails as early as
``train.steps=-1``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: names the key and the allowed values."""


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"
    """A timm ViT whose blocks hold ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (what the methods adapt),
    e.g. ``vit_base_patch16_224``; anything else is refused when the model is built."""
    checkpoint: str | None = None
    """Local weights: timm/JAX ``.npz``, ``.pth``/``.pt`` (weights only) or ``.safetensors``."""
    num_classes: int = 10
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm ``create_model`` kwargs, e.g. ``{img_size: 32, patch_size: 8, depth: 2}`` for test models."""

    def validate(self) -> None:
        _check_range("model.num_classes", self.num_classes, low=1)
        _check_range("model.drop_path_rate", self.drop_path_rate, low=0.0, high=1.0)


@dataclass
class MethodConfig:
    name: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)
    """The method's own options (validated against its registered options dataclass)."""

    def validate(self) -> None:
        from peft_dist.methods.registry import method_names, resolve_options

        if self.name not in method_names():
            raise ConfigError(f"method.name: unknown method {self.name!r}; allowed: {', '.join(method_names())}")
        resolve_options(self.name, self.options)


@dataclass
class DataConfig:
    """Where batches come from (``peft_dist.data``; spec ecosystem §5)."""

    source: Literal["shards", "synthetic"] = "shards"
    """``shards``: webdataset tar shards written by ``peft-dist shards``; ``synthetic``: random tensors (tests)."""
    path: str | None = None
    """Directory holding the shards and their ``_info.json`` (``source=shards``)."""
    train_split: str = "train"
    eval_split: str = "test"
    batch_size: int = 32
    """Per-rank micro-batch size; the global batch is batch_size x world_size x train.grad_accum. With
    ``global_batch_size`` set: the largest micro-batch a rank may take (derived per world size)."""
    global_batch_size: int = 0
    """Images per optimizer step over all ranks (0: off, ``batch_size`` is per rank). When set, the per-rank batch
    is global_batch_size / world size, taken as ``train.grad_accum`` micro-batches of at most ``batch_size`` (the
    fewest that fit, at least the configured grad_accum): a recipe means the same run on 1 or 64 ranks
    (``resolve_global_batch``)."""
    eval_batch_size: int = 64
    num_workers: int = 2
    """DataLoader worker processes per rank (0: decode in the training process)."""
    img_size: int = 224
    augment: Literal["none", "flip", "randaug"] = "none"
    """Train-time augmentation; VTAB-1k recipes use none, FGVC recipes use flip (random resized crop + flip)."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel normalisation mean (ImageNet's by default; the IN-21k ViTs use 0.5, 0.5, 0.5)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel normalisation std (ImageNet's by default; the IN-21k ViTs use 0.5, 0.5, 0.5)."""
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    """Resampling filter of the resize / random-resized-crop transforms."""
    transform: Literal["custom", "vtab", "fgvc_snell", "fgvc_spt_arc"] = "custom"
    """``custom``: built from ``augment`` / ``interpolation``. The others are the official pipelines
    (``peft_dist.data.transforms``; they ignore ``augment`` and ``interpolation``): ``vtab`` squash-resize bicubic,
    train and eval; ``fgvc_snell`` timm ``create_transform(is_training=True)`` with its defaults (random-resized
    crop, flip, colour jitter 0.4), eval resize 256 bilinear + centre crop; ``fgvc_spt_arc`` resize 256 → random
    crop + flip, eval resize 256 → centre crop."""
    sampling: Literal["auto", "exact", "resampled"] = "auto"
    """``exact`` (what ``auto`` means for shards written by ``peft-dist shards``, whose sample counts are known):
    every epoch draws each training sample once, from a permutation seeded by ``train.seed`` and the epoch, dealt
    over the ranks like torch's DistributedSampler and read by index. ``resampled``: streaming for web-scale shards
    without an index — endless epoch-seeded passes over the shards, each rank cut at its share of batches, so a
    sample may be drawn twice or not at all in an epoch (sampling with replacement at the shard level)."""
    remainder: Literal["pad", "drop"] = "pad"
    """Exact sampling when the split does not divide by the world size: ``pad`` repeats the first samples of the
    epoch's permutation (counted in the summary), ``drop`` leaves the last ones out of that epoch."""
    shuffle_buffer: int = 1000
    """``resampled`` only: train samples shuffled together (per loader worker, capped at what the worker yields in
    an epoch); 0 or 1 reads each shard in its stored order."""
    skip_corrupt: bool = False
    """Skip (and count) samples whose image bytes or label cannot be decoded instead of failing."""
    synthetic_samples: int = 256
    """Train samples of the synthetic source (eval uses a quarter)."""
    synthetic_classes: int = 10
    """Classes of the synthetic source (set model.num_classes to match)."""
    synthetic_seed: int = 0
    """Seeds the synthetic data set itself (class patterns and samples; train.seed only orders it)."""

    def require_path(self) -> None:
        """Checked where the data is read (the trainer, before it builds the model), so that a dry run or a memory
        estimate of a config without a data path works."""
        if self.source == "shards" and not self.path:
            raise ConfigError("data.path: required when data.source=shards (a directory written by `peft-dist shards`)")

    def validate(self) -> None:
        for key in ("batch_size", "eval_batch_size", "img_size", "synthetic_samples", "synthetic_classes"):
            _check_range(f"data.{key}", getattr(self, key), low=1)
        _check_range("data.global_batch_size", self.global_batch_size, low=0)
        _check_range("data.num_workers", self.num_workers, low=0)
        _check_range("data.shuffle_buffer", self.shuffle_buffer, low=0)
        for i, s in enumerate(self.std):
            _check_range(f"data.std[{i}]", s, low=0.0, low_open=True)


def resolve_global_batch(cfg: "RunConfig", world_size: int) -> "RunConfig":
    """Set ``data.batch_size`` and ``train.grad_accum`` from ``data.global_batch_size`` for ``world_size`` ranks, in
    place (nothing when it is 0). Each rank takes global / world images per optimizer step, in the fewest
    micro-batches of at most ``data.batch_size`` (and at least ``train.grad_accum``) that divide it evenly. The same
    world size gives the same result again, so resolving twice (CLI, then the trainer) is harmless."""
    total = cfg.data.global_batch_size
    if not total:
        return cfg
    if total % world_size:
        raise ConfigError(f"data.global_batch_size: {total} images do not divide over {world_size} ranks; use a "
                          f"multiple of {world_size}, or a world size that divides {total}")
    per_rank = total // world_size
    if cfg.train.grad_accum > per_rank:
        raise ConfigError(f"train.grad_accum: {cfg.train.grad_accum} micro-batches exceed the {per_rank} images per "
                          f"rank (data.global_batch_size {total} over {world_size} ranks)")
    accum = max(cfg.train.grad_accum, -(-per_rank // cfg.data.batch_size))
    while per_rank % accum:
        accum += 1
    cfg.data.batch_size, cfg.train.grad_accum = per_rank // accum, accum
    return cfg


@dataclass
class DistConfig:
    engine: str = "single"
    """Which engine parallelizes the model; see ``peft_dist.engines.engine_names()``."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; ``auto`` is NCCL when CUDA is available, gloo otherwise."""
    timeout_s: int = 600
    """Collective timeout: a failed rank makes the others exit instead of hanging forever."""
    # --- fsdp2
    shard_backbone: bool = True
    """fsdp2: shard every block's parameters over the ranks; false replicates them (DDP-like, for small models)."""
    reshard_after_forward: bool = True
    """fsdp2: free the all-gathered block weights after forward (re-gather in backward) to save memory."""
    mesh: list[int] | None = None
    """fsdp2: ``[replicate, shard]``, a 2-D device mesh (HSDP): parameters sharded within each group of ``shard``
    consecutive ranks, replicated across the ``replicate`` groups; the product must be the world size. Ranks fill
    the mesh row-major, so a group is ``shard`` consecutive ranks: with ``shard`` = GPUs per node each group is one
    node, every block's all-gather stays inside it and only the adapters' gradients cross nodes (an all-reduce).
    null: one dimension over every rank (``shard_backbone``)."""
    frozen_dtype: Literal["fp32", "bf16"] = "fp32"
    """fsdp2, deepspeed: storage dtype of the frozen backbone weights under bf16 compute (adapters always stay
    fp32); deepspeed stores only the Linear/Conv weights in bf16."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (non-reentrant checkpointing)."""
    init: Literal["sharded", "full"] = "sharded"
    """fsdp2, deepspeed ZeRO-3: ``sharded`` builds the backbone on the meta device, shards it, then fills each rank's
    shards only, tensor by tensor, with the values the plain build gives (``peft_dist.models.materialize``); ``full``
    builds and loads the whole model on every rank first. ZeRO-1/2 and the other engines always build in full."""
    # --- deepspeed
    zero_stage: int = 2
    """deepspeed: ZeRO stage 1, 2 or 3."""
    deepspeed_config: str | None = None
    """deepspeed: a user JSON merged over the generated config (its keys win)."""

    def validate(self) -> None:
        from peft_dist.engines import engine_names

        if self.engine not in engine_names():
            raise ConfigError(f"dist.engine: unknown engine {self.engine!r}; allowed: {', '.join(engine_names())}")
        _check_range("dist.timeout_s", self.timeout_s, low=1)
        check_choice("dist.zero_stage", self.zero_stage, (1, 2, 3))
        if self.mesh is not None:
            self._check_mesh()
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ConfigError(f"dist.deepspeed_config: file not found: {self.deepspeed_config}")

    def _check_mesh(self) -> None:
        """What can be checked before the world size is known (the product is checked where it is: the engine, the
        dry run, the estimator)."""
        if len(self.mesh) != 2 or any(n < 1 for n in self.mesh):
            raise ConfigError(f"dist.mesh: got {self.mesh!r}; allowed: null or [replicate, shard], two positive "
                              "integers, e.g. [2, 8] for 2 nodes of 8 GPUs")
        if self.engine != "fsdp2":
            raise ConfigError(f"dist.mesh: got {self.mesh!r} with dist.engine={self.engine}; allowed: null, or a "
                              "[replicate, shard] mesh with dist.engine=fsdp2")
        if not self.shard_backbone and self.mesh[1] != 1:
            raise ConfigError(f"dist.mesh: got {self.mesh!r} with dist.shard_backbone=false (replicate every "
                              f"parameter); allowed: a shard size of 1, e.g. [{self.mesh[0] * self.mesh[1]}, 1], or "
                              "dist.shard_backbone=true")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    """SGD only."""
    schedule: Literal["cosine", "timm_epoch"] = "cosine"
    """``cosine``: linear warm-up then cosine, updated every optimizer step. ``timm_epoch``: timm's
    ``CosineLRScheduler`` (t_initial = epochs, warmup_t = ``warmup_epochs``, warmup_lr_init = ``warmup_start_lr``,
    lr_min = ``min_lr``) stepped with the epoch index after each epoch, as SNELL/SNELLA/SPT's scripts do: epoch e
    trains at the value for e-1 (``peft_dist.train.schedule``)."""
    warmup_steps: int = 0
    """Linear warm-up from ``warmup_start_lr`` to ``lr``; then cosine to ``min_lr`` (``cosine`` only)."""
    warmup_epochs: float = 0.0
    """Alternative to warmup_steps, in epochs (converted with the loader's steps per epoch); ``timm_epoch``:
    timm's ``warmup_t`` (fractional or 0 allowed; the papers use 10)."""
    warmup_start_lr: float = 0.0
    """The warm-up's first lr (timm's ``warmup_lr_init``)."""
    min_lr: float = 0.0
    """The cosine's final lr (timm's ``lr_min``)."""
    warmup_prefix: bool = False
    """``timm_epoch``: timm's ``warmup_prefix`` (start the cosine after the warm-up); the scripts leave it off."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def validate(self) -> None:
        _check_range("optim.lr", self.lr, low=0.0, low_open=True)
        _check_range("optim.weight_decay", self.weight_decay, low=0.0)
        for i, b in enumerate(self.betas):
            _check_range(f"optim.betas[{i}]", b, low=0.0)
            if b >= 1.0:  # a decay of 1 never forgets: Adam's bias correction divides by zero
                raise ConfigError(f"optim.betas[{i}]: got {b!r}; allowed: >= 0.0 and < 1.0")
        _check_range("optim.eps", self.eps, low=0.0, low_open=True)
        _check_range("optim.warmup_steps", self.warmup_steps, low=0)
        _check_range("optim.warmup_epochs", self.warmup_epochs, low=0.0)
        _check_range("optim.min_lr", self.min_lr, low=0.0)
        _check_range("optim.warmup_start_lr", self.warmup_start_lr, low=0.0)
        _check_range("optim.grad_clip", self.grad_clip, low=0.0)
        if self.warmup_steps and self.warmup_epochs:
            raise ConfigError("optim.warmup_steps / optim.warmup_epochs: set one of them, not both")
        if self.schedule == "timm_epoch" and self.warmup_steps:
            raise ConfigError(f"optim.warmup_steps: got {self.warmup_steps}; allowed with optim.schedule=timm_epoch: "
                              "0 (timm counts its warm-up in epochs: set optim.warmup_epochs, fractional allowed)")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 0
    """Optimizer steps; 0 means use ``epochs``."""
    epochs: int = 1
    seed: int = 0
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on a CUDA GPU with native bf16, fp32 otherwise (the summary's ``precision`` and the MLflow tag
    say which). ``fp16``: fp16 autocast with a gradient scaler (``torch.amp.GradScaler``; the official ``--amp``),
    adapters and optimizer state stay fp32; dist.engine single or ddp."""
    ema_decay: float | None = None
    """Keep an fp32 exponential moving average of the trainable tensors, updated after every optimizer step
    (SNELLA's FGVC scripts: timm's ModelEma, 0.9999); evaluation then reports live, EMA and their max. null: off."""
    log_every: int = 10
    eval_every_epochs: int = 0
    """Evaluate every N epochs during training (0: only at the end)."""
    label_smoothing: float = 0.0
    progress: bool = True
    """tqdm progress bar on rank 0."""
    protocol: Literal["standard", "paper"] = "standard"
    """``standard``: report the last epoch on the eval split (select hyper-parameters on val200 beforehand).
    ``paper``: also evaluate on the eval split every ``eval_every_epochs`` and in each of the last 10 epochs and
    report the best — the papers' test-set selection, labelled as such everywhere it appears."""
    save_every_steps: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: only at the end and on preemption)."""
    save_every_minutes: float | None = None
    """Write a checkpoint when this many minutes have passed since the last one (checked at step ends, agreed by
    every rank). ``null`` (default): 30 under SLURM (a node failure then loses at most 30 minutes), off elsewhere;
    0: off."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm: ``stop`` the run (the last good checkpoint stays; summary and MLflow say
    failed), or ``skip`` that step (nothing applied, counted as ``nonfinite_steps_skipped``; the run still stops
    after ``max_nonfinite_skips`` in a row)."""
    max_nonfinite_skips: int = 10
    keep_checkpoints: int = 2
    resume: str = "none"
    """``none``, ``auto`` (the newest complete checkpoint in out_dir/checkpoints, if any) or a checkpoint path.
    With ``none``, an ``out_dir`` that holds a run is refused unless ``overwrite`` is set."""
    overwrite: bool = False
    """With ``resume: none``: replace the run found in ``out_dir`` (its config, metrics, summary, checkpoints and
    outputs are removed once every check of the new run has passed)."""

    def validate(self) -> None:
        _check_range("train.steps", self.steps, low=0)
        _check_range("train.epochs", self.epochs, low=0)
        if self.steps == 0 and self.epochs == 0:
            raise ConfigError("train.steps / train.epochs: one of them must be > 0")
        _check_range("train.grad_accum", self.grad_accum, low=1)
        _check_range("train.log_every", self.log_every, low=1)
        _check_range("train.eval_every_epochs", self.eval_every_epochs, low=0)
        _check_range("train.label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        _check_range("train.save_every_steps", self.save_every_steps, low=0)
        _check_range("train.keep_checkpoints", self.keep_checkpoints, low=1)
        if self.save_every_minutes is not None:
            _check_range("train.save_every_minutes", self.save_every_minutes, low=0.0)
        _check_range("train.max_nonfinite_skips", self.max_nonfinite_skips, low=1)
        if self.ema_decay is not None:
            _check_range("train.ema_decay", self.ema_decay, low=0.0)
            if self.ema_decay >= 1.0:  # a decay of 1 never moves off the initial copy
                raise ConfigError(f"train.ema_decay: got {self.ema_decay!r}; allowed: >= 0.0 and < 1.0, or null")

    def checkpoint_interval_minutes(self, environ=None) -> float:
        """``save_every_minutes`` resolved: ``null`` is 30 inside a SLURM job, 0 (off) elsewhere."""
        import os

        if self.save_every_minutes is not None:
            return float(self.save_every_minutes)
        return 30.0 if "SLURM_JOB_ID" in (os.environ if environ is None else environ) else 0.0


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None
    """MLflow tracking URI; default: a SQLite file ``mlflow.db`` beside the run directory."""
    experiment: str = "peft-dist"
    run_name: str | None = None


@dataclass
class MemoryConfig:
    enabled: bool = True
    """Record the per-rank memory report (``memory.json``) during the run."""
    snapshot_steps: int = 0
    """CUDA only: record the allocator history of the first N optimizer steps and write it to
    ``memory_snapshots/`` for https://pytorch.org/memory_viz (0: off; recording slows those steps)."""
    snapshot_on_oom: bool = True
    """CUDA only: write the allocator state to ``memory_snapshots/`` when an allocation fails."""
    snapshot_max_entries: int = 100_000
    """Allocation events kept by the history recorder (``snapshot_steps``)."""
    cpu_tracking: bool = True
    """CPU runs: measure the phase peaks and activations from live tensor storage (a dispatch-mode tracker; its
    bookkeeping time is written in the report's notes). false: only the process's peak RSS."""
    cpu_tracked_steps: int = 5
    """CPU runs: the tracker follows the first N optimizer steps of the run (of each resumed part too) and its first
    evaluation, then steps aside (0: every step and evaluation). Later steps repeat the same shapes and so the same
    peaks, while the bookkeeping costs a share of each tracked step (a third of a tiny ViT's step, a few % of
    ViT-B's)."""

    def validate(self) -> None:
        _check_range("memory.snapshot_steps", self.snapshot_steps, low=0)
        _check_range("memory.cpu_tracked_steps", self.cpu_tracked_steps, low=0)
        _check_range("memory.snapshot_max_entries", self.snapshot_max_entries, low=1)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def validate(self) -> "RunConfig":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            if f.name == "method":
                section = {"name": section["name"], **section["options"]}
            out[f.name] = _plain(section)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTION_TYPES = {
    "model": ModelConfig, "method": MethodConfig, "data": DataConfig, "dist": DistConfig,
    "optim": OptimConfig, "train": TrainConfig, "tracking": TrackingConfig, "memory": MemoryConfig,
}


# ----------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML file(s) (later files deep-merge over earlier ones, e.g. backbone + method + task), apply
    ``section.key=value`` overrides, build and validate the dataclasses."""
    paths = [] if path is None else (list(path) if isinstance(path, (list, tuple)) else [path])
    raw: dict[str, Any] = {}
    for one in paths:
        _deep_merge(raw, _read_yaml(Path(one)))
    from_files = dict(raw["method"]) if isinstance(raw.get("method"), dict) else {}
    for item in overrides or []:
        apply_override(raw, item)
    drop_options_of_a_switched_method(raw, from_files, overrides or [])
    return config_from_dict(raw)


def drop_options_of_a_switched_method(raw: dict[str, Any], from_files: dict[str, Any], overrides: list[str]) -> None:
    """``method.name=B`` on the command line over files configuring method A: A's options that B does not take are
    dropped (and logged), so one recipe serves to compare methods; B's own options, and every ``method.*`` given
    on the command line, stay and are validated."""
    method = raw.get("method")
    if not isinstance(method, dict) or not from_files:
        return
    new_name = method.get("name", "lora")
    if from_files.get("name", "lora") == new_name:
        return
    from peft_dist.methods.registry import method_class, method_names

    if new_name not in method_names():
        return  # validation names the unknown method
    accepted = {f.name for f in dataclasses.fields(method_class(new_name).options_cls)}
    overridden = {item.partition("=")[0].strip().split(".")[1] for item in overrides
                  if item.partition("=")[0].strip().startswith("method.")}
    dropped = [k for k in method if k != "name" and k not in accepted and k not in overridden]
    for key in dropped:
        del method[key]
    if dropped:
        import logging

        logging.getLogger(__name__).warning(
            "method.name=%s (command line): dropped the config file's %s options %s, which %s does not take",
            new_name, from_files.get("name", "lora"), ", ".join(dropped), new_name)


def _read_yaml(p: Path) -> dict[str, Any]:
    return read_yaml_mapping(p, "config file not found", f"a mapping of sections ({', '.join(_SECTION_TYPES)})")


def read_yaml_mapping(p: Path, missing: str, expected: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file (``missing: p`` when it does not exist)."""
    if not p.is_file():
        raise ConfigError(f"{missing}: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a YAML text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be {expected}")
    return data


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong and where."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f"{getattr(error, 'problem', None) or type(error).__name__} (line {mark.line + 1}, column " \
               f"{mark.column + 1})"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    position = getattr(error, "position", None)
    return f"{first} (character {position + 1})" if isinstance(position, int) else first


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        switches_method = k == "method" and isinstance(v, dict) and "name" in v and \
            isinstance(into.get(k), dict) and into[k].get("name") != v["name"]
        if isinstance(v, dict) and isinstance(into.get(k), dict) and k != "kwargs" and not switches_method:
            _deep_merge(into[k], v)
        else:
            into[k] = v


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict; the value is parsed as a YAML scalar/list."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {item!r}: expected section.key=value (sections: {', '.join(_SECTION_TYPES)})")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; allowed: {', '.join(_SECTION_TYPES)}")
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {type(values).__name__}")
        if cls is MethodConfig:
            values = dict(values)
            sections[name] = MethodConfig(name=_coerce("method.name", values.pop("name", "lora"), str),
                                          options=values)
        else:
            sections[name] = build_dataclass(cls, values, prefix=name)
    return RunConfig(**sections).validate()


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate ``cls`` from a dict, type-checking and coercing each field; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}: unknown key; allowed keys of {prefix}: {', '.join(names)}")
    kwargs = {k: _coerce(f"{prefix}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- types
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(repr(a) for a in args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}; expected a list ({_type_name(tp)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: got {len(value)} values; expected {len(args)} ({_type_name(tp)})")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        seq = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected a mapping")
        vt = args[1] if args else Any
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-3" as a string; accept numeric strings for floats.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected a string")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        return build_dataclass(tp, value, key)
    return value


def _check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison; inf is no setting
        raise ConfigError(f"{key}: got {value!r}; allowed: a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        allowed = " and ".join(s for s in (lo, hi) if s)
        raise ConfigError(f"{key}: got {value!r}; allowed: {allowed}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Public form of the range check for method options' ``validate``."""
    _check_range(key, value, low, high, low_open)


def check_choice(key: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
