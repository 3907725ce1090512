"""Training settings: one frozen dataclass, from a YAML/TOML file and/or CLI options.

CLI options override the file; unset options keep the defaults here (one place), and so do the
vocabularies of the options that take a name. The resolved config is written to the run
directory as JSON, next to a copy of the file. Light on purpose: ``kdcache train --help``
shows these defaults without importing torch.
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
DECODES = ("auto", "reduced", "full")  # auto: reduced (the student's side only); see data.corpus.DecodeOptions
REQUIRED = ("store", "student", "out")  # --store may be left out with --online; --data with a store that keeps pixels
IMAGE_SOURCES = ("auto", "store", "corpus")  # where the student's images come from (train.sources.image_source)


@dataclass(frozen=True)
class TrainConfig:
    store: str
    student: str
    out: str
    data: str = ""  # the corpus; optional when the store keeps its views' pixels (extract --pixels)
    teachers: tuple[str, ...] = ()  # default: every teacher of the store
    teacher_weights: dict = field(default_factory=dict)  # lambda_t, default uniform 1
    epochs: int = 10
    batch_size: int = 64
    workers: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    clip_grad: float = 1.0
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | none
    ema: float = 0.0  # EMA decay of the student, 0 = off
    seed: int = 0
    device: str = "auto"
    view_choice: str = "epoch"  # epoch | random | first | augmented | all
    shuffle_buffer: int = 256  # the window of the epoch's order whose samples are shuffled (data.partition)
    last_batch: str = "partial"  # the last global partial batch: partial (a smaller last step) | drop | pad (repeats)
    log_keys: bool = False  # write every delivered key per step to RUN/keys/rank<R>.jsonl
    color_jitter: float = 0.0  # student-only photometric augmentation strength
    decode: str = "auto"  # the student's JPEGs at the scale its crop needs (auto, reduced) or full size
    images: str = "auto"  # auto: the store's view pixels when it keeps them and the student fits, else the corpus
    normalize: str = "standardize"  # standardize | phi-s | none
    head_hidden: int = 1024
    head_depth: int = 1
    alpha: float = 0.9
    beta: float = 2.0
    summary_weight: float = 1.0
    patch_weight: float = 1.0
    predict_codes: bool = False  # quantized teachers: 256-way CE per codebook (MVQ-KD) instead of regression
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch only
    stop_at_step: int = 0  # stop (with a checkpoint) after this global step; --resume continues
    resume: bool = False
    overwrite: bool = False  # train into a directory that holds a run, replacing it
    skip_corrupt: bool = False  # skip (and count) shards whose data fails verification instead of stopping
    head: str = "mlp"  # mlp | transformer (DUNE: blocks over the student's tokens; head_depth blocks of width head_hidden)
    head_heads: int = 4  # transformer head: attention heads
    shared_adapter: bool = False  # one projection of the student's tokens into a common space before every head
    frozen_backbone: bool = False  # Knowledge Inheritance: the pretrained student frozen, low-rank adapters learn
    adapter_rank: int = 8  # --frozen-backbone: rank of each adapter (train.adapters)
    ladder: tuple[int, ...] = ()  # UNIC: projectors from these depths of the student (timm forward_intermediates)
    balance: str = "static"  # static (teacher_weights) | mgda (min-norm weights of the representation gradients)
    #                        | dto (DTO-KD: task vs distillation, closed form from the two representation gradients)
    teacher_drop: float = 0.0  # UNIC: each step drop every teacher but the max-loss one with this probability
    task_loss: str = "none"  # none | ce: a linear classifier on the student's summary, cross-entropy on the labels
    labels: str = "cls"  # where task labels come from: the corpus's cls field / image-folder classes
    task_weight: float = 1.0  # static weight of the task loss (with --balance mgda the task is one more objective)
    task_classes: int = 0  # classes of the task head; 0 = the largest corpus label + 1
    logits_loss: str = "none"  # none | kl: the student's classifier learns the teachers' soft labels (stored top-K, or live)
    temperature: float = 1.0  # of the soft labels: teacher and student distributions at T, the KL scaled by T^2
    logits_tail: str = "spread"  # spread: the recorded tail mass spread evenly over the other classes | renorm: top-K only
    logits_top: int = 0  # use only the first N of the stored top-K (N=1 with renorm: hard teacher labels); 0 = all
    logits_weight: float = 1.0  # static weight of each teacher's soft-label loss
    label_loss: str = "none"  # none | ce: cross-entropy of the student's classifier on the corpus labels (teacher's classes)
    label_weight: float = 1.0  # static weight of the label loss
    sub_views: float = 0.0  # a random box inside each stored view, of at least this share of its area; 0 = off
    cutmix: float = 0.0  # probability of a CutMix batch (box snapped to the first teacher's patch grid); 0 = off
    mixup: float = 0.0  # MixUp with weights ~ Beta(alpha, alpha), alpha = this (with --cutmix: the other batches); 0 = off
    dense_views: bool = False  # fresh views every epoch, patch targets cut from the store's dense maps (extract --dense-scale)
    online: bool = False  # teachers (NAME=MODEL specs in ``teachers``) run live every step; no store (train.online)
    online_stats_images: int = 512  # --online: images whose teacher features give the normalisation statistics

    def __post_init__(self):
        for name in REQUIRED:
            if name == "store" and self.online and self.store == "":
                continue
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"--{name} is required (on the command line or in --config)")
        _check(self, "teachers", lambda v: isinstance(v, tuple) and all(isinstance(t, str) and t for t in v), "a list of teacher names")
        _check(self, "teacher_weights", lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(w) and w >= 0 for k, w in v.items()),
               "NAME=LAMBDA with finite LAMBDA >= 0")
        for name, low in (("epochs", 1), ("batch_size", 1), ("workers", 0), ("warmup_steps", 0), ("shuffle_buffer", 1),
                          ("head_hidden", 1), ("head_depth", 0), ("log_every", 1), ("checkpoint_every", 0),
                          ("stop_at_step", 0), ("seed", 0), ("online_stats_images", 1), ("head_heads", 1),
                          ("task_classes", 0), ("logits_top", 0), ("adapter_rank", 1)):
            _check(self, name, lambda v, low=low: _integer(v) and v >= low, f"an integer >= {low}")
        _check(self, "lr", lambda v: _number(v) and v > 0, "a finite number > 0")
        for name in ("weight_decay", "clip_grad", "color_jitter", "summary_weight", "patch_weight", "task_weight",
                     "logits_weight", "label_weight"):
            _check(self, name, lambda v: _number(v) and v >= 0, "a finite number >= 0")
        _check(self, "ema", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
        _check(self, "alpha", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
        _check(self, "beta", lambda v: _number(v) and v > 0, "a finite number > 0")
        _check(self, "temperature", lambda v: _number(v) and v > 0, "a finite number > 0")
        _check(self, "teacher_drop", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
        _check(self, "sub_views", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1] (0 = off)")
        _check(self, "cutmix", lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]")
        _check(self, "mixup", lambda v: _number(v) and 0 <= v <= 100, "a Beta alpha in [0, 100] (0 = off)")
        for name, allowed in (("amp", AMP), ("view_choice", VIEW_CHOICES), ("normalize", tuple(NORMALIZERS)),
                              ("head", HEAD_KINDS), ("balance", BALANCES), ("task_loss", TASK_LOSSES), ("labels", LABELS),
                              ("logits_loss", LOGITS_LOSSES), ("logits_tail", LOGITS_TAILS), ("label_loss", LABEL_LOSSES),
                              ("decode", DECODES), ("last_batch", LAST_BATCH), ("images", IMAGE_SOURCES)):
            _check(self, name, lambda v, allowed=allowed: v in allowed, f"one of {', '.join(allowed)}")
        _check(self, "ladder", lambda v: isinstance(v, tuple) and all(_integer(d) for d in v) and len(set(v)) == len(v),
               "distinct block indices (comma-separated integers; negative counts from the last)")
        for name in ("predict_codes", "resume", "overwrite", "skip_corrupt", "online", "shared_adapter", "dense_views",
                     "frozen_backbone", "log_keys"):
            _check(self, name, lambda v: isinstance(v, bool), "true or false")
        if self.label_loss != "none" and self.logits_loss == "none":
            raise ConfigError("--label-loss trains the student's classifier in the teacher's class space: it goes with "
                              "--logits-loss kl (for labels of the corpus's own classes, see --task-loss)")
        if self.head == "transformer" and (self.head_depth < 1 or self.head_hidden % self.head_heads):
            raise ConfigError(f"--head transformer: --head-depth {self.head_depth} must be >= 1 and --head-hidden "
                              f"{self.head_hidden} a multiple of --head-heads {self.head_heads}")
        self._check_derived_views()
        self._check_methods()
        if self.online:
            self._check_online()
        _check(self, "data", lambda v: isinstance(v, str), "a corpus path or URL")
        for needs, why in ((self.online, "--online cuts fresh views from the corpus"),
                           (self.dense_views, "--dense-views cuts fresh views from the corpus"),
                           (self.images == "corpus", "--images corpus reads the corpus")):
            if needs and not self.data:
                raise ConfigError(f"--data is required: {why}")
        if self.online and self.images == "store":
            raise ConfigError("--images store reads a store's pixels; --online has no store")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"--out {self.out}: exists and is not a directory")
        self._make_paths_absolute()

    def _make_paths_absolute(self) -> None:
        """Local paths (store, corpus, run, checkpoints in specs) recorded absolute, so a run directory
        works from anywhere: ``report``, ``eval``, ``export`` and ``--resume`` read them back."""
        from kdcache.store.remote import is_url
        fix = {name: os.path.abspath(getattr(self, name)) for name in ("store", "data", "out")
               if getattr(self, name) and not is_url(getattr(self, name))}
        fix["student"] = absolute_checkpoint(self.student)
        fix["teachers"] = tuple(absolute_checkpoint(t) for t in self.teachers)
        for name, value in fix.items():
            object.__setattr__(self, name, value)

    def _check_derived_views(self) -> None:
        """Derived targets (targets.derive) that do not combine, refused in one line."""
        if self.view_choice == "all" and (self.online or self.sub_views or self.dense_views):
            other = "--online" if self.online else "--sub-views" if self.sub_views else "--dense-views"
            raise ConfigError(f"--view-choice all delivers a store's K stored views of each image; {other} draws views of "
                              f"its own: choose one")
        if self.sub_views and self.dense_views:
            raise ConfigError("--sub-views and --dense-views both give the student new views: choose one")
        if self.online and (self.sub_views or self.dense_views):
            raise ConfigError(f"--{'sub-views' if self.sub_views else 'dense-views'} derives targets from a store; an --online "
                              f"run draws fresh views with exact targets already")
        derived = [n for n in ("sub_views", "cutmix", "mixup", "dense_views") if getattr(self, n)]
        if self.predict_codes and derived:
            raise ConfigError(f"--{derived[0].replace('_', '-')} resamples or mixes targets, which codes cannot be: it "
                              f"goes with regression, not --predict-codes")
        if self.dense_views and self.logits_loss != "none":
            raise ConfigError("--dense-views: soft labels are stored per view; a fresh view has none (--logits-loss none)")

    def _check_methods(self) -> None:
        """Multi-teacher methods that do not combine, refused in one line."""
        if self.head == "model-token" and self.shared_adapter:
            raise ConfigError("--head model-token projects the student into each teacher's space itself: drop --shared-adapter")
        if self.head == "model-token" and (self.head_depth < 1 or self.head_hidden % self.head_heads):
            raise ConfigError(f"--head model-token: --head-depth {self.head_depth} must be >= 1 and --head-hidden "
                              f"{self.head_hidden} a multiple of --head-heads {self.head_heads}")
        if self.balance == "dto" and self.task_loss == "none":
            raise ConfigError("--balance dto weighs the task loss against distillation: it needs --task-loss ce")
        if self.balance == "dto" and self.label_loss != "none":
            raise ConfigError("--balance dto: the task side is --task-loss (a classifier on the student's summary); "
                              "--label-loss trains timm's own classifier, drop it")
        if self.frozen_backbone:
            if self.ema:
                raise ConfigError("--frozen-backbone: the backbone does not move, an --ema of it is the backbone; drop --ema")
            if self.logits_loss != "none" or self.label_loss != "none":
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
        for name in ("predict_codes", "skip_corrupt"):
            if getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} reads a store; it has no meaning with --online")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


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


def _check(cfg, name: str, ok, want: str) -> None:
    v = getattr(cfg, name)
    if not ok(v):
        raise ConfigError(f"--{name.replace('_', '-')} {v!r}: expected {want}")


def read_config_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise KdcacheError(f"--config {path}: {e.strerror}") from None
    try:
        if path.endswith(".toml"):
            import tomllib
            d = tomllib.loads(raw.decode())
        else:
            import yaml
            d = yaml.safe_load(raw) or {}
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise KdcacheError(f"--config {path}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise KdcacheError(f"--config {path}: expected a mapping of option: value")
    d = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = sorted(set(d) - FIELDS)
    if unknown:
        raise KdcacheError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return d


def build_config(config_file: str | None, **cli) -> TrainConfig:
    """The file's options, overridden by the CLI's (None = not given); validated on construction."""
    d = read_config_file(config_file) if config_file else {}
    d.update({k: v for k, v in cli.items() if v is not None})
    if d.get("online"):
        d.setdefault("store", "")
    missing = [k for k in REQUIRED if k not in d]  # (the dataclass checks the values: one place)
    if missing:
        raise ConfigError(f"--{missing[0]} is required (on the command line or in --config)")
    for name in ("teachers", "ladder"):
        if isinstance(d.get(name), list):
            d[name] = tuple(d[name])
    return TrainConfig(**d)


def parse_ladder(text: str | None) -> tuple[int, ...] | None:
    """``--ladder 1,2,-2`` -> (1, 2, -2) (None when not given)."""
    if text is None:
        return None
    try:
        return tuple(int(d) for d in text.split(",") if d.strip())
    except ValueError:
        raise ConfigError(f"--ladder {text!r}: expected comma-separated block indices, e.g. 1,2") from None


def parse_teacher_weights(items) -> dict | None:
    """``--teacher-weight NAME=LAMBDA`` options -> {name: lambda} (None when none given)."""
    if not items:
        return None
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"--teacher-weight {item!r}: expected NAME=LAMBDA with a number") from None
        if not eq or not name:
            raise ConfigError(f"--teacher-weight {item!r}: expected NAME=LAMBDA")
    return out
