"""What every benchmark and study takes, with its defaults: the one place they live.

Light on purpose: ``kdcache bench ... --help`` shows these defaults without importing torch, and
each command builds one of these from its options and makes one call.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdcache.errors import KdcacheError

# The teacher the timed benches build when given none: a ViT-S/16 at 224 (random init; its cost,
# not its weights, is what they measure).
BENCH_TEACHER = "vit=vit_small_patch16_224,pretrained=false"
REPEAT = 5  # timed repetitions after one warm-up, every side interleaved (harness)


@dataclass(frozen=True)
class ExtractBench:
    teacher: str = BENCH_TEACHER
    images: int = 96
    batch_size: int = 16
    workers: int = 1
    codec: str = "auto"
    quantize: str | None = None  # also time the torch encoder on the teacher's patches
    logits: int = 0  # also time the pipeline storing the top-K soft labels: the cost they add
    views: int = 1  # K views the pipeline sides store per image (the bare forward runs each image's eval view)
    decodes: bool = False  # also the pipeline with --decode reduced, and each store's fidelity to its teacher
    fidelity_samples: int = 16  # --decodes: images whose every view is recomputed (eval fidelity --store)
    threads: int = 0  # torch threads of the forward, both sides; 0 = the cores the decode workers leave (at least 1)
    repeat: int = REPEAT
    as_json: bool = False


@dataclass(frozen=True)
class TrainBench:
    teacher: str = BENCH_TEACHER
    student: str = "resnet18,img_size=224"
    images: int = 96
    batch_size: int = 16
    steps: int = 6
    workers: int = 1
    quantize: str | None = None  # the cached side reads codes
    amp: str = "auto"  # as `train --amp`: auto is bf16 on CUDA, off on a CPU
    repeat: int = REPEAT
    as_json: bool = False


@dataclass(frozen=True)
class LoadBench:
    store: str | None = None  # default: build one from the demo corpus
    data: str | None = None
    teacher: str = BENCH_TEACHER
    # 8 corpus shards per epoch: each epoch (a fresh DataLoader worker) pays its first shard's
    # first block before a sample leaves (later shards are opened ahead); at 2 shards that fixed
    # stall was 0.12 ms of every sample, in training it is once per epoch of thousands of shards
    images: int = 2048
    # per corpus shard: real corpora hold thousands (webdataset's advice: 100 MB-1 GB shards); at 32 the
    # per-shard start-up (the shard's attributes, arrays, keys and views) was paid every 32 samples
    shard_size: int = 256
    workers: int = 1
    batch_size: int = 16
    s3: str = "auto"  # auto: also a loopback moto S3 server; off; or an s3:// URL
    repeat: int = REPEAT
    as_json: bool = False
    # the store the bench builds also holds the patch tokens as codes (keeping the floats): the
    # loader's share of the floor at 1/16 of the patch bytes; "none": floats only
    codes: str = "opq:M=48"
    decode_sizes: tuple[int, ...] = (256, 500, 1000)  # long sides of the JPEGs of the decode table
    decode_images: int = 64  # JPEGs per side of the decode table
    # the student's input: the view every loader side and the decode table cut (64: the cheapest decode, so the
    # largest share of a sample's time for its targets)
    student_size: int = 64
    # stored views per image of the store the bench builds: a block holds every view of its rows
    # and the loader reads it whole, so each epoch reads K views per sample to deliver one
    views: int = 1
    # stored view pixels (extract --pixels): for each size, the corpus loader against the store's own JPEG and raw
    # crops at that student input, in one table of its own; () = none
    pixel_sizes: tuple[int, ...] = (64, 224)
    # photos of the pixel table's own corpus (camera-size JPEGs: bench.loading.photo_corpus): an epoch's start
    # (the first block read before a batch leaves, the DataLoader's prefetch filling) is paid once per epoch
    # (and a timed run is several epochs of the fast sides: ``seconds``)
    pixel_images: int = 1024
    pixel_long_side: int = 500  # their long side, px
    pixel_workers: tuple[int, ...] = (1, 2)  # DataLoader workers of the pixel table's sides: one measurement each
    # each timed run of a loader side: whole epochs, as many as last this long (harness.lasting). One epoch of the
    # pixel table's fastest sides is ~60 ms, of which its start (first blocks, prefetch filling and draining)
    # was a large share; a training epoch pays it once in thousands of batches
    seconds: float = 1.0

    def __post_init__(self):
        if self.store and not self.data:
            raise KdcacheError("--store needs --data (the corpus it was extracted from)")
        if not self.seconds >= 0:
            raise KdcacheError(f"--seconds {self.seconds}: must be >= 0")
        if self.views < 1:
            raise KdcacheError(f"--views {self.views}: a store holds at least one view per image")
        if self.codes != "none":
            from kdcache.quantize.quantizer_spec import QuantizerSpec
            QuantizerSpec.parse(self.codes)  # a bad spec fails before the store is built


SCALE_COMMANDS = ("info", "store ls", "verify --metadata-only", "train to step 1", "train resume", "eval knn --store")


@dataclass(frozen=True)
class PlanBench:
    """``kdcache bench scale --plan``: the share of an epoch a cluster delivers, by the trainer's split."""

    layouts: tuple[tuple[int, int], ...] = ((147, 8700), (1282, 1000))  # (shards, samples per shard)
    ranks: tuple[int, ...] = (8, 64, 256)
    workers: int = 8
    batch_size: int = 256
    last_batch: str = "partial"
    windows: tuple[int, ...] = (256, 1024, 4096)  # --shuffle-buffer values whose mixing is measured
    as_json: bool = False

    def __post_init__(self):
        from kdcache.data.partition import LAST_BATCH
        if self.last_batch not in LAST_BATCH:
            raise KdcacheError(f"--last-batch {self.last_batch!r}: expected one of {', '.join(LAST_BATCH)}")
        if self.workers < 0 or self.batch_size < 1 or not self.ranks or min(self.ranks) < 1:
            raise KdcacheError("--plan: ranks >= 1, workers >= 0 and a batch size >= 1")


@dataclass(frozen=True)
class ScaleBench:
    out: str  # corpora and stores are built here once and reused
    shards: tuple[int, ...] = (100, 1000, 10000)
    s3: str = "auto"  # auto: also on a loopback moto S3 server (requests counted); off
    commands: tuple[str, ...] = SCALE_COMMANDS
    repeat: int = 3
    progress: bool = True
    as_json: bool = False

    def __post_init__(self):
        unknown = [c for c in self.commands if c not in SCALE_COMMANDS]
        if unknown:
            raise KdcacheError(f"--command {unknown[0]!r}: expected one of {', '.join(SCALE_COMMANDS)}")
        if self.s3 not in ("auto", "off"):
            raise KdcacheError(f"--s3 {self.s3!r}: expected auto or off")


QUANTIZE_METHODS = ("pq", "pca", "opq", "opq+norm", "rq", "rq+norm", "sq8", "sq4")


@dataclass(frozen=True)
class QuantizeBench:
    store: str | None = None
    teacher: str | None = None
    npy: str | None = None
    minilm: int | None = None
    effnet: bool = False
    curve: bool = False
    other_source: bool = False
    methods: tuple[str, ...] = QUANTIZE_METHODS
    fractions: tuple[int, ...] | None = None  # default (64, 32, 16); with curve (16, 32)
    beams: tuple[int, ...] = (8, 16, 32)
    refines: tuple[int, ...] = (0, 2, 4)
    beam: int = 4
    refine: int = 0
    train_tokens: int = 65536
    repeat: int = REPEAT
    as_json: bool = False

    def __post_init__(self):
        if sum(bool(x) for x in (self.store, self.npy, self.minilm, self.effnet)) != 1:
            raise KdcacheError("give exactly one of --store, --npy, --minilm, --effnet")
        if self.curve and not (self.minilm or self.effnet):
            raise KdcacheError("--curve holds out another source: give --minilm or --effnet")

    @property
    def fractions_used(self) -> tuple[int, ...]:
        return self.fractions or ((16, 32) if self.curve else (64, 32, 16))


@dataclass(frozen=True)
class CodecBench:
    npy: str | None = None
    minilm: int | None = None
    codecs: tuple[str, ...] = ("none", "lz4", "zstd")
    repeat: int = REPEAT
    as_json: bool = False

    def __post_init__(self):
        if (self.npy is None) == (self.minilm is None):
            raise KdcacheError("give exactly one of --npy, --minilm")


@dataclass(frozen=True)
class FormatsBench:
    store: str | None = None  # default: the embedded corpus extracted with the shipped EfficientNet-Lite0
    teacher: str | None = None
    images: int = 256
    views: int = 2
    quantize: str | None = "opq"  # the quantized store side; None leaves it out
    fraction: int = 32
    workers: int = 1
    batch_size: int = 16
    warm: bool = False  # read from a warm page cache instead of dropping it
    peers: bool = True  # Mosaic streaming (MDS) and LitData rows, when installed (the peers extra)
    pixels: bool = True  # rows whose samples also hold every view's JPEG (extract --pixels): the store and the peers
    tmp: str | None = None
    repeat: int = REPEAT
    as_json: bool = False


# bench quality: variant name -> the quantizer spec at M=m (opq with 10 rotation alternations:
# faiss's 50 took over 25 minutes at M=160 on 1280-d here)
QUALITY_METHODS = {"pq": "pq:m={m}", "opq": "opq:m={m},opq_iter=10", "rq": "rq:m={m}", "rq+norm": "rq:m={m},norm=1"}


# bench quality: the derived-view options, as the rows of the study -> train options
QUALITY_OPTIONS = {"sub-views": {"sub_views": 0.25}, "cutmix": {"cutmix": 1.0}, "mixup": {"mixup": 0.8},
                   "dense": {"dense_views": True}, "opq 1/32": {}, "reduced decode": {"decode": "reduced"},
                   "stored pixels": {"images": "store"}}
# options compared, seed by seed, with the plain run on the same K store too (not only with online)
QUALITY_VS_STORE = ("opq 1/32", "reduced decode", "stored pixels")


@dataclass(frozen=True)
class QualityPlan:
    corpus: str | None = None  # default: the embedded corpus with `digits` + `photos` images (all labelled)
    teacher: str | None = None  # default: the shipped EfficientNet-Lite0 at `teacher_size`
    teacher_size: int = 96  # the shipped teacher's input (a CNN runs at any size): the study's cost
    student: str = "resnet18,img_size=48"
    schedules: tuple[int, ...] = (8, 32)  # epochs
    views: tuple[int, ...] = (1, 2, 4, 8)  # K of the fp16 stores (`extract --views K`; view 0 is the eval view)
    option_views: int = 4  # K of the store the option rows derive from (one of --views), at the longest schedule
    options: tuple[str, ...] = tuple(QUALITY_OPTIONS)
    seeds: tuple[int, ...] = (0, 1, 2)
    folds: int = 5  # k-fold kNN and linear probe over every labelled image
    digits: int = 240
    photos: int = 48
    batch_size: int = 32
    lr: float = 2e-3
    head_hidden: int = 128
    dense_scale: int = 2
    train_tokens: int = 4096
    workers: int = 1

    def __post_init__(self):
        unknown = [o for o in self.options if o not in QUALITY_OPTIONS]
        if unknown:
            raise KdcacheError(f"--option {unknown[0]!r}: expected one of {', '.join(QUALITY_OPTIONS)}")
        if self.options and self.option_views not in self.views:
            raise KdcacheError(f"--option-views {self.option_views}: must be one of --views {self.views}")
        if self.options and self.option_views < 2:
            raise KdcacheError(f"--option-views {self.option_views}: the options cut augmented views (K >= 2)")
        if self.folds < 2:
            raise KdcacheError(f"--folds {self.folds}: need at least 2")
        if not self.seeds or not self.schedules or not self.views:
            raise KdcacheError("--seeds, --schedules and --views need at least one value each")


# bench teachers: variant name -> train options ("pretrained_student": the shipped EfficientNet-Lite0
# as the student, learning the second teacher only); in the order they are trained
PRETRAINED_VARIANTS = {
    "EfficientNet-Lite0 fine-tuned on vit": {"pretrained_student": True, "teachers": ("vit",)},
    "EfficientNet-Lite0 frozen + adapters on vit": {"pretrained_student": True, "teachers": ("vit",),
                                                    "frozen_backbone": True, "adapter_rank": 8},
}
TEACHER_VARIANTS = {
    "static weights": {},
    "--head model-token": {"head": "model-token", "head_depth": 1, "head_heads": 4},
    "--ladder 2,3": {"ladder": (2, 3)},
    "task loss (static, weight 1)": {"task_loss": "ce"},
    "task loss + --balance dto": {"task_loss": "ce", "balance": "dto"},
    **PRETRAINED_VARIANTS,
    "PHI-S": {"normalize": "phi-s"},
    "--balance mgda": {"balance": "mgda"},
    "--teacher-drop 0.5": {"teacher_drop": 0.5},
    "--head transformer": {"head": "transformer", "head_depth": 2, "head_heads": 4},
    "--shared-adapter": {"shared_adapter": True},
    "task loss + --balance mgda": {"task_loss": "ce", "balance": "mgda"},
}
# what each variant is compared with, seed by seed (default: the plain per-teacher heads)
TEACHER_REFERENCES = {
    "task loss + --balance dto": ("static weights", "task loss (static, weight 1)"),
    "task loss + --balance mgda": ("static weights", "task loss (static, weight 1)"),
    "EfficientNet-Lite0 frozen + adapters on vit": ("EfficientNet-Lite0 fine-tuned on vit",),
    "EfficientNet-Lite0 fine-tuned on vit": (),  # another student: nothing of the ResNet's to compare with
}


@dataclass(frozen=True)
class TeachersPlan:
    """``bench teachers``: every option on the same store, several seeds (student init and batch
    order; the store and the teachers are fixed), each student scored by k-fold kNN on every
    labelled image and by its per-teacher fidelity."""

    student: str = "resnet18,img_size=64"
    epochs: int = 32  # 4x the first round's 8
    batch_size: int = 32
    views: int = 2
    digits: int = 600
    photos: int = 120
    vit_epochs: int = 30
    lr: float = 2e-3
    head_hidden: int = 256
    workers: int = 1
    seed: int = 0  # of the ViT teacher and the store's views
    seeds: tuple[int, ...] = (0, 1, 2)  # of each student
    folds: int = 5
    variants: tuple[str, ...] = tuple(TEACHER_VARIANTS)

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in TEACHER_VARIANTS]
        if unknown:
            raise KdcacheError(f"--variant {unknown[0]!r}: expected one of {', '.join(map(repr, TEACHER_VARIANTS))}")
        if not self.seeds:
            raise KdcacheError("--seeds: give at least one")
        if self.folds < 2:
            raise KdcacheError(f"--folds {self.folds}: need at least 2")


@dataclass(frozen=True)
class SoftLabelsPlan:
    """``bench softlabels``: (a) the shipped ImageNet EfficientNet-Lite0 as the teacher, a student
    trained on photo crops and scored by its agreement with the teacher on held-out crops (another
    seed) of the same 19 photos: cached top-K vs online (full logits) vs cached top-1 (hard
    teacher labels);
    (b) a classifier teacher trained here on digits, students scored against held-out digit
    labels: soft labels, hard labels only, both; (c) bytes per view of top-K soft labels."""

    student: str = "resnet18,img_size=64"
    photos: int = 512  # training crops of the 19 photos of scikit-learn and scikit-image
    held_photos: int = 512  # held-out crops of the same photos (another seed: other boxes and sizes)
    views: int = 4
    k: int = 10
    epochs: int = 8
    batch_size: int = 32
    temperature: float = 1.0
    digit_student: str = "resnet18,img_size=32"
    digits: int = 600  # the first scans of load_digits train; the next ones are held out
    held_digits: int = 600
    digit_epochs: int = 8
    teacher_epochs: int = 30  # the digits teacher's supervised training
    bytes_k: tuple[int, ...] = (5, 10, 100)
    bytes_images: int = 512  # the store the bytes are measured on (one shard: its fixed costs amortised)
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: float = 2e-3
    workers: int = 1
    parts: tuple[str, ...] = ("imagenet", "digits", "bytes")

    def __post_init__(self):
        unknown = [p for p in self.parts if p not in ("imagenet", "digits", "bytes")]
        if unknown:
            raise KdcacheError(f"--part {unknown[0]!r}: expected imagenet, digits or bytes")
        if not self.seeds:
            raise KdcacheError("--seeds: at least one")
