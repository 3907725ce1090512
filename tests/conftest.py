"""Shared fixtures: tiny real-image corpora and tiny teachers with fixed weights.

Teachers are built with pretrained=False and their weights saved to safetensors once, so
every process (SIGKILL, torchrun subprocesses) loads the same weights via ``checkpoint=``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch

from kdcache.data.demo_corpus import build_demo_corpus

VIT = dict(model="vit_tiny_patch16_224", kwargs="img_size=32,depth=2")
CNN = dict(model="resnet18", kwargs="img_size=32")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two test workers on a 2-core machine: one thread each, so in-process torch does not
    # oversubscribe the cores (the processes tests start keep their own defaults)
    torch.set_num_threads(1)


def _save(model_name, path, **kw):
    torch.manual_seed(0)
    m = timm.create_model(model_name, pretrained=False, **kw)
    safetensors.torch.save_file(m.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    return {
        "vit": _save(VIT["model"], str(d / "vit.safetensors"), img_size=32, depth=2),
        "cnn": _save(CNN["model"], str(d / "cnn.safetensors")),
    }


@pytest.fixture(scope="session")
def vit_spec(weights):
    return f"vit={VIT['model']},pretrained=false,{VIT['kwargs']},checkpoint={weights['vit']}"


@pytest.fixture(scope="session")
def cnn_spec(weights):
    return f"cnn={CNN['model']},pretrained=false,{CNN['kwargs']},checkpoint={weights['cnn']}"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """3 webdataset shards of 8 real images each (digits + photo crops)."""
    d = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(str(d), digits=16, photos=8, shard_size=8, digit_size=40)
    return str(d)


@pytest.fixture(scope="session")
def vit_store(tmp_path_factory, corpus, vit_spec):
    """``corpus`` extracted with the ViT teacher, K=2 views: shared by readers that never write
    to it (tests that change a store copy it first)."""
    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    out = str(tmp_path_factory.mktemp("vit_store") / "s.zarr")
    # full-size decodes: tests compare the stored features and the loader's pixels with timm on full decodes
    extract(corpus, out, [vit_spec], ExtractOptions(views=2, decode="full", progress=False, workers=0))
    return out


@pytest.fixture(scope="session")
def two_teachers(tmp_path_factory, corpus, vit_spec, cnn_spec):
    """The corpus with two heterogeneous teachers in one store: a ViT (192-d, 2x2 grid) and a ResNet
    (512-d, 1x1), K=2 views."""
    from kdcache.extract.options import ExtractOptions
    from kdcache.extract.run import extract
    out = str(tmp_path_factory.mktemp("two") / "s.zarr")
    extract(corpus, out, [vit_spec, cnn_spec], ExtractOptions(views=2, progress=False, workers=0))
    return out


@pytest.fixture(scope="session")
def many_shards(tmp_path_factory):
    """6 shards of 6 images: for SIGKILL and torchrun."""
    d = tmp_path_factory.mktemp("many")
    build_demo_corpus(str(d), digits=24, photos=12, shard_size=6, digit_size=32)
    return str(d)


def run_cli(*args, env=None, check=True, timeout=300):
    """Run ``python -m kdcache`` in a fresh process with 1 BLAS thread (bitwise repeatable)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


class S3:
    """A loopback S3 server (moto) for the tests: its endpoint, a client filesystem, credentials."""

    def __init__(self, endpoint, env, server=None):
        import s3fs
        self.endpoint, self.env, self.server = endpoint, env, server
        self.fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"])

    def bucket(self) -> str:
        import uuid
        name = f"kdcache-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        return name

    def options(self) -> list[str]:
        return ["--storage-option", f"endpoint_url={self.endpoint}"]


@pytest.fixture(scope="session")
def s3():
    """Started here, on 127.0.0.1, for this test session only; fsspec's s3 configuration points at it.
    ``s3.server.requests()`` counts what it served."""
    import fsspec.config

    from kdcache.bench.s3_server import LoopbackS3
    server = LoopbackS3()
    env = {"AWS_ACCESS_KEY_ID": "kdcache-test-key", "AWS_SECRET_ACCESS_KEY": "kdcache-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(env)
    fsspec.config.conf["s3"] = {"endpoint_url": server.endpoint}
    try:
        yield S3(server.endpoint, env, server)
    finally:
        server.stop()
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
