"""Stores and corpora on object storage, for real: an S3-compatible server on loopback (moto),
reached through s3fs by the CLI in fresh processes, DataLoader workers included."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from helpers import store_arrays


STUDENT = "vit_tiny_patch16_224,img_size=32,depth=1"


def _cli(s3, *args, creds_in_options=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    opts = s3.options()
    if creds_in_options:  # credentials only on the command line, none in the environment
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(k, None)
        opts += ["--storage-option", f"key={s3.env['AWS_ACCESS_KEY_ID']}",
                 "--storage-option", f"secret={s3.env['AWS_SECRET_ACCESS_KEY']}"]
    env.pop("FSSPEC_S3_ENDPOINT_URL", None)
    p = subprocess.run([sys.executable, "-m", "kdcache", *args, *opts], capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in p.stdout + p.stderr  # credentials are never printed
    return p


@pytest.fixture(scope="module")
def local_ref(vit_store):
    return vit_store


def test_extract_verify_train_from_s3_equal_the_local_store(tmp_path, s3, corpus, vit_spec, local_ref):
    bucket = s3.bucket()
    for f in sorted(os.listdir(corpus)):
        s3.fs.put(os.path.join(corpus, f), f"{bucket}/corpus/{f}")
    data, store = f"s3://{bucket}/corpus", f"s3://{bucket}/s.zarr"
    p = _cli(s3, "extract", data, "--out", store, "-t", vit_spec, "--views", "2", "--workers", "1", "--no-progress",
             "--decode", "full", creds_in_options=True)  # as the local store (conftest)
    assert p.returncode == 0 and "extracted 24 images" in p.stdout, p.stderr[-2000:]
    got, ref = store_arrays(store), store_arrays(local_ref)
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    info = json.loads(_cli(s3, "info", store, "--json").stdout)
    assert info["samples"] == 24 and info["shards_complete"] == 3
    v = _cli(s3, "verify", store, "--data", data)
    assert v.returncode == 0 and "0 problem(s)" in v.stdout
    e = _cli(s3, "eval", "knn", "--store", store, "--data", data, "--json")
    assert e.returncode == 0 and json.loads(e.stdout)["n_train"] + json.loads(e.stdout)["n_val"] == 24
    run = tmp_path / "run"
    t = _cli(s3, "train", "--store", store, "--data", data, "--student", STUDENT, "--out", str(run), "--epochs", "1",
             "--batch-size", "4", "--workers", "1", "--head-hidden", "16", "--amp", "none", "--no-progress",
             creds_in_options=True)
    assert t.returncode == 0 and json.loads(t.stdout)["steps"] == 6, t.stderr[-2000:]
    # no credentials in the store's objects or the run directory
    secret = s3.env["AWS_SECRET_ACCESS_KEY"].encode()
    for obj in s3.fs.find(bucket):
        assert secret not in s3.fs.cat(obj), obj
    for root, _, files in os.walk(run):
        for f in files:
            assert secret not in open(os.path.join(root, f), "rb").read(), f
    assert zarr.open_group(store, mode="r").attrs["kdcache"]["corpus"]["spec"] == data


def test_a_storage_option_without_a_remote_url_is_an_error(tmp_path, s3, corpus):
    p = _cli(s3, "info", str(tmp_path / "x.zarr"))
    assert p.returncode == 2 and "no STORE or DATA here is an fsspec URL" in p.stderr
