"""One base for what a user can fix: every command reports a `UserError` as one line with its exit code."""

from __future__ import annotations

import pytest

from dataset_tools.beton import BetonError
from dataset_tools.errors import ConversionError, SourceError, UsageError, UserError
from deit3_fast.checkpoint import CheckpointError
from deit3_fast.config import ConfigError
from deit3_fast.device import DeviceError
from deit3_fast.trainer import ConfigMismatch, OutOfMemory, TrainingDiverged
from pipelines import DataError
from pipelines.randaugment import RandAugmentError


@pytest.mark.parametrize(
    "cls",
    [
        BetonError,
        ConversionError,
        SourceError,
        UsageError,
        CheckpointError,
        ConfigError,
        DeviceError,
        ConfigMismatch,
        OutOfMemory,
        TrainingDiverged,
        DataError,
        RandAugmentError,
    ],
)
def test_every_user_fixable_error_derives_the_one_base(cls):
    assert issubclass(cls, UserError)


def test_the_hint_follows_the_message_and_the_exit_code_is_the_classes():
    assert str(UserError("no data at x.beton", "convert it with deit3-convert")) == (
        "no data at x.beton: convert it with deit3-convert"
    )
    assert UserError("x").exit_code == 2 and TrainingDiverged("loss is nan").exit_code == 3


def test_the_cli_reports_any_user_error_as_one_line(monkeypatch, capsys):
    from deit3_fast import cli
    from deit3_fast.commands import doctor

    def fail(args):
        raise DataError("train.beton: cannot open", "run deit3-convert first")

    monkeypatch.setattr(doctor, "run", fail)
    assert cli.main(["doctor"]) == 2
    assert capsys.readouterr().err == "deit3-fast: error: train.beton: cannot open: run deit3-convert first\n"
