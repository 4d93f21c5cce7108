"""wsss.explorer: the co-attention of a pair (METHOD.md sec. 1) and its ipywidgets explorer.

The attention maps are checked against P = F_m^T W_P F_n written out here; the explorer is
driven without a browser, by setting widget values (which fires the observers, as a user
would) and by calling the click handler with a stand-in for matplotlib's mouse event.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from wsss import explorer
from wsss.data.transforms import denormalize
from wsss.models.classifier import CoAttentionClassifier

K = 3
SIZE = 32  # tiny backbone, stride 8: a 4 x 4 feature grid


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = CoAttentionClassifier(K, backbone="tiny").eval()
    with torch.no_grad():  # larger W_P: sharper, position-dependent attention
        net.coatt.weight.mul_(20)
    return net


class PairSet:
    """What the explorer needs of a VOCDataset with eval_transforms: names, labels, items."""

    def __init__(self, labels, size=SIZE):
        self.labels = np.asarray(labels, dtype=np.uint8)
        self.names = [f"im{i}" for i in range(len(labels))]
        g = torch.Generator().manual_seed(1)
        self.images = [torch.randn(3, size + 8 * (i % 2), size, generator=g) for i in range(len(labels))]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"name": self.names[i], "index": i, "image": self.images[i],
                "label": torch.from_numpy(self.labels[i].astype(np.float32))}


@pytest.fixture(scope="module")
def dataset():
    return PairSet([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]])


def test_load_pair_labels_and_common_classes(dataset):
    pair = explorer.load_pair(dataset, 0, 1)
    assert pair["classes_m"] == [1, 2] and pair["classes_n"] == [2] and pair["common"] == [2]
    assert pair["x_m"].shape == (1, 3, SIZE, SIZE) and pair["x_n"].shape == (1, 3, SIZE + 8, SIZE)
    assert pair["image_m"].shape == (SIZE, SIZE, 3) and pair["image_m"].dtype == np.uint8
    np.testing.assert_array_equal(pair["image_n"], denormalize(dataset.images[1]))


def test_attention_for_position_is_the_row_of_softmax_p_and_back(model, dataset):
    pair = explorer.load_pair(dataset, 0, 1)
    att = explorer.attention_for_position(model, pair["x_m"], pair["x_n"], (1, 2))
    assert att["grid_m"] == (4, 4) and att["grid_n"] == (5, 4) and att["index"] == 1 * 4 + 2
    with torch.no_grad():
        f_m, f_n = model.features([pair["x_m"], pair["x_n"]])
        fm, fn = f_m[0].flatten(1), f_n[0].flatten(1)  # (C, HW)
        p = fm.T @ model.coatt.weight @ fn  # P = F_m^T W_P F_n (HWm, HWn)
    expected = torch.softmax(p[att["index"]], 0).reshape(5, 4).numpy()
    np.testing.assert_allclose(att["m_to_n"], expected, rtol=1e-4, atol=1e-6)
    j = int(np.argmax(expected))
    assert att["match"] == (j // 4, j % 4)
    np.testing.assert_allclose(att["back"], torch.softmax(p[:, j], 0).reshape(4, 4).numpy(), rtol=1e-4, atol=1e-6)
    assert att["m_to_n"].sum() == pytest.approx(1, abs=1e-5) and att["back"].sum() == pytest.approx(1, abs=1e-5)
    other = explorer.attention_for_position(model, pair["x_m"], pair["x_n"], (3, 0))
    assert not np.allclose(other["m_to_n"], att["m_to_n"])  # the map depends on the position
    with pytest.raises(ValueError, match="outside"):
        explorer.attention_for_position(model, pair["x_m"], pair["x_n"], (4, 0))


def test_pair_maps_match_the_model_heads(model, dataset):
    pair = explorer.load_pair(dataset, 0, 1)
    maps = explorer.pair_maps(model, pair["x_m"], pair["x_n"], 2)
    with torch.no_grad():
        cam = model.cam(pair["x_m"])[0, 1].clamp_min(0)
        co = model.coatt_cam(pair["x_m"], pair["x_n"])[0, 1].clamp_min(0)
    for key, ref in (("cam", cam), ("coatt", co)):
        ref = (ref / ref.max() if ref.max() > 0 else ref).numpy()
        np.testing.assert_allclose(maps[key], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps["gate"] + maps["not_gate"], 1.0, atol=1e-6)
    assert 0 <= maps["gate"].min() and maps["gate"].max() <= 1 and maps["gate"].shape == (4, 4)
    assert all(0 < maps[k] < 1 for k in ("p_cam", "p_coatt", "p_con"))
    with pytest.raises(ValueError, match="outside 1..3"):
        explorer.pair_maps(model, pair["x_m"], pair["x_n"], 0)


def test_position_from_xy_inverts_the_cell_centres():
    shape, grid = (40, 32, 3), (5, 4)
    for row in range(5):
        for col in range(4):
            x, y = explorer._cell_centre((row, col), grid, shape)
            assert explorer.position_from_xy(x, y, grid, shape) == (row, col)
    assert explorer.position_from_xy(-3, 99, grid, shape) == (4, 0)  # clipped to the grid


def test_pair_figure_has_the_eight_panels(model, dataset):
    pair = explorer.load_pair(dataset, 2, 3)
    att = explorer.attention_for_position(model, pair["x_m"], pair["x_n"], (0, 0))
    fig = explorer.pair_figure(pair, att, explorer.pair_maps(model, pair["x_m"], pair["x_n"], 3), "c3")
    assert isinstance(fig, Figure) and len(fig.axes) == 8
    titles = " ".join(ax.get_title() for ax in fig.axes)
    for word in ("A_mn", "A_nm", "plain CAM c3", "co-attention CAM c3", "gate B_m", "1 - B_m", "contrastive"):
        assert word in titles
    assert fig.axes_m is fig.axes[0]


# ----------------------------------------------------------------------- the widget callbacks

@pytest.fixture
def built(model, dataset):
    return explorer.build_explorer(model, dataset, [(0, 1), (2, 3), (3, 2)], ["a", "b", "c"])


def test_explorer_starts_on_the_first_pair_at_the_centre(built):
    box, cb = built
    assert cb.state["pair"]["name_m"] == "im0" and cb.state["att"]["pos"] == (2, 2)
    assert (cb.row.max, cb.col.max) == (3, 3)
    assert cb.cls.options == (("b (common)", 2), ("a", 1)) and cb.cls.value == 2  # shared class first
    assert cb.state["maps"]["cls"] == 2 and isinstance(cb.state["figure"], Figure)
    assert box.children[-1] is cb.out


def test_explorer_opens_at_the_notebooks_pair_position_and_class(model, dataset):
    _, cb = explorer.build_explorer(model, dataset, [(0, 1), (2, 3), (3, 2)], ["a", "b", "c"],
                                    pair=1, position=(1, 3), cls=1)
    assert cb.state["pair"]["name_m"] == "im2" and cb.state["att"]["pos"] == (1, 3)
    assert cb.cls.value == 1 and cb.state["maps"]["cls"] == 1
    cb.pair.value = 0                                        # a new pair: centre and shared class again
    assert cb.state["att"]["pos"] == (2, 2) and cb.cls.value == 2
    with pytest.raises(ValueError, match="pair=3"):
        explorer.build_explorer(model, dataset, [(0, 1)], pair=3)


def test_moving_a_slider_recomputes_the_attention_and_redraws(built, model):
    _, cb = built
    before_fig, before_maps = cb.state["figure"], cb.state["maps"]
    cb.row.value = 0
    assert cb.state["att"]["pos"] == (0, 2)
    pair = cb.state["pair"]
    expected = explorer.attention_for_position(model, pair["x_m"], pair["x_n"], (0, 2))
    np.testing.assert_allclose(cb.state["att"]["m_to_n"], expected["m_to_n"])
    assert cb.state["figure"] is not before_fig and cb.state["maps"] is before_maps  # maps not recomputed
    cb.col.value = 3
    assert cb.state["att"]["pos"] == (0, 3) and "(0, 3)" in cb.state["figure"].axes[0].get_title()


def test_choosing_a_class_recomputes_the_maps(built):
    _, cb = built
    att = cb.state["att"]
    cb.cls.value = 1
    assert cb.state["maps"]["cls"] == 1 and cb.state["att"] is att
    assert "plain CAM a" in " ".join(ax.get_title() for ax in cb.state["figure"].axes)


def test_choosing_a_pair_resets_position_and_classes(built):
    _, cb = built
    cb.row.value, cb.col.value = 0, 0
    cb.pair.value = 2  # (3, 2): I_m is 40 px high -> a 5 x 4 grid; they share class 3
    assert cb.state["pair"]["name_m"] == "im3" and cb.state["pair"]["name_n"] == "im2"
    assert (cb.row.max, cb.col.max) == (4, 3) and cb.state["att"]["pos"] == (2, 2)
    assert cb.cls.options == (("c (common)", 3),) and cb.state["maps"]["cls"] == 3
    assert cb.state["att"]["grid_m"] == (5, 4)
    cb.pair.value = 1  # (2, 3): back to 4 x 4, classes a and c, c shared
    assert (cb.row.max, cb.col.max) == (3, 3) and cb.cls.options == (("c (common)", 3), ("a", 1))


def test_a_click_on_i_m_moves_the_position_and_elsewhere_does_nothing(built):
    _, cb = built
    fig = cb.state["figure"]
    cb.on_click(SimpleNamespace(inaxes=fig.axes_m, xdata=1.0, ydata=30.0))  # 32 px image, 8 px cells
    assert (cb.row.value, cb.col.value) == (3, 0) and cb.state["att"]["pos"] == (3, 0)
    fig = cb.state["figure"]
    cb.on_click(SimpleNamespace(inaxes=fig.axes[1], xdata=1.0, ydata=1.0))  # on I_n: ignored
    cb.on_click(SimpleNamespace(inaxes=None, xdata=None, ydata=None))  # outside any axes
    assert cb.state["att"]["pos"] == (3, 0) and cb.state["figure"] is fig


def test_explorer_needs_pairs(model, dataset):
    with pytest.raises(ValueError, match="at least one"):
        explorer.build_explorer(model, dataset, [])
