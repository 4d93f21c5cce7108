"""wsss.report: the notebooks' helpers, on hand-written run directories (no training).

The ablation table is checked against hand-computed means and standard deviations, the
LOSSES / INFERENCE strings against the stage configs they must produce, the reuse of
trained models against fake checkpoints, the pseudo-mask steps against a hand-made VOC tree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from wsss import config as C
from wsss import report, viz
from wsss.classes import write_class_names
from wsss.data.voc import save_mask
from wsss.maps import save_maps
from wsss.stages import pipeline


@pytest.fixture(autouse=True)
def _runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WSSS_DATA", str(tmp_path / "data"))


# ----------------------------------------------------------------------- ablation grid

SWEEP = lambda peak: [{"threshold": t, "miou": peak - abs(t - 0.3)} for t in (0.1, 0.2, 0.3, 0.4)]  # noqa: E731

# (losses, inference) -> maps mIoU per seed 0, 1, 2; pseudo mIoU is maps + 0.1
VALUES = {
    ("basic", "single"): [0.30, 0.32, 0.34],  # mean 0.32, sample std 0.02
    ("basic", "cross"): [0.40, 0.40, 0.46],  # mean 0.42, sample std sqrt(0.0012)
    ("all", "cross"): [0.50, 0.60, 0.70],  # mean 0.60, sample std 0.10
}


def write_ablation_runs(root: Path) -> None:
    for (losses, inference), values in VALUES.items():
        for seed, value in enumerate(values):
            run = root / report.ablation_run_id(losses, inference, seed)
            run.mkdir(parents=True)
            metrics = {"maps": {"miou": value, "best_threshold": 0.3, "sweep": SWEEP(value)},
                       "pseudo": {"miou": value + 0.1, "miou_confident": value + 0.2, "coverage": 0.9}}
            (run / "metrics.json").write_text(json.dumps(metrics))
            report.write_ablation_record(run, losses=losses, inference=inference, seed=seed, data_size="demo")
    unfinished = root / "all__single__seed0"  # ablation.json without metrics.json: left out
    unfinished.mkdir()
    report.write_ablation_record(unfinished, losses="all", inference="single", seed=0, data_size="demo")
    (root / "classifiers" / "classifier-abc").mkdir(parents=True)  # no ablation.json: not a run


def test_collect_ablation_and_table_give_the_hand_computed_mean_and_std(tmp_path):
    write_ablation_runs(tmp_path)
    df = report.collect_ablation(tmp_path)
    assert len(df) == 9
    # the LOSSES order of the notebook, not the alphabet ("all" < "basic")
    assert [str(x) for x in df["losses"].unique()] == ["basic", "all"]
    assert list(df.loc[df["run"] == "basic__single__seed1", "maps_miou"]) == [0.32]
    table = report.ablation_table(df)
    assert [(str(r.losses), str(r.inference)) for r in table.itertuples()] == [
        ("basic", "single"), ("basic", "cross"), ("all", "cross")]
    for (losses, inference), values in VALUES.items():
        row = table[(table["losses"] == losses) & (table["inference"] == inference)].iloc[0]
        mean = sum(values) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # ddof = 1
        assert row["maps_miou_mean"] == pytest.approx(mean)
        assert row["maps_miou_std"] == pytest.approx(std)
        assert row["pseudo_miou_mean"] == pytest.approx(mean + 0.1)
        assert row["runs"] == 3
    md = report.table_markdown(table)
    assert "| basic | single | 32.0 ± 2.0 | 42.0 ± 2.0 | 3 |" in md
    assert "| all | cross | 60.0 ± 10.0 | 70.0 ± 10.0 | 3 |" in md


def test_table_with_one_seed_has_no_std_and_markdown_says_so(tmp_path):
    write_ablation_runs(tmp_path)
    df = report.collect_ablation(tmp_path)
    one = report.ablation_table(df[df["seed"] == 0])
    assert one["maps_miou_std"].isna().all() and (one["runs"] == 1).all()
    assert "| basic | single | 30.0 | 40.0 | 1 |" in report.table_markdown(one)


def test_collect_ablation_without_runs_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="ablation_demo.yaml"):
        report.collect_ablation(tmp_path)


def test_sweeps_by_inference_average_over_seeds(tmp_path):
    write_ablation_runs(tmp_path)
    df = report.collect_ablation(tmp_path)
    curves = report.sweeps_by(df, tmp_path, by="inference", losses="basic")
    assert list(curves) == ["single", "cross"]
    at = {p["threshold"]: p["miou"] for p in curves["cross"]["sweep"]}
    assert at[0.3] == pytest.approx(0.42) and at[0.1] == pytest.approx(0.22)
    assert report.pick_run(df) == "all__cross__seed0"  # most terms, cross
    assert report.pick_run(df, "basic", "single") == "basic__single__seed0"
    with pytest.raises(ValueError, match="present"):
        report.pick_run(df, "basic+coatt")


def test_mean_sweep_keeps_shared_thresholds_and_skips_missing_values():
    a = [{"threshold": 0.1, "miou": 0.2}, {"threshold": 0.2, "miou": 0.4}, {"threshold": 0.3, "miou": None}]
    b = [{"threshold": 0.1, "miou": 0.4}, {"threshold": 0.2, "miou": 0.6}, {"threshold": 0.3, "miou": 0.5}]
    assert report.mean_sweep([a, b[:2]]) == [{"threshold": 0.1, "miou": pytest.approx(0.3)},
                                            {"threshold": 0.2, "miou": pytest.approx(0.5)}]
    assert report.mean_sweep([a, b])[2] == {"threshold": 0.3, "miou": 0.5}


def test_ablation_figure_draws_one_bar_per_setting(tmp_path):
    write_ablation_runs(tmp_path)
    fig = viz.ablation_figure(report.collect_ablation(tmp_path), "maps_miou")
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches if p.get_height() > 0)
    assert heights == [32.0, 42.0, 60.0]


def test_ablation_figure_dots_are_the_same_for_the_same_rows(tmp_path):
    write_ablation_runs(tmp_path)
    df = report.collect_ablation(tmp_path)

    def dots():
        fig = viz.ablation_figure(df, "maps_miou")
        return np.concatenate([c.get_offsets() for c in fig.axes[0].collections if len(c.get_offsets())])

    np.random.seed(1)
    before = np.random.get_state()[1].copy()
    first = dots()
    assert (np.random.get_state()[1] == before).all()  # the caller's RNG stream is untouched
    np.testing.assert_array_equal(first, dots())  # seaborn's jitter is seeded: a redraw is the same figure


# ----------------------------------------------------------------------- ablation configs

@pytest.mark.parametrize("losses", list(report.LOSSES))
@pytest.mark.parametrize("inference", list(report.INFERENCE))
def test_ablation_strings_map_to_stage_configs(losses, inference, tmp_path):
    cfg = report.ablation_pipeline_config(losses, inference, "smoke", seed=2, epochs=3, limit=10)
    assert Path(cfg.run_dir) == tmp_path / "runs" / "ablation" / f"{losses}__{inference}__seed2"
    assert cfg.stages == ("classifier", "maps", "pseudo", "evaluate") and cfg.seed == 2
    stages = pipeline.stage_configs(cfg, tmp_path / "data", Path(cfg.run_dir))  # valid stage configs
    loss = stages["classifier"].loss
    expected = report.LOSSES[losses]
    assert (loss.basic, loss.coatt, loss.contrastive, loss.self_pairs) == (
        expected["basic"], expected["coatt"], expected["contrastive"], expected["self_pairs"])
    assert stages["classifier"].epochs == 3 and stages["classifier"].seed == 2
    assert stages["classifier"].image_size == 64  # the rest from configs/smoke.yaml
    assert tuple(stages["maps"].combine) == {"single": ("cam",), "cross": ("cam", "coatt", "self")}[inference]
    assert stages["maps"].k == 2 and stages["maps"].limit == 10 and stages["pseudo"].limit == 10
    assert tuple(stages["evaluate"].parts) == ("maps", "pseudo") and stages["evaluate"].allow_missing


def test_ablation_losses_grow_one_term_at_a_time():
    on = [sum(v.values()) for v in report.LOSSES.values()]
    assert on == [1, 2, 3, 4]
    assert report.LOSSES["all"] == dict(basic=True, coatt=True, contrastive=True, self_pairs=True)


def test_ablation_config_defaults_and_bad_strings(tmp_path):
    cfg = report.ablation_pipeline_config("basic", "single", "smoke", run_dir="mine")
    assert Path(cfg.run_dir) == tmp_path / "runs" / "mine"
    assert "limit" not in cfg.maps and cfg.evaluate["allow_missing"] is False
    assert cfg.classifier["epochs"] == report.load_pipeline("smoke").classifier["epochs"]  # configs/smoke.yaml's
    with pytest.raises(ValueError, match="basic\\+coatt\\+con"):
        report.ablation_pipeline_config("coatt")
    with pytest.raises(ValueError, match="single"):
        report.ablation_pipeline_config("all", "multi")


def test_classifier_key_is_shared_across_inference_only():
    key = lambda *a, **kw: report.classifier_key(report.ablation_pipeline_config(*a, **kw))  # noqa: E731
    assert key("all", "single", "smoke") == key("all", "cross", "smoke", run_dir="elsewhere")
    assert key("all", "single", "smoke") != key("basic", "single", "smoke")
    assert key("all", "single", "smoke") != key("all", "single", "smoke", seed=1)
    assert key("all", "single", "smoke") != key("all", "single", "demo")


# ----------------------------------------------------------------------- pipeline configs

def test_load_pipeline_overrides_and_run_dir(tmp_path):
    cfg = report.load_pipeline("smoke")
    assert Path(cfg.run_dir) == tmp_path / "runs" / "smoke"  # the config's run_dir under the runs folder
    cfg = report.load_pipeline("smoke", run_dir=tmp_path / "x", seed=3, epochs=None, stages=["classifier"],
                               overrides={"classifier": {"loss": {"coatt": False}}, "segmenter": {"epochs": None}})
    assert cfg.run_dir == str(tmp_path / "x") and cfg.seed == 3 and cfg.stages == ("classifier",)
    smoke = yaml.safe_load((report.CONFIG_DIR / "smoke.yaml").read_text())
    assert cfg.classifier == {**smoke["classifier"], "loss": {"coatt": False}}
    assert cfg.segmenter["epochs"] == smoke["segmenter"]["epochs"]  # None leaves the config's value
    with pytest.raises(ValueError, match="unknown stage"):
        report.load_pipeline("smoke", overrides={"classifer": {"epochs": 1}})
    with pytest.raises(FileNotFoundError, match="demo"):
        report.load_pipeline("huge")


def test_config_path_is_relative_to_the_repository_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report.pipeline_config_path(config="configs/voc_vgg16.yaml") == report.CONFIG_DIR / "voc_vgg16.yaml"
    assert report.load_pipeline(config="configs/voc_vgg16.yaml").classifier["backbone"] == "vgg16"


def test_switches_run_dir_names_what_the_switches_change():
    default = report.effective_switches(report.load_pipeline("smoke"))
    assert set(default) == {"basic", "coatt", "contrastive", "self_pairs"}
    assert report.loss_switches() == {} and report.loss_switches(coatt=0) == {"coatt": False}
    assert report.switches_run_dir("smoke", report.loss_switches()) == "smoke"
    assert report.switches_run_dir("smoke", report.loss_switches(**default)) == "smoke"  # restating the config
    flipped = {"coatt": not default["coatt"], "self_pairs": not default["self_pairs"]}
    expected = "smoke" + "".join(f"-{'' if flipped[k] else 'no-'}{k}" for k in ("coatt", "self_pairs"))
    assert report.switches_run_dir("smoke", report.loss_switches(**flipped)) == expected


def test_merge_sections_merges_nested_and_skips_none():
    base = {"epochs": 6, "loss": {"coatt": True, "w_con": 1.0}}
    assert report.merge_sections(base, {"epochs": None, "loss": {"coatt": False}, "lr": 0.1}) == \
        {"epochs": 6, "loss": {"coatt": False, "w_con": 1.0}, "lr": 0.1}
    assert base["loss"]["coatt"] is True  # not modified


def test_config_differences_nested_and_lenient_on_new_fields():
    old = {"epochs": 1, "scale": [0.7, 1.3], "workers": 0, "run_dir": "a", "loss": {"coatt": True, "w_con": 1.0}}
    new = {"epochs": 1, "scale": (0.7, 1.3), "workers": 4, "run_dir": "b", "loss": {"coatt": False, "w_con": 1.0},
           "optimizer": "sgd"}
    assert report.config_differences(old, new) == ["loss.coatt: True -> False"]
    assert report.config_differences(old, {**old, "workers": 8}) == []


# ----------------------------------------------------------------------- reuse of trained models

def _fake_classifier(run_dir: Path, cfg) -> Path:
    stage = pipeline.stage_configs(cfg, Path("/data"), run_dir)["classifier"]
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": C.to_dict(stage), "model": {}}, run_dir / "classifier.pt")
    return run_dir / "classifier.pt"


def test_finished_training_keeps_a_matching_classifier_and_refuses_another(tmp_path):
    cfg = report.load_pipeline("smoke", run_dir=tmp_path / "run")
    run_dir = Path(cfg.run_dir)
    assert report.finished_training(pipeline.stage_configs(cfg, Path("/d"), run_dir), run_dir) == []
    _fake_classifier(run_dir, cfg)
    # another data folder and other workers are machinery: still the same classifier
    same = report.load_pipeline("smoke", run_dir=run_dir, overrides={"classifier": {"workers": 3}})
    assert report.finished_training(pipeline.stage_configs(same, Path("/elsewhere"), run_dir), run_dir) == ["classifier"]
    other = report.load_pipeline("smoke", run_dir=run_dir, overrides={"classifier": {"loss": {"coatt": False}}})
    with pytest.raises(ValueError, match="loss.coatt: True -> False.*RUN_DIR"):
        report.finished_training(pipeline.stage_configs(other, Path("/d"), run_dir), run_dir)


def test_run_pipeline_reports_a_trained_classifier(tmp_path, monkeypatch):
    cfg = report.load_pipeline("smoke", run_dir=tmp_path / "run", stages=["classifier", "maps"])
    _fake_classifier(Path(cfg.run_dir), cfg)
    calls = []
    monkeypatch.setattr(pipeline, "prepare_data", lambda c: Path("/data"))
    monkeypatch.setattr(pipeline, "run", lambda c: calls.append(c.stages) or {"seconds": {}})
    result = report.run_pipeline(cfg)
    assert calls == [("classifier", "maps")] and result["skipped"] == ["classifier"]
    assert result["run_dir"] == cfg.run_dir and result["data_root"] == "/data"


def test_run_ablation_trains_one_classifier_for_both_inference_modes(tmp_path, monkeypatch):
    trained = []

    def fake_run_pipeline(cfg):
        run_dir = Path(cfg.run_dir)
        if "classifier" in cfg.stages and not (run_dir / "classifier.pt").is_file():
            trained.append(run_dir)
            _fake_classifier(run_dir, cfg)
            (run_dir / "log.jsonl").write_text('{"epoch": 1}\n')
        return {"stages": cfg.stages}

    monkeypatch.setattr(report, "run_pipeline", fake_run_pipeline)
    share = tmp_path / "grid" / "classifiers"
    for inference in ("single", "cross"):
        cfg = report.ablation_pipeline_config("basic", inference, "smoke", run_dir=tmp_path / "grid" / inference)
        report.run_ablation(cfg, share_dir=share)
        copied = Path(cfg.run_dir) / "classifier.pt"
        assert copied.is_file() and (Path(cfg.run_dir) / "log.jsonl").is_file()
    assert trained == [share / report.classifier_key(cfg)]


# ----------------------------------------------------------------------- logs and small helpers

def test_loss_log_and_curves_leave_out_terms_switched_off(tmp_path):
    lines = [{"epoch": e, "step": 10 * e, "loss/basic": 1.0 / e, "loss/coatt": 0.0, "loss/total": 2.0 / e,
              "lr/0": 0.01, "val/map": 0.2 * e, "val/ap": [0.1, 0.2]} for e in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    df = report.loss_log(tmp_path)
    assert list(df["epoch"]) == [1, 2, 3] and "val/ap" not in df.columns
    fig = viz.loss_curves_figure(df)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["basic", "total"]
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["val/map"]
    with pytest.raises(FileNotFoundError, match="train first"):
        report.loss_log(tmp_path / "nothing")


def test_image_miou_counts_ignored_prediction_pixels_as_background():
    gt = np.array([[0, 0, 1, 1]] * 2, dtype=np.uint8)
    assert report.image_miou(gt, gt, 2) == 1.0
    pred = np.array([[0, 255, 1, 1]] * 2, dtype=np.uint8)  # 255 on a background pixel: still right
    assert report.image_miou(pred, gt, 2) == 1.0
    pred = np.array([[0, 0, 1, 255]] * 2, dtype=np.uint8)  # bg IoU 2/3, class 1 IoU 1/2
    assert report.image_miou(pred, gt, 2) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_example_pairs_carry_the_label_sets_of_the_losses():
    labels = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=np.uint8)
    pairs = report.example_pairs(labels, n=4, p_common=1.0, seed=0)
    assert [p["m"] for p in pairs] == [0, 1, 2, 3]
    for p in pairs:
        lm, ln = set(p["l_m"]), set(p["l_n"])
        assert p["m"] != p["n"] and lm & ln  # p_common = 1: a shared label
        assert set(p["common"]) == lm & ln and set(p["m_only"]) == lm - ln and set(p["n_only"]) == ln - lm


def test_save_with_caption_names_the_notebook_and_parameters(tmp_path):
    from matplotlib.figure import Figure

    path = viz.save_figure(Figure(), tmp_path / "f" / "a.png", "a caption", "notebooks/07_figures.ipynb",
                                    {"SEED": 1})
    assert path.is_file()
    text = (tmp_path / "f" / "a.png.txt").read_text()
    assert "a caption" in text and "notebooks/07_figures.ipynb" in text and "SEED=1" in text


def test_write_json_replaces_non_finite_numbers(tmp_path):
    path = report.write_json(tmp_path / "x.json", {"a": float("nan"), "b": [np.float32(0.5)], "c": (1, 2)})
    assert json.loads(path.read_text()) == {"a": None, "b": [0.5], "c": [1, 2]}


def test_resolve_path_never_uses_the_working_directory(tmp_path):
    assert report.resolve_path(None, "ablation_demo", tmp_path) == tmp_path / "ablation_demo"
    assert report.resolve_path("x/y", "z", tmp_path) == tmp_path / "x" / "y"
    assert report.resolve_path(tmp_path / "abs", "z", "/elsewhere") == tmp_path / "abs"


# ----------------------------------------------------------------------- pseudo-mask steps on a hand-made dataset

def make_dataset(root: Path) -> list[str]:
    """Two 32x32 images: a bright square of class 1 (and in the second one of class 2) on grey."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    write_class_names(root, ["a", "b"])
    names = []
    for i in range(2):
        image = np.full((32, 32, 3), 90, np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        image[4:16, 4:16] = (250, 30, 30)
        mask[4:16, 4:16] = 1
        if i:
            image[20:30, 18:30] = (30, 30, 250)
            mask[20:30, 18:30] = 2
        name = f"img{i}"
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=100)
        save_mask(root / "SegmentationClass" / f"{name}.png", mask)
        names.append(name)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    return names


def test_pseudo_mask_steps_and_per_image_iou(tmp_path):
    from wsss.pseudo import PseudoMaskParams

    data, run = tmp_path / "voc", tmp_path / "run"
    names = make_dataset(data)
    exact = np.zeros((1, 32, 32), np.float32)
    exact[0, 4:16, 4:16] = 1.0  # a map that covers exactly the object of image 0
    save_maps(run / "maps" / "img0.npz", exact, [1])
    half = np.zeros((2, 32, 32), np.float32)
    half[0, 4:10, 4:16] = 1.0  # image 1: class 1 half covered, class 2 not at all
    save_maps(run / "maps" / "img1.npz", half, [1, 2])
    steps = report.pseudo_mask_steps(run, data, "img0", PseudoMaskParams())
    assert steps["classes"] == [1] and steps["miou"] == 1.0 and steps["miou_crf"] == pytest.approx(1.0, abs=0.05)
    assert steps["background"].shape == (32, 32) and steps["background"][0, 0] == 1.0
    worse = report.pseudo_mask_steps(run, data, "img1", PseudoMaskParams(use_crf=False))
    assert worse["miou"] < 0.6
    for name, s in (("img0", steps), ("img1", worse)):
        save_mask(run / "pseudo" / f"{name}.png", s["mask"])
    table = report.per_image_iou(data, "train", run / "pseudo")
    assert list(table["name"]) == ["img1", "img0"]  # lowest first: the failure cases
    assert table["miou"].iloc[1] == 1.0
    fig = viz.pseudo_steps_figure([steps, worse], ["a", "b"])
    assert len(fig.axes) == 12
    assert report.run_mask_params(run).alpha == 4.0 and report.run_mask_params(run, alpha=8.0).alpha == 8.0
    with pytest.raises(FileNotFoundError, match="pseudo-mask stage"):
        report.per_image_iou(data, "train", run / "nothing")
    assert names == ["img0", "img1"]


def test_pseudo_mask_steps_follows_the_runs_crf_scale(tmp_path):
    """With no ``crf_scale`` given, the steps use the run's own (RUN/config_pseudo.yaml), as the
    pseudo-mask stage did: here ``crf_scale: false``, so the CRF widths stay unscaled."""
    from wsss.pseudo import crf_params_for, scores_to_mask
    from wsss.stages.pseudo_masks import PseudoConfig

    data, run = tmp_path / "voc", tmp_path / "run"
    make_dataset(data)
    half = np.zeros((2, 32, 32), np.float32)
    half[0, 4:10, 4:16] = 1.0
    half[1, 20:26, 18:30] = 0.6
    save_maps(run / "maps" / "img1.npz", half, [1, 2])
    C.save_yaml(PseudoConfig(data_root=str(data), run_dir=str(run), crf_scale=False), run / "config_pseudo.yaml")
    steps = report.pseudo_mask_steps(run, data, "img1")
    params = report.run_mask_params(run)
    unscaled = scores_to_mask(steps["image"], half, [1, 2], params)
    scaled = scores_to_mask(steps["image"], half, [1, 2], crf_params_for(params, (32, 32), True))
    assert not np.array_equal(unscaled, scaled)  # the setting matters for this image
    assert np.array_equal(steps["mask_crf"], unscaled)
    assert np.array_equal(report.pseudo_mask_steps(run, data, "img1", crf_scale=True)["mask_crf"], scaled)
