"""One error path for every command: a user error is one line ``amflow CMD: error: ...`` and exit 2."""

import errno
import os

import pytest

from amflow import cli
from amflow.commands import model_info
from foundation.config import ConfigError
from store import StoreError

TINY = "configs/models/amflow_tiny.yaml"


def run(capsys, *argv):
    capsys.readouterr()
    code = cli.main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def test_config_and_file_errors_are_one_line_and_exit_2(tmp_path, capsys):
    code, err = run(capsys, "model-info", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and len(err) == 1
    assert err[0].startswith("amflow model-info: error: config file not found: ") and "nope.yaml" in err[0]
    code, err = run(capsys, "visualize", str(tmp_path / "clip.mp4"), "--config", TINY, "--out", "x.png")
    assert (code, err) == (2, [f"amflow visualize: error: {tmp_path / 'clip.mp4'}: no such video file"])
    (tmp_path / "merged.safetensors").write_bytes(b"")
    code, err = run(
        capsys, "merge", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "merged.safetensors")
    )
    assert code == 2 and len(err) == 1 and err[0].startswith("amflow merge: error: ")
    # Sub-sub-commands are named whole.
    code, err = run(capsys, "store", "info", str(tmp_path))
    assert code == 2 and len(err) == 1 and err[0].startswith("amflow store info: error: ")
    code, verbose = run(capsys, "store", "info", str(tmp_path), "-v")  # -v after a sub-sub-command too
    assert code == 2 and verbose[0].startswith("Traceback") and verbose[-1] == err[0]
    code, err = run(capsys, "datasets", "list", "--dataset", "kinetics", "--root", ".", "--split", "train")
    assert code == 2 and len(err) == 1 and err[0].startswith("amflow datasets list: error: ")


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/s.zarr"),
            "out/s.zarr: No space left on device",
        ),
        (OSError(errno.EROFS, os.strerror(errno.EROFS)), "Read-only file system"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "runs/x"), "runs/x: Permission denied"),
        (
            FileExistsError("m.safetensors exists (pass --overwrite)"),
            "m.safetensors exists (pass --overwrite)",
        ),
        (
            ConfigError("a.yaml: not valid YAML: while parsing\n  in line 3"),
            "a.yaml: not valid YAML: while parsing; in line 3",
        ),  # fmt: skip
    ],
)
def test_os_errors_and_multi_line_messages_become_one_line(monkeypatch, capsys, error, expected):
    def fail(args):
        raise error

    monkeypatch.setattr(model_info, "run", fail)
    assert run(capsys, "model-info", "--config", TINY) == (2, [f"amflow model-info: error: {expected}"])


def test_interrupt_exits_130_and_verbose_shows_the_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_info, "run", interrupted)
    assert run(capsys, "model-info", "--config", TINY) == (130, ["amflow model-info: error: interrupted"])

    def fail(args):
        raise ValueError("--blocks: expected numbers")

    monkeypatch.setattr(model_info, "run", fail)
    for argv in (["-v", "model-info", "--config", TINY], ["model-info", "--config", TINY, "--verbose"]):
        code, err = run(capsys, *argv)
        assert code == 2 and err[0] == "Traceback (most recent call last):"
        assert err[-2:] == [
            "ValueError: --blocks: expected numbers",
            "amflow model-info: error: --blocks: expected numbers",
        ]


def test_a_bug_is_not_a_user_error(monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(model_info, "run", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["model-info", "--config", TINY])


def test_only_the_random_init_warning_is_muted(monkeypatch, capsys):
    """model-info builds a weightless model: that warning is muted by its message, no other UserWarning."""
    import warnings

    from stage2_temporal.finetuning import models

    real = models.parameter_report

    def report_and_warn(model):
        warnings.warn("another warning the user must see", UserWarning, stacklevel=1)
        return real(model)

    monkeypatch.setattr(models, "parameter_report", report_and_warn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["model-info", "--config", TINY, "--json"]) == 0
    messages = [str(w.message) for w in caught]
    assert "another warning the user must see" in messages
    assert not any("randomly initialised" in m for m in messages)


class FailingClips:
    """A dataset whose every item fails as a decoding worker's read of a bucket can."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [StoreError("s3://bucket/videos: reading a.mp4 failed: connection refused"), ValueError("clip 3: bad")],
)
def test_an_error_raised_in_a_decoding_worker_is_still_one_line(error):
    import torch.utils.data

    loader = torch.utils.data.DataLoader(FailingClips(error), num_workers=1)
    with pytest.raises(type(error)) as raised:
        next(iter(loader))
    assert "Original Traceback" in str(raised.value)  # torch re-raises it with the worker's traceback
    assert cli._one_line(raised.value) == str(error)
