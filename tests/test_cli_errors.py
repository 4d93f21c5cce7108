"""The command line's answer to mistakes: one or two lines, an exit code by kind, no traceback."""

import pytest

from wsss import cli
from wsss import config as C
from wsss.stages.make_maps import MapsConfig
from wsss.stages.train_classifier import ClassifierConfig


def _run(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_a_missing_dataset_is_one_line_and_exit_code_3(capsys, tmp_path):
    code, err = _run(capsys, "train-classifier", "--data-root", str(tmp_path / "nope"), "--run-dir", str(tmp_path))
    assert code == cli.EXIT_CODES["data"] == 3
    assert "Traceback" not in err and err.count("\n") == 2 and str(tmp_path / "nope") in err
    assert "--debug" in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from wsss.data.voc import DatasetError

    with pytest.raises(DatasetError):
        cli.main(["--debug", "train-classifier", "--data-root", str(tmp_path / "nope"), "--run-dir", str(tmp_path)])
    monkeypatch.setenv("WSSS_DEBUG", "1")
    with pytest.raises(DatasetError):
        cli.main(["train-classifier", "--data-root", str(tmp_path / "nope"), "--run-dir", str(tmp_path)])


def test_a_bad_key_inside_a_section_and_malformed_yaml_exit_2(capsys, tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text(f"run_dir: {tmp_path / 'run'}\ndata_root: {tmp_path / 'nope'}\nclassifier: {{lrr: 1}}\n")
    code, err = _run(capsys, "pipeline", "--config", str(good))
    assert code == 2 and "unknown key(s) ['lrr']" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("classifier: {lr: [\n")
    with pytest.raises(SystemExit) as exc:          # argparse's usage error, exit code 2
        cli.main(["pipeline", "--config", str(bad)])
    assert exc.value.code == 2
    assert f"{bad} line 2, column 1: not valid YAML" in capsys.readouterr().err


def test_a_missing_classifier_is_a_run_directory_error(capsys, tmp_path):
    code, err = _run(capsys, "make-maps", "--data-root", str(tmp_path), "--run-dir", str(tmp_path))
    assert code == 4 and "train the classifier first" in err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "-2"], "ClassifierConfig.batch_size (--batch-size) = -2: must be >= 1"),
    (["--batch-size", "0"], "must be >= 1"),
    (["--epochs", "0"], "ClassifierConfig.epochs (--epochs) = 0: must be >= 1"),
    (["--epochs", "-3"], "must be >= 1"),
    (["--lr", "-0.1"], "ClassifierConfig.lr (--lr) = -0.1: must be > 0"),
    (["--image-size", "0"], "must be >= 16"),
    (["--p-common", "1.5"], "must lie in [0, 1]"),
])
def test_nonsense_numbers_are_refused_before_any_work(capsys, tmp_path, flags, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train-classifier", "--data-root", str(tmp_path), "--run-dir", str(tmp_path / "run"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_ranges_hold_for_yaml_and_papermill_style_dicts_too():
    with pytest.raises(C.ConfigError, match=r"MapsConfig.scales .* = \(1.0, 0.0\): must be > 0; 0.0 is not"):
        C.from_dict(MapsConfig, {"data_root": "d", "run_dir": "r", "scales": [1.0, 0]})
    with pytest.raises(C.ConfigError, match="MapsConfig.k"):
        C.from_dict(MapsConfig, {"data_root": "d", "run_dir": "r", "k": 0})
    with pytest.raises(C.ConfigError, match="LossConfig.w_con"):
        C.from_dict(ClassifierConfig, {"data_root": "d", "run_dir": "r", "loss.w_con": -1})
    assert C.from_dict(ClassifierConfig, {"data_root": "d", "run_dir": "r", "momentum": 0.0}).momentum == 0.0
    assert C._in_range(1.0, "[0, 1]") and not C._in_range(1.0, "[0, 1)") and C._in_range(0.5, "(0, 0.5]")


def test_a_full_disk_during_a_checkpoint_is_one_line_and_exit_code_5(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import torch

    from wsss import checkpoints

    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 0))
    (tmp_path / "checkpoint_last.pt").write_bytes(b"the last good one")
    with pytest.raises(OSError) as err:
        checkpoints.atomic_torch_save({"x": 1}, tmp_path / "checkpoint_last.pt")
    kind, message = cli.classify_error(err.value)
    assert kind == "disk" and cli.EXIT_CODES[kind] == 5
    assert message.startswith(f"disk full while writing {tmp_path / 'checkpoint_last.pt'}")
    assert (tmp_path / "checkpoint_last.pt").read_bytes() == b"the last good one"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]  # no temporary file left
