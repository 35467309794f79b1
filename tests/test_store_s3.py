"""Stores on S3-compatible object storage, against a local S3 server (moto's, started by the module).

A killed extraction resumes to the same bytes as an uninterrupted one; two writers cannot own one shard;
the commands read and write ``s3://`` stores; bad credentials, a missing bucket and an unreachable
endpoint end in one line naming the store; the secret never reaches a store or a run directory.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from s3_server import free_port, s3_server

from amflow.cli import main
from stage1_extract.videos.bucket import clip_source, location
from stage1_extract.videos.clip_paths import PathOutsideRoot
from stage1_extract.videos.datasets import build_index
from stage1_extract.videos.synthetic import make_folder_dataset
from stage2_temporal.training.synthetic import synthetic_cache, write_store
from store import FeatureStore, ShardBusyError, StoreError, import_h5, is_store, load_arrays, verify_store
from store.objects import ObjectIO, ObjectLease, StoreURL

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "amflow-test"
TINY = "configs/models/amflow_tiny.yaml"
SMALL = ["model.backbone.timm_kwargs.depth=2", "model.backbone.img_size=32", "num_frames=4"]
HEADS = ["heads.flow_maps=false", "heads.hidden=8", "heads.last_frame=true", "epochs=2", "patience=null"]
pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")


@pytest.fixture(scope="module")
def s3():
    """The local server, with the AWS variables of this process pointing at it."""
    with s3_server((BUCKET,)) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    make_folder_dataset(root, ["left", "right", "up"], {"train": 3, "val": 1}, 32, 6, seed=0)
    return root


@pytest.fixture(scope="module")
def bucket_videos(s3, videos):
    """The same videos uploaded under a prefix of the bucket (a dataset root on object storage)."""
    io = ObjectIO(StoreURL.parse(f"s3://{BUCKET}/videos"))
    for path in sorted(videos.rglob("*")):
        if path.is_file():
            io.put(path.relative_to(videos).as_posix(), path.read_bytes())
    return f"s3://{BUCKET}/videos"


@pytest.fixture(scope="module")
def heads_stores(s3):
    """A training and a validation store on the server (synthetic features, 4 classes)."""
    fields = {"model": "synthetic", "frames": 4}
    train, val = f"s3://{BUCKET}/heads/train.zarr", f"s3://{BUCKET}/heads/val.zarr"
    write_store(synthetic_cache(32, seed=0, flow_blocks=0), train, fields, shard_clips=8)
    write_store(synthetic_cache(16, seed=1, flow_blocks=0), val, fields, shard_clips=8)
    return train, val


def extract_argv(videos: Path | str, out: str) -> list[str]:
    args = ["extract", "--dataset", "folder", "--root", str(videos), "--split", "train", "--config", TINY]
    return [*args, "--out", out, "--decode-workers", "0", "--shard-clips", "2", *SMALL]


def write_grid(folder: Path, rates: tuple[float, ...] = (0.003, 0.001)) -> str:
    """A sweep of learning rates over one-epoch tiny heads."""
    fixed = {"epochs": 1, "heads.hidden": 8, "heads.flow_maps": False}
    grid = {"base": "heads/tiny.yaml", "fixed": fixed, "grid": {"lr": list(rates)}}
    (folder / "grid.yaml").write_text(yaml.safe_dump(grid))
    return str(folder / "grid.yaml")


def objects_of(url: str) -> dict[str, bytes]:
    """Every array object of a store (attributes and leases left out), key -> bytes."""
    io = ObjectIO(StoreURL.parse(url))
    keys = [m["path"] for m in io.list() if "/" in m["path"] and not m["path"].startswith("_locks/")]
    return {k: bytes(io.get(k)) for k in sorted(keys)}


# A child process that runs `amflow extract` and SIGKILLs itself in its second shard commit, after the
# shard's data objects are written and before its status object is: the window a crash must survive.
# One torch thread, as in this process (conftest), so both compute bit-identical features.
KILLED_EXTRACT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from store import writer
original, count = writer.ShardWriter._write_texts, [0]
def patched(self, *args):
    count[0] += 1
    if count[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, *args)
writer.ShardWriter._write_texts = patched
from amflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_extraction_resumes_to_the_same_bytes(s3, videos, capsys):
    reference, killed = f"s3://{BUCKET}/ref.zarr", f"s3://{BUCKET}/killed.zarr"
    assert main(extract_argv(videos, reference)) == 0
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_EXTRACT, *extract_argv(videos, killed)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    st = FeatureStore.open(killed)
    assert 0 < st.counts()["done"] < st.num_clips, "killed mid-run: some shards done, not all"
    assert st.status()[2:].max() == 0, "the shard killed between its data and its status is not done"
    assert verify_store(st, progress=False) == []
    assert ObjectIO(st.path).head("_locks/shard_000001.lock") is not None, "the dead writer's lease is left"

    assert main(extract_argv(videos, killed)) == 0  # takes the dead writer's lease over, resumes
    capsys.readouterr()
    got, want = objects_of(killed), objects_of(reference)
    assert got.keys() == want.keys() and len(got) > 10
    assert all(got[k] == want[k] for k in want), [k for k in want if got[k] != want[k]]
    assert not [m for m in ObjectIO(st.path).list("_locks/")], "every lease is released"


def test_extract_from_an_s3_root_matches_a_local_root(s3, videos, bucket_videos, capsys):
    """Videos and the folder listing read from the bucket: the same clips, labels and chunk bytes."""
    reference = f"s3://{BUCKET}/ref.zarr"
    if not is_store(reference):
        assert main(extract_argv(videos, reference)) == 0
    capsys.readouterr()
    listed = []
    for root in (videos, bucket_videos):
        assert main(["datasets", "list", "--dataset", "folder", "--root", str(root), "--split", "train"]) == 0
        listed.append(capsys.readouterr().out)
    assert listed[0] == listed[1] and len(listed[0].splitlines()) == 9
    url = f"s3://{BUCKET}/from_bucket.zarr"
    argv = extract_argv(bucket_videos, url)
    argv[argv.index("--decode-workers") + 1] = "1"  # a spawned decoding worker (the client cannot fork)
    assert main(argv) == 0
    got, want = objects_of(url), objects_of(reference)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)
    assert FeatureStore.open(url).provenance["root"] == bucket_videos
    capsys.readouterr()
    assert main(extract_argv(videos, url)) == 0  # the fingerprint hashes no video: a local copy resumes it
    assert "already complete (9 done, 0 failed)" in capsys.readouterr().out


# Each release's layout (tests/test_datasets.py checks the readers on them): relative path -> content.
V = b"not decoded"
RELEASES: dict[str, dict[str, bytes | str]] = {
    "smarthome": {"mp4/Walk_p03_r01_v16_c06.mp4": V, "mp4/Cook.Cut_p02_r00_v02_c03.mp4": V,
                  "mp4/Pour.Fromcup_p03_r00_v01_c01.mp4": V, "mp4/holiday.mp4": V},
    "k400": {"annotations/train.csv": 'label,youtube_id,time_start,time_end,split\n"air drumming",a_b,13,23,'
             "train\nabseiling,xyz,0,10,train\nbowling,gone,5,15,train\n",
             "train/air drumming/a_b_000013_000023.mp4": V, "train/xyz_000000_000010.mp4": V},
    "ssv2": {"labels/labels.json": '{"Holding something": "0", "Pushing something": "1"}',
             "labels/train.json": '[{"id": "42", "template": "Pushing [something]"}, {"id": "7", "template": '
             '"Holding [something]"}, {"id": "8", "template": "Spinning"}]',
             "20bn-something-something-v2/42.webm": V, "20bn-something-something-v2/8.webm": V},
    "ucf101": {"ucfTrainTestlist/classInd.txt": "1 ApplyEyeMakeup\n2 YoYo\n",
               "ucfTrainTestlist/trainlist01.txt": "YoYo/v_YoYo_g01_c01.avi 2\nYoYo/v_YoYo_g02_c01.avi 2\n",
               "UCF-101/YoYo/v_YoYo_g01_c01.avi": V},
    "hmdb51": {"testTrainMulti_7030_splits/wave_test_split1.txt": "d.avi 1 \ne.avi 2 \nf.avi 1 \n/x.avi 1\n",
               "testTrainMulti_7030_splits/brush_test_split1.txt": "a.avi 1 \n",
               "wave/d.avi": V, "brush/a.avi": V},
    "diving48": {"Diving48_V2_train.json": '[{"vid_name": "x_1", "label": 4, "start_frame": 3, '
                 '"end_frame": 9}]', "rgb/x_1.mp4": V},
    "list": {"train.txt": "a/one.mp4 cat\n./a//two.mp4 dog\nb/three.mp4 cat\n", "classes.txt": "dog\ncat\n",
             "a/one.mp4": V, "a/two.mp4": V},
    "folder": {"train/cat/1.mp4": V, "train/cat/notes.txt": V, "validation/dog/2.mp4": V},
}  # fmt: skip


def test_every_dataset_reads_the_same_from_the_bucket(s3, tmp_path, capsys):
    """Annotation files and listings under an s3:// root give the index a local copy of the tree gives."""
    io = ObjectIO(StoreURL.parse(f"s3://{BUCKET}/releases"))
    for name, files in RELEASES.items():
        for rel, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_bytes(data)
            io.put(f"{name}/{rel}", data)

    def table(index) -> tuple:
        rows = [[(r.path, r.label, r.start_frame, r.end_frame) for r in records]
                for records in (index.records, index.missing, index.refused)]  # fmt: skip
        return (*rows, index.classes, index.skipped)

    for name in RELEASES:
        local = table(build_index(name, tmp_path / name, "train"))
        assert table(build_index(name, f"s3://{BUCKET}/releases/{name}", "train")) == local
        assert local[0] and (name != "hmdb51" or local[2] == [("/x.avi", 1, None, None)]), local
    with pytest.raises(FileNotFoundError, match=f"dataset root s3://{BUCKET}/releases/none holds no objects"):
        build_index("folder", f"s3://{BUCKET}/releases/none", "train")
    capsys.readouterr()
    argv = ["datasets", "list", "--dataset", "folder", "--root", "s3://no-such-bucket", "--split", "train"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "amflow datasets list: error: s3://no-such-bucket: listing failed: the bucket does not exist"
    )


def test_finetune_from_an_s3_root_matches_a_local_root(s3, videos, bucket_videos, tmp_path):
    argv = ["finetune", "--dataset", "folder", "--config", "configs/models/zeroi2v_tiny.yaml", "--quiet"]
    argv += ["--recipe", "configs/finetune/tiny.yaml", "model.backbone.img_size=32", "data.num_frames=4"]
    argv += ["model.backbone.timm_kwargs.depth=2", "epochs=1"]
    for name, root in (("local", videos), ("bucket", bucket_videos)):
        assert main([*argv, "--root", str(root), "--out", str(tmp_path / name)]) == 0
    local, bucket = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("local", "bucket"))
    for timing in ("seconds", "train_clips_per_second"):
        local.pop(timing), bucket.pop(timing)
    assert local == bucket and local["val"]["num_clips"] == 3  # the same training and validation
    assert yaml.safe_load((tmp_path / "bucket" / "config.yaml").read_text())["root"] == bucket_videos


def test_a_missing_or_corrupt_video_object_is_a_recorded_failure(s3, videos, tmp_path, capsys):
    """A list dataset whose annotation file (and classes.txt beside it) is an object of the bucket names an
    absent and a truncated video object: both are recorded failures naming their URL, as missing and
    corrupt local files are."""
    root = f"s3://{BUCKET}/listed"
    io = ObjectIO(StoreURL.parse(root))
    good = sorted(videos.rglob("*.mp4"))[0].read_bytes()
    io.put("clips/good.mp4", good)
    io.put("clips/bad.mp4", good[: len(good) // 3])
    lists = ObjectIO(StoreURL.parse(f"s3://{BUCKET}/lists"))
    lists.put("train.csv", b"path,label\nclips/good.mp4,cat\nclips/bad.mp4,dog\nclips/gone.mp4,dog\n")
    lists.put("classes.txt", b"dog\ncat\n")
    url = f"s3://{BUCKET}/listed.zarr"
    argv = ["extract", "--dataset", "list", "--root", root, "--split", "train", "--config", TINY]
    argv += ["--annotations", f"s3://{BUCKET}/lists/{{split}}.csv"]
    assert main([*argv, "--out", url, "--decode-workers", "0", *SMALL]) == 0
    assert "2 clips failed to decode" in capsys.readouterr().out
    st = FeatureStore.open(url)
    assert st.class_names == ["dog", "cat"] and st.labels.tolist() == [0, 0, 1]  # bad, gone, good
    failures = {f["clip_id"]: f for f in st.failures()}
    assert sorted(failures) == ["clips/bad.mp4", "clips/gone.mp4"]
    assert failures["clips/gone.mp4"]["error_type"] == "FileNotFoundError"
    assert failures["clips/gone.mp4"]["message"] == f"{root}/clips/gone.mp4: no such object"
    assert failures["clips/bad.mp4"]["message"].startswith(f"{root}/clips/bad.mp4")
    with pytest.raises(ValueError, match=f"^{root}/clips/good.mp4: {len(good)} bytes, more than the 100"):
        clip_source(root, "clips/good.mp4", max_bytes=100)
    for outside in ("../videos/train/up/up_0.mp4", "/etc/passwd"):
        with pytest.raises(PathOutsideRoot):
            clip_source(root, outside, max_bytes=1 << 20)
        with pytest.raises(PathOutsideRoot):
            location(root) / outside


def test_two_writers_cannot_own_one_shard(s3, heads_stores):
    url = heads_stores[1]
    first = FeatureStore.open(url, mode="r+").shard_writer(1)
    with pytest.raises(ShardBusyError, match="shard 1 is being written by another writer"):
        FeatureStore.open(url, mode="r+").shard_writer(1)
    first.close()
    FeatureStore.open(url, mode="r+").shard_writer(1).close()  # free again once released

    io = ObjectIO(StoreURL.parse(url))
    # A live lease of another machine is refused; once it is not renewed for the lease time, one of two
    # writers taking it over wins (If-Match on its ETag) and the other is refused.
    io.put("_locks/x.lock", json.dumps({"host": "elsewhere", "pid": 1}).encode(), mode="create")
    with pytest.raises(ShardBusyError, match="held by elsewhere"):
        ObjectLease(io, "_locks/x.lock", "x", lease_seconds=60).acquire()
    time.sleep(1.1)
    winner = ObjectLease(io, "_locks/x.lock", "x", lease_seconds=1).acquire()
    with pytest.raises(ShardBusyError):
        ObjectLease(io, "_locks/x.lock", "x", lease_seconds=60).acquire()
    winner.release()
    assert io.head("_locks/x.lock") is None


def test_commands_on_s3_stores(s3, heads_stores, tmp_path, capsys):
    train, val = heads_stores
    run = tmp_path / "run"
    argv = ["train-heads", "--store", train, "--val-store", val, "--config", "configs/heads/tiny.yaml"]
    assert main([*argv, "--out", str(run), "--quiet", "--no-tensorboard", *HEADS]) == 0
    # The same heads trained from a local copy of the stores: the same metrics.
    local = tmp_path / "local"
    for name, url in (("train", train), ("val", val)):
        main(["store", "export", url, "--h5", str(local / f"{name}.h5"), "--quiet"])
        main(["store", "import", str(local / f"{name}.h5"), "--out", str(local / f"{name}.zarr"), "--quiet"])
    argv_local = [*argv[:2], str(local / "train.zarr"), "--val-store", str(local / "val.zarr"), *argv[5:]]
    assert (
        main([*argv_local, "--out", str(tmp_path / "run_local"), "--quiet", "--no-tensorboard", *HEADS]) == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    local_metrics = json.loads((tmp_path / "run_local" / "metrics.json").read_text())
    assert metrics["val"] == local_metrics["val"]
    # train-heads wrote confusion_val.*: evaluating on the same store name replaces them
    assert (
        main(["evaluate", "--store", val, "--run", str(run), "--quiet", "--overwrite"]) == 0
    )  # train-heads wrote confusion_val

    sweep = ["sweep", "--store", train, "--val-store", val, "--grid", write_grid(tmp_path)]
    assert (
        main([*sweep, "--out", str(tmp_path / "sweep"), "--workers", "0", "--quiet", "--no-tensorboard"]) == 0
    )
    assert "2 runs: 2 trained" in capsys.readouterr().out

    # export wrote what the store holds
    with h5py.File(local / "val.h5") as f:
        np.testing.assert_array_equal(f["embeddings"][:], load_arrays(val, progress=False).embeddings)
    assert main(["store", "export", train, "--h5", "s3://amflow-test/x.h5"]) == 2  # a local file only
    assert main(["store", "info", train, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == train and info["done"] == 32 and info["arrays"]["embeddings"]["bytes_on_disk"] > 0

    # Nothing of the credentials is kept: not in the store's objects, the run directories or the output.
    kept = b"".join(objects_of(train).values()) + bytes(ObjectIO(StoreURL.parse(train)).get("zarr.json"))
    kept += b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".h5")
    assert s3.secret_key.encode() not in kept and s3.access_key.encode() not in kept
    assert s3.secret_key not in json.dumps(info)


def test_import_and_export_h5_on_s3_match_the_folder_store(s3, heads_stores, tmp_path, capsys, monkeypatch):
    """``store import`` into a bucket writes the objects a folder import writes as files; an interrupted
    import leaves no store; ``store export`` reads the imported store back to the same HDF5."""
    h5, url, folder = tmp_path / "train.h5", f"s3://{BUCKET}/imported.zarr", tmp_path / "imported.zarr"
    assert main(["store", "export", heads_stores[0], "--h5", str(h5), "--quiet"]) == 0

    reads = {"n": 0}
    original = h5py.Dataset.__getitem__

    def failing(self, key):  # the source fails in the second shard: the prefix is left without a store
        reads["n"] += 1
        if reads["n"] > 10:
            raise OSError("disk gone")
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", failing)
    with pytest.raises(OSError, match="disk gone"):
        import_h5(h5, url, progress=False)
    monkeypatch.undo()
    assert not is_store(url) and next(ObjectIO(StoreURL.parse(url)).list(), None) is not None

    for out in (url, str(folder)):  # the leftovers of the interrupted import are replaced
        assert main(["store", "import", str(h5), "--out", out, "--quiet"]) == 0
    got = objects_of(url)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {k: v for k, v in files.items() if "/" in k} == got and len(got) > 10
    assert FeatureStore.open(url).attrs == FeatureStore.open(folder).attrs
    assert FeatureStore.open(url).attrs == FeatureStore.open(heads_stores[0]).attrs

    capsys.readouterr()
    assert main(["store", "import", str(h5), "--out", url]) == 2
    exists = f"{url}: exists (pass overwrite=True / --overwrite to replace it)"
    assert capsys.readouterr().err.strip() == f"amflow store import: error: {exists}"
    assert main(["store", "import", str(h5), "--out", url, "--overwrite", "--quiet"]) == 0
    assert main(["store", "export", url, "--h5", str(tmp_path / "again.h5"), "--quiet"]) == 0
    with h5py.File(h5) as a, h5py.File(tmp_path / "again.h5") as b:
        assert dict(a.attrs) == dict(b.attrs) and set(a) == set(b)
        for name in a:
            np.testing.assert_array_equal(a[name][:], b[name][:])


def test_verify_and_repair_on_s3(s3, videos, capsys):
    url = f"s3://{BUCKET}/ref.zarr"  # the extraction of the kill test
    if not ObjectIO(StoreURL.parse(url)).head("zarr.json"):
        assert main(extract_argv(videos, url)) == 0
    before = objects_of(url)
    st = FeatureStore.open(url)
    key = st.chunk_key("embeddings", 1)
    ObjectIO(st.path).put(key, before[key][: len(before[key]) // 2])  # a truncated shard object
    assert main(["store", "verify", url, "--quiet"]) == 1
    assert "embeddings: shard 1 (clips 2..3) unreadable" in capsys.readouterr().err
    assert main(["store", "repair", url, "--quiet"]) == 0
    assert FeatureStore.open(url).counts()["missing"] == 2
    assert main(extract_argv(videos, url)) == 0
    assert main(["store", "verify", url, "--quiet"]) == 0
    assert objects_of(url) == before


@pytest.mark.parametrize("case", ["wrong secret", "missing bucket", "unreachable endpoint"])
def test_bad_object_store_ends_in_one_line(s3, case, capsys, monkeypatch):
    url = f"s3://{BUCKET}/heads/val.zarr"
    if case == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        why = "the secret key is wrong"
    elif case == "missing bucket":
        url = "s3://no-such-bucket/val.zarr"
        why = "the bucket does not exist"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        why = "cannot reach the endpoint"
    start = time.monotonic()
    code = main(["store", "info", url])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"amflow store info: error: {url}: ") and why in err, err
    assert seconds < 10
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err


def test_extract_and_sweep_on_workers_sharing_only_the_bucket(
    s3, videos, bucket_videos, heads_stores, tmp_path, capsys
):
    """Workers in their own processes and working folders; the store is the only thing they share with
    the client (the videos too, with --root s3://), and the sweep's runs come back to the client's folder
    through the scheduler."""
    from distributed import Client, LocalCluster

    reference = f"s3://{BUCKET}/ref.zarr"
    if not is_store(reference):
        assert main(extract_argv(videos, reference)) == 0
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        local_directory=str(tmp_path / "dask"),
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    with cluster, Client(cluster) as client:
        for i, worker in enumerate(sorted(client.scheduler_info()["workers"])):
            (tmp_path / f"worker{i}").mkdir()
            client.run(os.chdir, str(tmp_path / f"worker{i}"), workers=[worker])
        url = f"s3://{BUCKET}/cluster.zarr"
        assert main([*extract_argv(videos, url), "--scheduler", cluster.scheduler_address]) == 0
        assert objects_of(url) == objects_of(reference)
        url = f"s3://{BUCKET}/cluster_from_bucket.zarr"  # no worker has the videos: they read the bucket
        assert main([*extract_argv(bucket_videos, url), "--scheduler", cluster.scheduler_address]) == 0
        assert objects_of(url) == objects_of(reference)

        train, val = heads_stores
        sweep = ["sweep", "--store", train, "--val-store", val, "--grid", write_grid(tmp_path, (0.003,))]
        out = tmp_path / "sweep"
        sweep += ["--out", str(out), "--scheduler", cluster.scheduler_address, "--quiet", "--no-tensorboard"]
        assert main(sweep) == 0
    assert "1 runs: 1 trained" in capsys.readouterr().out
    (run,) = (out / "runs").iterdir()
    assert (run / "metrics.json").is_file() and (run / "heads.safetensors").is_file()
    with (out / "leaderboard.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["done"]


def test_a_forked_child_gets_an_error_not_a_hang(s3, heads_stores):
    """obstore's runtime threads do not survive fork(): a forked child that opens the store is told so."""
    FeatureStore.open(heads_stores[0])  # the parent's runtime has started
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only for the expected one-line error
        signal.alarm(20)
        try:
            FeatureStore.open(heads_stores[0])
        except StoreError as e:
            os._exit(0 if "do not survive fork()" in str(e) else 1)
        os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0


def test_store_throughput_benchmark_on_the_server(s3, tmp_path, capsys, monkeypatch):
    argv = ["--clips", "12", "--adapters", "2", "--frames", "2", "--dim", "8", "--cls-dim", "4"]
    argv += ["--shard-clips", "4", "--batch-size", "4", "--repeats", "1", "--dir", str(tmp_path)]
    monkeypatch.setattr(
        sys, "argv", ["store_throughput.py", *argv, "--store-url", f"s3://{BUCKET}/bench.zarr"]
    )
    runpy.run_path(str(ROOT / "benchmarks" / "store_throughput.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert f"s3://{BUCKET}/bench.zarr against local disk" in out
    for pattern in ("write (one PUT per shard file)", "batches of 4", "stage-2 epoch, streamed"):
        assert pattern in out
    assert re.search(r"fetch every shard, nothing else +\d+ +\d+ +\d+\.\d\d\n", out)  # the tiny store: 0 MB/s
    assert re.search(r"object-store epoch / the server's floor \(median times\): \d+\.\d\d\n", out)
    assert FeatureStore.open(f"s3://{BUCKET}/bench.zarr").counts()["done"] == 12


def test_errors_inside_zarr_name_the_store(s3, heads_stores, monkeypatch):
    """What Zarr reads and writes itself (metadata, labels, failure texts) fails in one line too."""
    import zarr

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreError, match=r"^s3://amflow-test/heads/val\.zarr: get \S+ failed: the secret"):
        zarr.open_group(ObjectIO(StoreURL.parse(heads_stores[1])).zarr_store(read_only=True), mode="r")


def test_a_writer_whose_lease_was_taken_over_writes_nothing(s3, heads_stores):
    url = heads_stores[0]
    st = FeatureStore.open(url, mode="r+")
    before = st.status().copy()
    writer = st.shard_writer(2)
    writer.reset(int(writer.start))  # a change to commit
    io = ObjectIO(StoreURL.parse(url))
    io.put("_locks/shard_000002.lock", b'{"host": "elsewhere"}')  # another writer took the shard over
    with pytest.raises(ShardBusyError, match="lost the lease on shard 2"):
        writer.commit()
    np.testing.assert_array_equal(FeatureStore.open(url).status(), before)
    with pytest.raises(ShardBusyError):
        writer.close()  # refuses again, and lets the shard go without deleting the other writer's lease
    assert io.head("_locks/shard_000002.lock") is not None
    io.delete("_locks/shard_000002.lock")


def test_streamed_batches_from_s3_read_each_shard_with_one_get(s3, heads_stores, monkeypatch):
    """A stage-2 epoch from the bucket gives the in-memory batches exactly, fetching each shard's arrays
    with one whole GET each (no range requests for a selection of every adapter), as read-only views of
    the GET's buffer that raise no warning when batched."""
    import warnings

    import torch

    from stage2_temporal.training.data import load_store
    from stage2_temporal.training.stream import StreamedFeatures, store_selection
    from store import FeatureDataset
    from store.shards import read_shard_arrays

    train, _ = heads_stores
    fetched: list[str] = []  # the data arrays' chunk keys fetched, by GET or ranged GET
    for method in ("get", "get_ranges"):
        original = getattr(ObjectIO, method)

        def counted(self, key, *args, _method=method, _original=original):
            if key.split("/")[0] in ("embeddings", "cls"):
                fetched.append(f"{_method} {key}")
            return _original(self, key, *args)

        monkeypatch.setattr(ObjectIO, method, counted)
    st = FeatureStore.open(train)
    every = {"embeddings": list(range(len(st.adapter_names))), "cls": None}
    shard = read_shard_arrays(st, every, 1)
    assert fetched == [f"get {st.chunk_key('embeddings', 1)}", f"get {st.chunk_key('cls', 1)}"]
    assert not shard["embeddings"].flags.writeable and not shard["cls"].flags.writeable
    np.testing.assert_array_equal(shard["embeddings"], load_arrays(train, progress=False).embeddings[8:16])

    mem = load_store(train, progress=False)
    streamed = StreamedFeatures(train, memory_budget=2 * store_selection(train).shard_bytes)
    fetched.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "not writable" warning
        order = streamed.epoch_order(torch.Generator().manual_seed(0))
        for k in range(0, len(order), 5):
            clips, views = order[k : k + 5], torch.zeros(len(order[k : k + 5]), dtype=torch.long)
            a, b = mem.batch(clips, views, "cpu"), streamed.batch(clips, views, "cpu")
            for name in ("embeddings", "cls"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
        wanted = [f"get {st.chunk_key(n, s)}" for s in range(st.num_shards) for n in ("embeddings", "cls")]
        assert sorted(fetched) == sorted(wanted)  # each shard's arrays once, whole
        items = FeatureDataset(train, in_memory=False)[[3, 17, 30]]
    expected = load_arrays(train, progress=False).embeddings[[3, 17, 30]].astype(np.float32)
    np.testing.assert_array_equal(items["embeddings"].numpy(), expected)
    streamed.close()
