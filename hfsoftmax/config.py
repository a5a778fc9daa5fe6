"""Typed configuration: dataclasses, YAML files layered on a base, and ``key=value`` overrides.

A config file is YAML whose top-level keys are the sections below. It may name a file to layer on::

    _base_: base.yaml          # relative to this file; merged first, this file wins
    head:
      name: hf
      num_active: 100

Overrides on the command line use dotted keys: ``train.steps=200 head.margin=arcface``. Values are
parsed as YAML scalars (``true``, ``0.1``, ``[30, 60]``) and checked against the field's type.
An unknown key or a value of the wrong type raises :class:`ConfigError` naming the key (and the
file it came from), so a misspelling never silently trains something else.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from paramserver.open import IndexSpec, StoreSpec, defaults

# The store's and its index's defaults are declared once, in paramserver/open.py; the config's
# matching keys take theirs from there, so the trainer and the server's flags cannot disagree.
_STORE, _INDEX = defaults(StoreSpec), defaults(IndexSpec)


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass
class DataConfig:
    path: str = ""                 # "" -> the built-in synthetic identities; else a .rec folder, image list, folder
                                   # of class folders, or features file (.npy / .npz of [n, d_in]; README "Data")
    labels: str = ""               # features .npy: its labels (int .npy [n], or text, one integer per line)
    val_path: str = ""             # held-out list or .rec of training identities: top-1/top-5 over all K every
                                   # train.eval_every steps and at the end; "" -> path's val_list.txt (rec2img), "none" -> off
    image_size: int = 32           # input side; face ResNets and Hynet expect 112
    num_workers: int = 0           # DataLoader worker processes (disk datasets; started once per run)
    prefetch_factor: int = 2       # batches each worker keeps in flight (num_workers > 0)
    skip_bad: bool = False         # corrupt records: False -> error naming the record; True -> counted skip
    flip: bool = True              # random horizontal flips of training images (faces); false where a mirrored
                                   # image is another class: glyphs, text, logos, product labels
    # Synthetic identities (used when path is empty).
    num_classes: int = 1000        # K; memory does not grow with it
    samples_per_class: int = 32
    families: int = 0              # >0: identities come in families of similar faces (hard negatives)
    family_spread: float = 0.35    # how far an identity sits from its family's centre (smaller = harder)
    nuisance: float = 1.0          # strength of pose/light/noise nuisance (0 = clean renders)
    val_identities: int = 200      # held-out identities (never trained on) for verification pairs
    val_pairs: int = 1000
    val_samples: int = 0           # >0: new images of training identities, top-1/top-5 over all K at the end
    seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "tiny"          # tiny | hynet | mobilefacenet | resnet18 .. resnet100 (or r18.., mbf) | arcface_mbf | arcface_mbf_large
                                    # | identity | mlp (these two over a features file: data.path=feats.npy)
    feature_dim: int = 128
    input_dim: int = 0              # identity / mlp: the features' width d_in (0: read from data.path; the
                                    # resolved value is saved in the run's config)
    hidden_dim: int = 0             # mlp only: hidden width (0: max(input_dim, feature_dim))
    dropout: float = 0.0
    norm: str = "batch"             # tiny only: batch | group (group keeps DDP == one process exactly)
    width: int = 32                 # tiny only: channels of its first stage (16: ~1/4 the conv work; docs/benchmarks.md)
    sync_bn: bool = False           # convert BatchNorm to SyncBatchNorm under DDP (CUDA only)
    pretrained: str = ""            # start from these backbone weights (a checkpoint of ours, or an
                                    # arcface_torch IResNet backbone.pth) unless resuming


@dataclass
class MachConfig:
    num_hashes: int = 16           # R
    num_buckets: int = 0           # B; 0 -> chosen from K (see heads/mach.py)
    hidden: int = 0                # >0: a hidden layer of this width per head


@dataclass
class RPConfig:
    proj_dim: int = 64             # m: the projected feature dimension (m < d)


@dataclass
class HeadConfig:
    name: str = "full"             # full | hf | random | mach | rp
    margin: str = "none"           # none | cosface | arcface | combined
    scale: float = 64.0            # s, for the margin heads
    margin_m: float = 0.35         # m: 0.35 cosface, 0.5 arcface are the usual values
    m1: float = 1.0                # combined: cos(m1 * theta + m2) - m3 (InsightFace's combined margin)
    m2: float = 0.3
    m3: float = 0.2
    # Selective softmax (hf, random): see heads/selective.py.
    num_active: int = 1000         # M
    index: str = "auto"            # auto (forest below 100K classes, graph above) | forest | ivf | graph | hnsw | exact | random
    candidates: int = 64           # nearest classes asked of the index per sample
    rebuild_every: int = _INDEX["rebuild_every"]   # T (a minimum period: builds never queue)
    deterministic: str = _INDEX["deterministic"]   # index swaps at multiples of T from a copy of W (bitwise reruns; clients wait for a
                                   # late build): auto = on up to 64 MiB of W, on, off (builds go live when done)
    ntrees: int = _INDEX["ntrees"]
    search_k: int = _INDEX["search_k"]
    nlist: int = _INDEX["nlist"]   # IVF lists; 0 -> about sqrt(K)
    nprobe: int = _INDEX["nprobe"]  # IVF lists probed per feature (graph: per cold sample)
    degree: int = _INDEX["degree"]  # graph index: neighbours kept per class
    cpk_every: int = 0             # P: log CPK(M) on a probe batch every P steps (0 = off)
    cpk_sample: int = 200_000      # classes a CPK probe scores: all K up to this, else the active set + a uniform sample
    adaptive: bool = False         # adaptive allocation of M and T from CPK
    tau_cp: float = 0.9
    m_min: int = 100
    m_max: int = 10000
    mach: MachConfig = field(default_factory=MachConfig)
    rp: RPConfig = field(default_factory=RPConfig)


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = _STORE["momentum"]          # the backbone's SGD and the store's
    weight_decay: float = _STORE["weight_decay"]
    nesterov: bool = _STORE["nesterov"]
    # Selective heads' classifier rows in the store: "unrolled" (each touch applies the whole momentum
    # series lr/(1-m) at once) or "lazy" (torch.optim.SGD on the touched rows). See paramserver/optim.py.
    sparse_momentum: str = _STORE["sparse_momentum"]
    schedule: str = "cosine"       # constant | step | cosine
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)   # step schedule: steps where lr *= gamma
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64           # per process (global batch = batch_size * world size)
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    out_dir: str = "runs/default"
    resume: str = ""               # "" | auto | path/to/ckpt.pt
    ckpt_every: int = 0            # 0 -> only at the end
    keep_every: int = 0            # >0: also keep ckpt_<step>.pt every this many steps
    log_every: int = 20
    eval_every: int = 0            # held-out verification every this many steps (0 = at the end only)
    grad_clip: float = 0.0
    progress: bool = True
    tensorboard: bool = False      # also write train/eval scalars to <out_dir>/tensorboard (pip install -e .[tensorboard])
    amp: str = "off"               # off | bf16 | fp16 (autocast for the backbone; head logits in fp32)
    deterministic: bool = False    # CUDA: deterministic kernels, no cuDNN autotuning (bitwise reruns; slower)
    tf32: bool = False             # CUDA: fp32 matmuls on TF32 tensor cores (faster, ~1e-3 relative error)
    threads: int = 0               # torch CPU threads per process; 0 -> the cores available / ranks on this machine
    overwrite: bool = False        # start afresh in an out_dir that already holds a run (its files are removed)
    allow_batch_change: bool = False  # resume with another global batch (batch_size x ranks) than the checkpoint's


@dataclass
class StoreConfig:
    kind: str = "local"            # local (in-process) | remote (server) | sharded (rows across the ranks) | auto
    address: str = ""              # remote: comma-separated shard addresses tcp://host:port
    token: str = ""                # prefer $PARAMSERVER_TOKEN or token_file: never saved in run artifacts
    token_file: str = ""           # a file (mode 0600) holding the token
    timeout: float = 60.0
    allow_step_offset: bool = False  # train from step 0 on a server another run already moved
    allow_optimizer_mismatch: bool = False  # use a server whose SGD (momentum, wd, ...) differs from optim.*
    pipeline: bool = True          # pushes from a background worker, off the training thread
    prefetch: bool = True          # with pipeline: a label-only plan (random head) and its rows a step ahead
    wire_dtype: str = "native"     # native | bf16 (rows and gradients travel as bfloat16: half the bytes)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts for YAML, logs and checkpoints; ``store.token`` is never written out (a
        secret: pass it as $PARAMSERVER_TOKEN or store.token_file)."""
        d = asdict(self)
        if d["store"].get("token"):
            d["store"]["token"] = ""
        return d


# --------------------------------------------------------------------------------------------- #
# Building a Config from nested dicts, checking every key and type.

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    where = f"{key}" + (f" (from {origin})" if origin else "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 and 5e-4 (no dot) as strings; a float is what the user meant
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and math.isfinite(f):
                return f
        raise ConfigError(f"config key '{where}' expects a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)   # e.g. store.token=1234
        raise ConfigError(f"config key '{where}' expects a string, got {value!r}")
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    raise ConfigError(f"config key '{where}' has an unsupported type {tp}")


def _apply(obj: Any, values: dict[str, Any], prefix: str, origin: str) -> None:
    """Set fields of dataclass ``obj`` from ``values`` recursively, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' (from {origin}) must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{key}'" + (f" in {origin}" if origin else "")
                              + f" (valid keys here: {valid})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _apply(current, v, key + ".", origin)
        else:
            setattr(obj, k, _coerce(v, hints[k], key, origin))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true / false (any case) are bools, so
    ``train.amp=off`` or ``head.deterministic: on`` stay the strings the keys expect (YAML 1.1 read
    on / off / yes / no as bools)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_load(text: Any) -> Any:
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a YAML config, resolving its ``_base_`` chain (bases first, this file wins)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"config file {path} includes itself through _base_")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = _yaml_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _read_yaml(os.path.join(os.path.dirname(path), base), _seen + (path,))
    return _deep_merge(merged, data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.steps=200'`` -> (['train', 'steps'], 200)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (with its ``_base_`` chain) <- ``key=value`` overrides."""
    cfg = Config()
    if path:
        _apply(cfg, _read_yaml(path), "", path)
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for p in reversed(parts):
            nested = {p: nested}
        _apply(cfg, nested, "", f"override '{text}'")
    validate(cfg)
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    _apply(cfg, d, "", "checkpoint")
    return cfg


_CHOICES = {
    "head.name": ("full", "hf", "random", "mach", "rp"),
    "head.margin": ("none", "cosface", "arcface", "combined"),
    "head.deterministic": ("auto", "on", "off"),
    "head.index": ("auto", "forest", "ivf", "graph", "hnsw", "exact", "random"),
    "optim.schedule": ("constant", "step", "cosine"),
    "optim.sparse_momentum": ("lazy", "unrolled"),
    "store.kind": ("local", "remote", "sharded", "auto"),
    "model.norm": ("batch", "group"),
}


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got '{value}'")
    positive = {"train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
                "model.feature_dim": cfg.model.feature_dim, "data.image_size": cfg.data.image_size,
                "data.num_classes": cfg.data.num_classes, "head.num_active": cfg.head.num_active,
                "data.prefetch_factor": cfg.data.prefetch_factor, "model.width": cfg.model.width}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive; got {value}")
    for key, value in (("model.input_dim", cfg.model.input_dim), ("model.hidden_dim", cfg.model.hidden_dim)):
        if value < 0:
            raise ConfigError(f"config key '{key}' must be 0 or more; got {value}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be 0 or more; got {cfg.data.num_workers}")
    if cfg.train.resume not in ("", "auto") and not os.path.isfile(cfg.train.resume):
        raise ConfigError(f"config key 'train.resume': checkpoint not found: {cfg.train.resume}")


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (atomic), so a run directory says how it was made."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
