"""Training settings: ``TrainConfig``, in sections, from a YAML/TOML file and/or CLI options.

The sections (``optimisation``, ``objectives``, ``heads``, ``balance``, ``data``, ``online``;
the run's own settings at the top level) are frozen dataclasses holding the defaults (one
place), and a config file mirrors them. CLI options override the file; unset options keep the
defaults, and so do the vocabularies of the options that take a name. The resolved config is
written to the run directory as JSON (``to_dict``), next to a copy of the file. Light on
purpose: ``kdcache train --help`` shows these defaults without importing torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from kdcache.data.partition import LAST_BATCH, VIEW_CHOICES  # which stored view a block takes; the last partial batch
from kdcache.errors import KdcacheError
from kdcache.targets.normalize import NORMALIZERS

AMP = ("auto", "bf16", "none")  # auto: bf16 autocast on CUDA, none on a CPU (where bf16 matmuls are slow)
TASK_LOSSES = ("none", "ce")
LABELS = ("cls",)
HEAD_KINDS = ("mlp", "transformer", "model-token")  # projectors (train.model; model-token: train.spaces)
BALANCES = ("static", "mgda", "dto")  # how objectives are weighed (train.balance)
LOGITS_LOSSES = ("none", "kl")  # soft labels: KL of the teacher's (top-K) distribution to the student's
LOGITS_TAILS = ("spread", "renorm")  # top-K soft labels: the tail mass spread over the other classes, or renormalised
LABEL_LOSSES = ("none", "ce")  # hard labels on the student's classifier (the teacher's class space)
SCHEDULES = ("warmup-cosine", "cosine", "tanh", "step", "poly")  # warmup-cosine: kdcache's; the rest timm's, per step
DECODES = ("auto", "reduced", "full")  # auto: reduced (the student's side only); see data.corpus.DecodeOptions
REQUIRED = ("store", "student", "out")  # --store may be left out with --online; --data with a store that keeps pixels
IMAGE_SOURCES = ("auto", "store", "corpus")  # where the student's images come from (train.sources.image_source)


def _option(default, option: str | None = None, **kw):
    """A section's field; ``option``: its command-line name when it differs from the field's."""
    if "default_factory" in kw:
        return field(metadata={"option": option}, **kw)
    return field(default=default, metadata={"option": option})


@dataclass(frozen=True)
class Optimisation:
    """How the student's parameters move: timm's optimizer and schedule factories, AMP, EMA."""
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    opt: str = "adamw"  # any timm optimizer name (timm.optim.create_optimizer_v2); adamw is torch's AdamW
    momentum: float = 0.9  # timm's momentum option (SGD-like optimizers)
    opt_eps: float = 0.0  # the optimizer's epsilon; 0 = the optimizer's own default
    sched: str = "warmup-cosine"  # warmup-cosine (kdcache's, below) | a timm schedule (create_scheduler_v2), per step
    warmup_steps: int = 100
    warmup_lr: float = 0.0  # timm schedules: the learning rate warmup starts from
    min_lr: float = 0.0  # timm schedules: the floor
    decay_steps: int = 0  # --sched step: steps between decays (0 = a third of the run)
    decay_rate: float = 0.1  # --sched step: the factor of each decay
    clip_grad: float = 1.0
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | none
    ema: float = 0.0  # EMA decay of the student, 0 = off


@dataclass(frozen=True)
class Objectives:
    """What the student learns: each teacher's features (and soft labels), labels, a task."""
    normalize: str = "standardize"  # standardize | phi-s | none
    summary_loss: str = "cosine"  # the summary token's loss, by name (train.losses.LOSSES)
    patch_loss: str = "cos-smoothl1"  # the patch tokens' loss, by name
    alpha: float = 0.9  # cos-smoothl1: weight of (1 - cos); the rest goes to SmoothL1
    beta: float = 2.0  # cos-smoothl1: the SmoothL1 transition point
    summary_weight: float = 1.0
    patch_weight: float = 1.0
    predict_codes: bool = False  # quantized teachers: 256-way CE per codebook (MVQ-KD) instead of regression
    logits_loss: str = "none"  # none | kl: the student's classifier learns the teachers' soft labels (stored top-K, or live)
    temperature: float = 1.0  # of the soft labels: teacher and student distributions at T, the KL scaled by T^2
    logits_tail: str = "spread"  # spread: the recorded tail mass spread evenly over the other classes | renorm: top-K only
    logits_top: int = 0  # use only the first N of the stored top-K (N=1 with renorm: hard teacher labels); 0 = all
    logits_weight: float = 1.0  # static weight of each teacher's soft-label loss
    label_loss: str = "none"  # none | ce: cross-entropy of the student's classifier on the corpus labels (teacher's classes)
    label_weight: float = 1.0  # static weight of the label loss
    task_loss: str = "none"  # none | ce: a linear classifier on the student's summary, cross-entropy on the labels
    labels: str = "cls"  # where task labels come from: the corpus's cls field / image-folder classes
    task_weight: float = 1.0  # static weight of the task loss (with --balance mgda the task is one more objective)
    task_classes: int = 0  # classes of the task head; 0 = the largest corpus label + 1


@dataclass(frozen=True)
class Heads:
    """How the student's tokens reach each teacher's space."""
    head: str = "mlp"  # mlp | transformer (DUNE) | model-token (train.spaces)
    head_hidden: int = 1024
    head_depth: int = 1
    head_heads: int = 4  # transformer head: attention heads
    shared_adapter: bool = False  # one projection of the student's tokens into a common space before every head
    frozen_backbone: bool = False  # Knowledge Inheritance: the pretrained student frozen, low-rank adapters learn
    adapter_rank: int = 8  # --frozen-backbone: rank of each adapter (train.adapters)
    ladder: tuple[int, ...] = ()  # UNIC: projectors from these depths of the student (timm forward_intermediates)


@dataclass(frozen=True)
class Balance:
    """How a step weighs its objectives (train.balance)."""
    method: str = _option("static", "balance")  # static | mgda (min-norm) | dto (task vs distillation)
    teacher_weights: dict = _option(None, default_factory=dict)  # lambda_t, default uniform 1
    teacher_drop: float = 0.0  # UNIC: each step drop every teacher but the max-loss one with this probability


@dataclass(frozen=True)
class Data:
    """What the loader delivers: the corpus, the batches, the views, the images."""
    corpus: str = _option("", "data")  # optional when the store keeps its views' pixels (extract --pixels)
    batch_size: int = 64
    workers: int = 2
    view_choice: str = "epoch"  # epoch | random | first | augmented | all
    shuffle_buffer: int = 256  # the window of the epoch's order whose samples are shuffled (data.partition)
    last_batch: str = "partial"  # the last global partial batch: partial (a smaller last step) | drop | pad (repeats)
    log_keys: bool = False  # write every delivered key per step to RUN/keys/rank<R>.jsonl
    color_jitter: float = 0.0  # student-only photometric augmentation strength
    decode: str = "auto"  # the student's JPEGs at the scale its crop needs (auto, reduced) or full size
    images: str = "auto"  # auto: the store's view pixels when it keeps them and the student fits, else the corpus
    skip_corrupt: bool = False  # skip (and count) shards whose data fails verification instead of stopping
    sub_views: float = 0.0  # a random box inside each stored view, of at least this share of its area; 0 = off
    cutmix: float = 0.0  # probability of a CutMix batch (box snapped to the first teacher's patch grid); 0 = off
    mixup: float = 0.0  # MixUp with weights ~ Beta(alpha, alpha), alpha = this (with --cutmix: the other batches); 0 = off
    dense_views: bool = False  # fresh views every epoch, patch targets cut from the store's dense maps (extract --dense-scale)


@dataclass(frozen=True)
class Online:
    """Teachers run live instead of a store (train.online)."""
    enabled: bool = _option(False, "online")  # teachers (NAME=MODEL specs in ``teachers``) run live every step
    stats_images: int = _option(512, "online_stats_images")  # images whose teacher features give the statistics


@dataclass(frozen=True)
class Run:
    """The run itself: what it trains, where it goes, how it logs and resumes (the file's top level)."""
    store: str = ""
    student: str = ""
    out: str = ""
    teachers: tuple[str, ...] = ()  # default: every teacher of the store; with --online, NAME=MODEL specs
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch only
    stop_at_step: int = 0  # stop (with a checkpoint) after this global step; --resume continues
    resume: bool = False
    overwrite: bool = False  # train into a directory that holds a run, replacing it


SECTIONS = {"optimisation": Optimisation, "objectives": Objectives, "heads": Heads, "balance": Balance, "data": Data,
            "online": Online}
# option name (as the command line spells it, with underscores) -> (section or None for the top level, field)
OPTIONS = {(f.metadata.get("option") or f.name): (None if cls is Run else name, f.name)
           for name, cls in {"": Run, **SECTIONS}.items() for f in dataclasses.fields(cls)}
FIELDS = set(OPTIONS)


def _defaults() -> dict:
    return {opt: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            for cls in (Run, *SECTIONS.values()) for f in dataclasses.fields(cls)
            for opt in [f.metadata.get("option") or f.name]}


DEFAULTS = _defaults()


class TrainConfig:
    """Every option of ``kdcache train``, validated, held in sections.

    Built from the options as the command line names them (``TrainConfig(store=..., lr=3e-4,
    balance="mgda")``); read by section (``cfg.optimisation.lr``, ``cfg.balance.method``,
    ``cfg.data.corpus``), the run's own settings at the top (``cfg.store``, ``cfg.seed``). A config
    file mirrors the sections (``from_dict``); ``RUN/config.json`` is ``to_dict``. Immutable:
    ``replace(**options)`` gives a changed copy, validated again."""

    __slots__ = ("store", "student", "out", "teachers", "seed", "device", "log_every", "checkpoint_every", "stop_at_step",
                 "resume", "overwrite", *SECTIONS)

    def __init__(self, **options):
        unknown = sorted(set(options) - FIELDS)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join('--' + u.replace('_', '-') for u in unknown)}")
        missing = [k for k in REQUIRED if k not in options and not (k == "store" and options.get("online"))]
        if missing:
            raise ConfigError(f"--{missing[0]} is required (on the command line or in --config)")
        values = {**DEFAULTS, **options}
        parts: dict[str | None, dict] = {}
        for opt, value in values.items():
            section, name = OPTIONS[opt]
            parts.setdefault(section, {})[name] = value
        for name, value in parts.pop(None).items():
            object.__setattr__(self, name, value)
        for name, cls in SECTIONS.items():
            object.__setattr__(self, name, cls(**parts[name]))
        self._validate()
        self._make_paths_absolute()

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"TrainConfig is immutable: replace({name}=...) makes a changed copy")

    def options(self) -> dict:
        """Every option by its command-line name (what ``TrainConfig(**...)`` takes)."""
        out = {}
        for opt, (section, name) in OPTIONS.items():
            out[opt] = getattr(getattr(self, section) if section else self, name)
        return out

    def replace(self, **options) -> "TrainConfig":
        return TrainConfig(**{**self.options(), **options})

    def to_dict(self) -> dict:
        """The sections as a config file writes them; the run's settings at the top level."""
        top = {f.name: getattr(self, f.name) for f in dataclasses.fields(Run)}
        return {**top, **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config") -> "TrainConfig":
        """A config file's or ``RUN/config.json``'s mapping: sections of fields, or options at the top
        level (a run directory written before the sections, or a flat file)."""
        return cls(**flatten(d, where=where))

    def __eq__(self, other) -> bool:
        return isinstance(other, TrainConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"TrainConfig({self.to_dict()!r})"

    # -- checks (one place; messages name the command-line option) ------------------------------
    def _validate(self) -> None:
        o = self.options()
        for name in REQUIRED:
            if name == "store" and self.online.enabled and self.store == "":
                continue
            if not isinstance(o[name], str) or not o[name]:
                raise ConfigError(f"--{name} is required (on the command line or in --config)")
        _check(o, "teachers", lambda v: isinstance(v, tuple) and all(isinstance(t, str) and t for t in v),
               "a list of teacher names")
        _check(o, "teacher_weights", lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(w) and w >= 0
                                                                           for k, w in v.items()),
               "NAME=LAMBDA with finite LAMBDA >= 0")
        for name, low in (("epochs", 1), ("batch_size", 1), ("workers", 0), ("warmup_steps", 0), ("shuffle_buffer", 1),
                          ("head_hidden", 1), ("head_depth", 0), ("log_every", 1), ("checkpoint_every", 0),
                          ("stop_at_step", 0), ("seed", 0), ("online_stats_images", 1), ("head_heads", 1),
                          ("task_classes", 0), ("logits_top", 0), ("adapter_rank", 1), ("decay_steps", 0)):
            _check(o, name, lambda v, low=low: _integer(v) and v >= low, f"an integer >= {low}")
        _check(o, "lr", lambda v: _number(v) and v > 0, "a finite number > 0")
        for name in ("weight_decay", "clip_grad", "color_jitter", "summary_weight", "patch_weight", "task_weight",
                     "logits_weight", "label_weight", "momentum", "opt_eps", "warmup_lr", "min_lr"):
            _check(o, name, lambda v: _number(v) and v >= 0, "a finite number >= 0")
        _check(o, "decay_rate", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")
        _check(o, "ema", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
        _check(o, "alpha", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
        _check(o, "beta", lambda v: _number(v) and v > 0, "a finite number > 0")
        _check(o, "temperature", lambda v: _number(v) and v > 0, "a finite number > 0")
        _check(o, "teacher_drop", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
        _check(o, "sub_views", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1] (0 = off)")
        _check(o, "cutmix", lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]")
        _check(o, "mixup", lambda v: _number(v) and 0 <= v <= 100, "a Beta alpha in [0, 100] (0 = off)")
        for name, allowed in (("amp", AMP), ("view_choice", VIEW_CHOICES), ("normalize", tuple(NORMALIZERS)),
                              ("head", HEAD_KINDS), ("balance", BALANCES), ("task_loss", TASK_LOSSES), ("labels", LABELS),
                              ("logits_loss", LOGITS_LOSSES), ("logits_tail", LOGITS_TAILS), ("label_loss", LABEL_LOSSES),
                              ("decode", DECODES), ("last_batch", LAST_BATCH), ("images", IMAGE_SOURCES),
                              ("sched", SCHEDULES)):
            _check(o, name, lambda v, allowed=allowed: v in allowed, f"one of {', '.join(allowed)}")
        for name in ("opt", "summary_loss", "patch_loss"):  # names checked against their registries when the run is built
            _check(o, name, lambda v: isinstance(v, str) and v.strip() != "", "a name")
        _check(o, "ladder", lambda v: isinstance(v, tuple) and all(_integer(d) for d in v) and len(set(v)) == len(v),
               "distinct block indices (comma-separated integers; negative counts from the last)")
        for name in ("predict_codes", "resume", "overwrite", "skip_corrupt", "online", "shared_adapter", "dense_views",
                     "frozen_backbone", "log_keys"):
            _check(o, name, lambda v: isinstance(v, bool), "true or false")
        objectives, heads, data = self.objectives, self.heads, self.data
        if objectives.label_loss != "none" and objectives.logits_loss == "none":
            raise ConfigError("--label-loss trains the student's classifier in the teacher's class space: it goes with "
                              "--logits-loss kl (for labels of the corpus's own classes, see --task-loss)")
        if heads.head == "transformer" and (heads.head_depth < 1 or heads.head_hidden % heads.head_heads):
            raise ConfigError(f"--head transformer: --head-depth {heads.head_depth} must be >= 1 and --head-hidden "
                              f"{heads.head_hidden} a multiple of --head-heads {heads.head_heads}")
        self._check_derived_views()
        self._check_methods()
        if self.online.enabled:
            self._check_online()
        _check(o, "data", lambda v: isinstance(v, str), "a corpus path or URL")
        for needs, why in ((self.online.enabled, "--online cuts fresh views from the corpus"),
                           (data.dense_views, "--dense-views cuts fresh views from the corpus"),
                           (data.images == "corpus", "--images corpus reads the corpus")):
            if needs and not data.corpus:
                raise ConfigError(f"--data is required: {why}")
        if self.online.enabled and data.images == "store":
            raise ConfigError("--images store reads a store's pixels; --online has no store")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"--out {self.out}: exists and is not a directory")

    def _make_paths_absolute(self) -> None:
        """Local paths (store, corpus, run, checkpoints in specs) recorded absolute, so a run directory
        works from anywhere: ``report``, ``eval``, ``export`` and ``--resume`` read them back."""
        from kdcache.store.remote import is_url

        def absolute(path: str) -> str:
            return os.path.abspath(path) if path and not is_url(path) else path
        object.__setattr__(self, "store", absolute(self.store))
        object.__setattr__(self, "out", absolute(self.out))
        object.__setattr__(self, "data", dataclasses.replace(self.data, corpus=absolute(self.data.corpus)))
        object.__setattr__(self, "student", absolute_checkpoint(self.student))
        object.__setattr__(self, "teachers", tuple(absolute_checkpoint(t) for t in self.teachers))

    def _check_derived_views(self) -> None:
        """Derived targets (targets.derive) that do not combine, refused in one line."""
        data, online, objectives = self.data, self.online.enabled, self.objectives
        if data.view_choice == "all" and (online or data.sub_views or data.dense_views):
            other = "--online" if online else "--sub-views" if data.sub_views else "--dense-views"
            raise ConfigError(f"--view-choice all delivers a store's K stored views of each image; {other} draws views of "
                              f"its own: choose one")
        if data.sub_views and data.dense_views:
            raise ConfigError("--sub-views and --dense-views both give the student new views: choose one")
        if online and (data.sub_views or data.dense_views):
            raise ConfigError(f"--{'sub-views' if data.sub_views else 'dense-views'} derives targets from a store; an --online "
                              f"run draws fresh views with exact targets already")
        derived = [n for n in ("sub_views", "cutmix", "mixup", "dense_views") if getattr(data, n)]
        if objectives.predict_codes and derived:
            raise ConfigError(f"--{derived[0].replace('_', '-')} resamples or mixes targets, which codes cannot be: it "
                              f"goes with regression, not --predict-codes")
        if data.dense_views and objectives.logits_loss != "none":
            raise ConfigError("--dense-views: soft labels are stored per view; a fresh view has none (--logits-loss none)")

    def _check_methods(self) -> None:
        """Multi-teacher methods that do not combine, refused in one line."""
        heads, objectives, method = self.heads, self.objectives, self.balance.method
        if heads.head == "model-token" and heads.shared_adapter:
            raise ConfigError("--head model-token projects the student into each teacher's space itself: drop --shared-adapter")
        if heads.head == "model-token" and (heads.head_depth < 1 or heads.head_hidden % heads.head_heads):
            raise ConfigError(f"--head model-token: --head-depth {heads.head_depth} must be >= 1 and --head-hidden "
                              f"{heads.head_hidden} a multiple of --head-heads {heads.head_heads}")
        if method == "dto" and objectives.task_loss == "none":
            raise ConfigError("--balance dto weighs the task loss against distillation: it needs --task-loss ce")
        if method == "dto" and objectives.label_loss != "none":
            raise ConfigError("--balance dto: the task side is --task-loss (a classifier on the student's summary); "
                              "--label-loss trains timm's own classifier, drop it")
        if heads.frozen_backbone:
            if self.optimisation.ema:
                raise ConfigError("--frozen-backbone: the backbone does not move, an --ema of it is the backbone; drop --ema")
            if objectives.logits_loss != "none" or objectives.label_loss != "none":
                raise ConfigError("--frozen-backbone: the student's classifier is part of the frozen backbone; soft or hard "
                                  "labels cannot train it (--logits-loss none)")
            from kdcache.models.spec import ModelSpec
            spec = ModelSpec.parse_student(self.student)
            if not (spec.pretrained or spec.checkpoint):
                raise ConfigError(f"--frozen-backbone: the student {self.student!r} starts from random weights; a frozen "
                                  f"random backbone learns nothing (give pretrained=true or checkpoint=PATH)")

    def _check_online(self) -> None:
        if self.store:
            raise ConfigError("--online runs the teachers live: give --teacher NAME=MODEL specs, not --store")
        if not self.teachers:
            raise ConfigError("--online needs at least one --teacher NAME=MODEL[,key=value...]")
        from kdcache.models.spec import ModelSpec
        for spec in self.teachers:
            ModelSpec.parse_teacher(spec)  # a one-line ModelSpecError naming the spec
        for name, on in (("predict-codes", self.objectives.predict_codes), ("skip-corrupt", self.data.skip_corrupt)):
            if on:
                raise ConfigError(f"--{name} reads a store; it has no meaning with --online")


def flatten(d: dict, *, where: str = "config") -> dict:
    """A mapping of sections (``optimisation: {lr: ...}``) and top-level options, as a config file or
    ``RUN/config.json`` holds it, to options by command-line name. A section's key must be one of
    its fields; an option may also stand at the top level (a flat file, a run from before sections)."""
    out = {}
    for key, value in d.items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            fields = dataclasses.fields(SECTIONS[key])  # a field by its name, or by its option's (balance: balance)
            by_field = {**{f.metadata.get("option") or f.name: f.metadata.get("option") or f.name for f in fields},
                        **{f.name: f.metadata.get("option") or f.name for f in fields}}
            for name, v in value.items():
                name = name.replace("-", "_")
                if name not in by_field:
                    raise ConfigError(f"{where}: {key}.{name}: not an option of section {key!r} (its options: "
                                      f"{', '.join(f.name for f in fields)})")
                out[by_field[name]] = v
        elif key in FIELDS:
            out[key] = value
        else:
            raise ConfigError(f"{where}: unknown option(s) {key}")
    for name in ("teachers", "ladder"):
        if isinstance(out.get(name), list):
            out[name] = tuple(out[name])
    return out


def absolute_checkpoint(spec: str) -> str:
    """A model spec with a local ``checkpoint=PATH`` made absolute (everything else as written)."""
    parts = spec.split(",")
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if eq and key.strip() == "checkpoint" and value.strip() and "://" not in value:
            parts[i] = f"{key}={os.path.abspath(value.strip())}"
    return ",".join(parts)


class ConfigError(KdcacheError):
    pass


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(options: dict, name: str, ok, want: str) -> None:
    v = options[name]
    if not ok(v):
        raise ConfigError(f"--{name.replace('_', '-')} {v!r}: expected {want}")
