"""Issue 21 §2, files from elsewhere are data, not instructions: an export, a merged model, a run directory
and its JSON are validated before use (bounded, consistent sizes; no path or download taken from them;
finite weights; a content hash checked at load); every refusal is one line naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from amflow.cli import main
from foundation.config import load_config
from foundation.formats import CONTENT_HASH_KEY, EXPORT_RECORD_KEY, CheckpointError, tensors_sha256
from stage2_temporal.inference.export import export_predictor, load_export
from stage2_temporal.inference.predict import load_predictor
from stage2_temporal.zeroi2v.model import ZeroI2VConfig, build_zeroi2v, load_merged, save_merged

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

SMALL = ["backbone.img_size=32", "backbone.timm_kwargs.depth=2", "num_classes=3"]


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def rewrite(src: Path, dst: Path, record=None, tensors=None, rehash: bool = True, **meta) -> Path:
    """A copy of ``src`` with its export record, tensors or metadata changed (by a user or an attacker)."""
    state, metadata = read(src)
    if record is not None:
        data = json.loads(metadata[EXPORT_RECORD_KEY])
        record(data)
        metadata[EXPORT_RECORD_KEY] = json.dumps(data)
    if tensors is not None:
        tensors(state)
        if rehash:
            metadata[CONTENT_HASH_KEY] = tensors_sha256(state)
    metadata.update(meta)
    save_file(state, str(dst), metadata=metadata)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A merged ZeroI2V model (3 classes, 32 px, 4 frames) and its export."""
    tmp = tmp_path_factory.mktemp("untrusted")
    cfg = load_config(ZeroI2VConfig, "configs/models/zeroi2v_tiny.yaml", SMALL)
    model = build_zeroi2v(cfg)
    from stage1_extract.methods.linear_adapters import merge_linear_adapters

    merge_linear_adapters(model.vit)
    merged = tmp / "merged.safetensors"
    save_merged(model, merged, {"class_names": json.dumps(["a", "b", "c"])})
    export = export_predictor(load_predictor(model=merged, device="cpu"), tmp / "export.safetensors")
    return merged, export


def video() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 1, 4, 3, 32, 32), dtype=np.uint8))


def refused(capsys, path: Path, *extra: str) -> str:
    """``predict --model path`` on a missing video: refused while loading, one line naming the file."""
    capsys.readouterr()
    code = main(["predict", "nothing.mp4", "--model", str(path), "--device", "cpu", *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING")]
    assert code == 2 and len(err) == 1 and err[0].startswith("amflow predict: error: "), err
    assert str(path) in err[0]
    return err[0]


def test_the_export_writes_a_hash_of_its_tensors_and_loads_as_written(files):
    merged, export = files
    state, meta = read(export)
    assert meta[CONTENT_HASH_KEY] == tensors_sha256(state)
    expected = load_predictor(model=merged, device="cpu")(video())
    np.testing.assert_allclose(load_export(export, device="cpu")(video()), expected, atol=1e-7)


def test_a_huge_frame_count_is_refused_before_anything_is_allocated(files, tmp_path, capsys):
    _, export = files

    def frames(n):
        return lambda r: r["data_config"].update(num_frames=n)

    line = refused(capsys, rewrite(export, tmp_path / "frames.safetensors", frames(100000)))
    assert "num_frames=100000 but the model takes 4 frames" in line

    def also_model(r):  # consistent with the model config, but a video would be 100000 x 3 x 32 x 32
        r["data_config"].update(num_frames=100000)
        r["model_config"].update(num_frames=100000)

    line = refused(capsys, rewrite(export, tmp_path / "both.safetensors", also_model))
    assert "do not fit" in line or "GiB" in line  # the time embedding's shape, or the pixel bound
    big = rewrite(export, tmp_path / "views.safetensors", lambda r: r["data_config"].update(num_clips=10**6))
    assert "limit 1 GiB" in refused(capsys, big)


def test_weights_paths_and_downloads_in_the_record_are_never_acted_on(files, tmp_path, monkeypatch, caplog):
    merged, export = files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def sources(r):
        r["model_config"]["backbone"].update(weights="/etc/passwd", pretrained=True)
        r["model_config"]["backbone"]["timm_kwargs"].update(checkpoint_path="/etc/passwd")

    bad = rewrite(export, tmp_path / "sources.safetensors", sources)
    import timm

    calls = []
    real = timm.create_model
    monkeypatch.setattr(
        timm,
        "create_model",
        lambda *a, **k: calls.append(k.get("pretrained") or k.get("checkpoint_path")) or real(*a, **k),
    )
    predictor = load_export(bad, device="cpu")
    assert calls and not any(calls)  # no pretrained download asked for
    assert predictor.model_config["backbone"]["weights"] is None  # /etc/passwd never opened, not kept
    assert "checkpoint_path" not in predictor.model_config["backbone"]["timm_kwargs"]
    assert "ignored" in caplog.text and "/etc/passwd" in caplog.text
    expected = load_export(export, device="cpu")(video())
    np.testing.assert_allclose(predictor(video()), expected, atol=1e-7)
    # a merged model's config: the same
    import yaml

    cfg = yaml.safe_load(read(merged)[1]["config"])
    cfg["backbone"]["timm_kwargs"]["checkpoint_path"] = "/etc/passwd"
    hostile = rewrite(merged, tmp_path / "merged.safetensors", config=yaml.safe_dump(cfg))
    calls.clear()
    load_merged(hostile)
    assert calls and not any(calls)


def test_a_nan_tensor_is_refused_naming_the_tensor(files, tmp_path, capsys):
    merged, export = files

    def nan(state):
        state["model.head.fc.weight"] = torch.full_like(state["model.head.fc.weight"], float("nan"))

    line = refused(capsys, rewrite(export, tmp_path / "nan.safetensors", tensors=nan))
    assert "'model.head.fc.weight' holds" in line and "NaN" in line

    def nan_merged(state):
        state["zeroi2v_head.fc.bias"][0] = float("inf")

    with pytest.raises(CheckpointError, match="'zeroi2v_head.fc.bias' holds 1 NaN or infinite"):
        load_merged(rewrite(merged, tmp_path / "inf.safetensors", tensors=nan_merged))


def flip_a_byte(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 5] ^= 0x01  # a low mantissa bit of an early float32: finite, slightly different
    dst.write_bytes(bytes(data))
    return dst


def test_flipped_bytes_inside_a_tensor_are_found_by_the_content_hash(files, tmp_path, capsys):
    merged, export = files
    line = refused(capsys, flip_a_byte(export, tmp_path / "flipped.safetensors"))
    assert "do not match the content hash" in line
    with pytest.raises(CheckpointError, match="do not match the content hash"):
        load_merged(flip_a_byte(merged, tmp_path / "flipped_merged.safetensors"))


def test_a_truncated_file_is_one_line(files, tmp_path, capsys):
    _, export = files
    short = tmp_path / "short.safetensors"
    short.write_bytes(export.read_bytes()[: export.stat().st_size // 2])
    assert "truncated" in refused(capsys, short) or "not a readable safetensors" in refused(capsys, short)


def test_a_class_list_that_does_not_fit_the_classifier_is_one_line(files, tmp_path, capsys):
    merged, export = files
    longer = rewrite(export, tmp_path / "classes.safetensors", lambda r: r["class_names"].append("d"))
    assert "4 class names for a classifier of 3 classes" in refused(capsys, longer)
    merged4 = rewrite(merged, tmp_path / "merged4.safetensors", class_names=json.dumps(list("abcd")))
    assert "4 class names for a classifier of 3 classes" in refused(capsys, merged4)


def test_an_export_without_a_hash_still_loads_and_says_it_is_unverified(files, tmp_path, caplog):
    _, export = files
    state, meta = read(export)
    meta.pop(CONTENT_HASH_KEY)
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata=meta)
    predictor = load_export(old, device="cpu")
    assert caplog.text.count("unverified") == 1 and str(old) in caplog.text
    np.testing.assert_allclose(predictor(video()), load_export(export, device="cpu")(video()), atol=1e-7)


def heads_run(tmp_path: Path, classes: list[str]) -> Path:
    """A run directory with heads.safetensors (3 classes, 2 adapters) and a fingerprint.json."""
    from stage2_temporal.heads import HEAD_TYPES
    from stage2_temporal.training.run_dir import HeadsInfo, save_heads

    info = HeadsInfo(HEAD_TYPES["lstm"][0](hidden=8, layers=1), 3, ["a0", "a1"], 8, 8, class_names=classes)
    run = tmp_path / "run"
    run.mkdir()
    save_heads(info.build(), info, run / "heads.safetensors")
    (run / "fingerprint.json").write_text("{}")
    return run


def test_a_run_directory_is_validated_too(tmp_path, capsys):
    from stage2_temporal.training.run_dir import load_heads

    run = heads_run(tmp_path, ["a", "b", "c", "d"])
    with pytest.raises(CheckpointError, match="4 class names for heads of 3 classes"):
        load_heads(run)
    heads = run / "heads.safetensors"
    state, meta = read(heads)
    record = json.loads(meta["amflow_heads"])
    record.update(class_names=["a", "b", "c"], embed_dim=10**6)  # would allocate gigabytes of LSTM
    meta["amflow_heads"] = json.dumps(record)
    save_file(state, str(heads), metadata=meta)
    with pytest.raises(CheckpointError, match="do not fit the heads"):
        load_heads(run)
    (run / "fingerprint.json").write_text("{not json")
    capsys.readouterr()
    assert main(["predict", "x.mp4", "--run", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run / 'fingerprint.json'}: not a readable JSON file" in err[0]


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_convert_never_suggests_unpickling_a_malicious_file(tmp_path, capsys):
    evil = tmp_path / "release.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": _Payload()}, evil)  # as mmengine saves
    code = main(
        [
            "convert",
            str(evil),
            "--config",
            "configs/models/zeroi2v_tiny.yaml",
            "--out",
            str(tmp_path / "o.st"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(evil) in err[0]
    assert "weights_only=False" not in err[0] and "never unpickled" in err[0]
    assert "GLOBAL" in err[0] and "system" in err[0]  # what it found, so the user knows why
    assert not list(tmp_path.glob("o.st*"))


def test_a_store_whose_json_claims_more_clips_than_it_holds_is_one_line(tmp_path, capsys):
    from stage2_temporal.training.synthetic import synthetic_cache, write_store

    store = write_store(synthetic_cache(8, seed=0, flow_blocks=0), tmp_path / "s.zarr", {"model": "x"})
    meta = store / "zarr.json"
    data = json.loads(meta.read_text())
    data["attributes"]["amflow_store"]["layout"]["num_clips"] = 10**12  # would allocate 931 GiB of status
    meta.write_text(json.dumps(data))
    assert main(["store", "info", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"amflow store info: error: {meta}: its layout says 1000000000000 clips but the status array "
        "holds 8: a damaged or edited store"
    ]
