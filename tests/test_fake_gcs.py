"""The offline GCS fake (tests/fake_gcs.py): epath's fsspec path and Orbax/TensorStore's native
gcs driver, both against one directory tree."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
from etils import epath

from fake_gcs import FakeGcsFileSystem, fake_gcs, fake_gcs_fixture  # noqa: F401  (fixture "fake_gcs")


# --------------------------------------------------------------------------------------------
# epath (fsspec backend) on gs:// paths


def test_epath_uses_fake_filesystem(fake_gcs):
    from etils.epath import backend

    p = epath.Path(fake_gcs.url("bucket", "x"))
    assert p._backend is backend.fsspec_backend
    assert isinstance(backend.fsspec_backend.fs(str(p)), FakeGcsFileSystem)


def test_epath_round_trip(fake_gcs):
    base = epath.Path(fake_gcs.url("bucket", "run"))
    f = base / "sub" / "a.txt"
    assert not f.exists()
    f.write_text("hello")  # no mkdir needed, as on GCS
    assert f.exists() and not f.is_dir()
    assert (base / "sub").is_dir()
    # The bytes are at root/bucket/key on disk.
    on_disk = fake_gcs.root / "bucket" / "run" / "sub" / "a.txt"
    assert on_disk.read_text() == "hello"
    assert fake_gcs.local_path("bucket", "run/sub/a.txt") == on_disk

    with f.open("a") as fh:
        fh.write(" world")
    assert f.read_text() == "hello world"
    assert on_disk.read_bytes() == b"hello world"
    assert f.stat().length == len(b"hello world")
    assert not f.stat().is_directory

    with (base / "b.bin").open("wb") as fh:
        fh.write(b"\x00\x01")
    assert (base / "b.bin").read_bytes() == b"\x00\x01"
    with (base / "b.bin").open("rb") as fh:
        assert fh.read() == b"\x00\x01"
    (base / "c.txt").write_bytes(b"c")

    # Listing: names come back as gs:// paths.
    assert sorted(p.name for p in base.iterdir()) == ["b.bin", "c.txt", "sub"]
    assert sorted(os.fspath(p) for p in base.glob("*.txt")) == [fake_gcs.url("bucket", "run/c.txt")]
    assert sorted(os.fspath(p) for p in base.glob("*")) == sorted(
        fake_gcs.url("bucket", f"run/{n}") for n in ("b.bin", "c.txt", "sub")
    )

    # mkdir
    d = base / "made" / "deep"
    with pytest.raises(FileNotFoundError):
        d.mkdir()
    d.mkdir(parents=True)
    assert d.is_dir()
    with pytest.raises(FileExistsError):
        d.mkdir()
    d.mkdir(exist_ok=True)

    # rename / replace
    (base / "c.txt").rename(base / "c2.txt")
    assert not (base / "c.txt").exists() and (base / "c2.txt").read_text() == "c"
    with pytest.raises(FileExistsError):
        (base / "c2.txt").rename(base / "b.bin")
    (base / "c2.txt").replace(base / "b.bin")
    assert (base / "b.bin").read_text() == "c"
    assert not (fake_gcs.root / "bucket" / "run" / "c2.txt").exists()
    (base / "sub").rename(base / "sub2")
    assert (base / "sub2" / "a.txt").read_text() == "hello world"
    assert not (base / "sub").exists()

    # unlink / rmtree
    (base / "b.bin").unlink()
    assert not (base / "b.bin").exists()
    (base / "b.bin").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (base / "b.bin").unlink()
    base.rmtree()
    assert not base.exists()
    assert not (fake_gcs.root / "bucket" / "run").exists()
    assert (fake_gcs.root / "bucket").is_dir()


def test_files_put_on_disk_are_visible(fake_gcs):
    on_disk = fake_gcs.local_path("other-bucket", "k/v.json")
    on_disk.parent.mkdir(parents=True)
    on_disk.write_text('{"a": 1}')
    p = epath.Path("gs://other-bucket/k/v.json")
    assert json.loads(p.read_text()) == {"a": 1}
    assert [x.name for x in epath.Path("gs://other-bucket/k").iterdir()] == ["v.json"]


def test_context_undoes_everything(tmp_path):
    import fsspec
    from fsspec.registry import _registry

    before_env = {k: os.environ.get(k) for k in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
    before_impl = _registry.get("gs")
    with fake_gcs(tmp_path / "one") as g:
        assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == g.server.url
        assert fsspec.get_filesystem_class("gs") is FakeGcsFileSystem
        epath.Path("gs://bucket/one.txt").write_text("1")
        with pytest.raises(RuntimeError):
            with fake_gcs(tmp_path / "nested"):
                pass
    assert {k: os.environ.get(k) for k in before_env} == before_env
    assert _registry.get("gs") is before_impl
    assert (tmp_path / "one" / "bucket" / "one.txt").read_text() == "1"
    # A second context has its own root, the same server (TensorStore keeps its URL).
    with fake_gcs(tmp_path / "two") as g2:
        assert g2.server is g.server
        assert not epath.Path("gs://bucket/one.txt").exists()
        epath.Path("gs://bucket/two.txt").write_text("2")
    assert (tmp_path / "two" / "bucket" / "two.txt").read_text() == "2"
    assert not (tmp_path / "one" / "bucket" / "two.txt").exists()


# --------------------------------------------------------------------------------------------
# The JSON API itself, checked with plain HTTP


def _http(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_json_api(fake_gcs):
    base = fake_gcs.endpoint
    up = f"{base}/upload/storage/v1/b/bkt/o?uploadType=media&name=dir%2Fobj"
    status, _, body = _http("POST", up + "&ifGenerationMatch=0", b"0123456789")
    assert status == 200
    meta = json.loads(body)
    gen = int(meta["generation"])
    assert meta["name"] == "dir/obj" and meta["size"] == "10" and meta["bucket"] == "bkt"
    assert (fake_gcs.root / "bkt" / "dir" / "obj").read_bytes() == b"0123456789"
    # "must not exist" now fails; so does a wrong generation.
    assert _http("POST", up + "&ifGenerationMatch=0", b"x")[0] == 412
    assert _http("POST", up + f"&ifGenerationMatch={gen + 1}", b"x")[0] == 412

    obj = f"{base}/storage/v1/b/bkt/o/dir%2Fobj"
    status, headers, body = _http("GET", obj + "?alt=media")
    assert (status, body, int(headers["x-goog-generation"])) == (200, b"0123456789", gen)
    status, headers, body = _http("GET", obj + "?alt=media", headers={"Range": "bytes=2-4"})
    assert (status, body, headers["Content-Range"]) == (206, b"234", "bytes 2-4/10")
    assert _http("GET", obj + "?alt=media", headers={"Range": "bytes=-3"})[2] == b"789"
    assert _http("GET", obj + "?alt=media", headers={"Range": "bytes=8-"})[2] == b"89"
    assert _http("GET", obj + "?alt=media", headers={"Range": "bytes=10-"})[0] == 416
    assert _http("GET", obj + f"?alt=media&ifGenerationNotMatch={gen}")[0] == 304
    assert _http("GET", obj + f"?alt=media&ifGenerationMatch={gen + 1}")[0] == 412
    assert json.loads(_http("GET", obj)[2])["generation"] == str(gen)

    # Overwrite with the right generation: a new, different generation.
    status, _, body = _http("POST", up + f"&ifGenerationMatch={gen}", b"new")
    assert status == 200 and int(json.loads(body)["generation"]) != gen

    # Listing, paged.
    for i in range(5):
        assert _http("POST", f"{base}/upload/storage/v1/b/bkt/o?uploadType=media&name=l%2F{i}", b"%d" % i)[0] == 200
    names, token = [], None
    while True:
        url = f"{base}/storage/v1/b/bkt/o?prefix=l%2F&maxResults=2" + (f"&pageToken={token}" if token else "")
        page = json.loads(_http("GET", url)[2])
        names += [it["name"] for it in page.get("items", [])]
        assert all(it["size"] == "1" for it in page.get("items", []))
        token = page.get("nextPageToken")
        if not token:
            break
    assert names == [f"l/{i}" for i in range(5)]
    listing = json.loads(_http("GET", f"{base}/storage/v1/b/bkt/o?delimiter=%2F")[2])
    assert listing.get("prefixes") == ["dir/", "l/"] and "items" not in listing
    ranged = json.loads(_http("GET", f"{base}/storage/v1/b/bkt/o?startOffset=l%2F1&endOffset=l%2F3")[2])
    assert [it["name"] for it in ranged["items"]] == ["l/1", "l/2"]

    # Delete, and 404s with a JSON error body.
    assert _http("DELETE", obj + "?ifGenerationMatch=1")[0] == 412
    assert _http("DELETE", obj)[0] == 204
    assert not (fake_gcs.root / "bkt" / "dir").exists()  # an empty prefix is gone, as on GCS
    status, _, body = _http("GET", obj + "?alt=media")
    assert status == 404 and json.loads(body)["error"]["code"] == 404
    assert _http("DELETE", obj)[0] == 404
    assert _http("GET", obj + "?alt=media&ifGenerationMatch=0")[0] == 204


# --------------------------------------------------------------------------------------------
# Orbax through TensorStore's gcs driver


def _tree():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets up 8 fake CPU devices"
    mesh = Mesh(np.array(devices), ("x",))
    sharded = jax.device_put(
        jnp.arange(16 * 6, dtype=jnp.float32).reshape(16, 6), NamedSharding(mesh, P("x", None))
    )
    return {
        "params": {"w": sharded, "b": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.bfloat16)},
        "step": jnp.asarray(7, jnp.int32),
    }


def _scaled(tree, k):
    import jax

    return jax.tree_util.tree_map(lambda x: (x * k).astype(x.dtype), tree)


def _abstract(tree):
    import jax

    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_orbax_checkpoint_manager_on_gs(fake_gcs):
    import jax
    import orbax.checkpoint as ocp

    tree = _tree()
    saved = {1: _scaled(tree, 1), 2: _scaled(tree, 3), 3: _scaled(tree, 5)}
    expected = {s: jax.tree_util.tree_map(np.asarray, t) for s, t in saved.items()}  # host copies
    directory = epath.Path(fake_gcs.url("bucket", "ckpt"))
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=True)

    with ocp.CheckpointManager(directory, options=options) as mngr:
        for step in (1, 2):
            assert mngr.save(step, args=ocp.args.StandardSave(saved[step]))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2]

    # The array data went through the native gcs driver: uploads of step 1's and step 2's chunks.
    uploads = [r.query["name"] for r in fake_gcs.requests if r.kind == "upload" and r.status == 200]
    for step in (1, 2):
        assert any(n.startswith(f"ckpt/{step}/") for n in uploads), uploads
    assert all(r.status < 500 for r in fake_gcs.requests), [r for r in fake_gcs.requests if r.status >= 500]
    # ... and landed in the bucket directory, next to what epath wrote.
    step1 = fake_gcs.root / "bucket" / "ckpt" / "1"
    assert step1.is_dir() and any(p.is_file() for p in step1.rglob("*"))
    assert sorted(p.name for p in (fake_gcs.root / "bucket" / "ckpt").iterdir()) == ["1", "2"]

    # A fresh manager (nothing cached in Python) finds both steps and restores step 1.
    n_before = len(fake_gcs.requests)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        assert mngr.all_steps() == [1, 2]
        assert mngr.latest_step() == 2
        restored = mngr.restore(1, args=ocp.args.StandardRestore(_abstract(tree)))
        reads = [r for r in fake_gcs.requests[n_before:] if r.kind in ("media", "metadata") and r.status == 200]
        assert any("ckpt%2F1%2F" in r.path for r in reads), reads

        flat_r, def_r = jax.tree_util.tree_flatten(restored)
        flat_e, def_e = jax.tree_util.tree_flatten(expected[1])
        assert def_r == def_e
        for r, e in zip(flat_r, flat_e):
            assert r.dtype == e.dtype and r.shape == e.shape
            np.testing.assert_array_equal(np.asarray(r), e)
        assert restored["params"]["w"].sharding == tree["params"]["w"].sharding
        # Not step 2's values.
        assert not np.array_equal(np.asarray(restored["params"]["w"]), expected[2]["params"]["w"])

        # A third save: max_to_keep=2 deletes step 1, from the bucket too.
        assert mngr.save(3, args=ocp.args.StandardSave(saved[3]))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3]
    assert not step1.exists()
    assert sorted(p.name for p in (fake_gcs.root / "bucket" / "ckpt").iterdir()) == ["2", "3"]

    with ocp.CheckpointManager(directory, options=options) as mngr:
        assert mngr.all_steps() == [2, 3]
        restored3 = mngr.restore(3, args=ocp.args.StandardRestore(_abstract(tree)))
    np.testing.assert_array_equal(np.asarray(restored3["params"]["w"]), expected[3]["params"]["w"])
    np.testing.assert_array_equal(
        np.asarray(restored3["params"]["b"]).astype(np.float32), expected[3]["params"]["b"].astype(np.float32)
    )
