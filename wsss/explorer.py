"""Looking inside the co-attention of a pair (notebooks/03_attention.ipynb).

For a pair (I_m, I_n) and a position i of I_m's feature grid (METHOD.md sec. 1):

- where i looks in I_n: row i of A_mn = softmax_j P(i, :), the weights with which
  F_m^{m∩n}(i) gathers F_n;
- and back: from the position j* of I_n that i attends to most, row j* of A_nm =
  softmax_i P(:, j*) over I_m (a correspondence is mutual when it comes back to i);
- the maps of a class c: the plain CAM S_m[c] = phi_0(F_m)[c], the co-attention CAM
  S_m^{m∩n}[c], the gate B_m = sigmoid(W_B F_m^{m∩n}), its complement 1 - B_m, and the
  contrastive map phi(F_m ⊙ (1 - B_m))[c] (what I_m holds that I_n does not).

The attention comes from the explicit co-attention (``co_attention(impl="explicit",
return_attention=True)``) with the model's own W_P, whatever implementation it trained with.

:func:`pair_figure` draws all of it as one static matplotlib Figure (what papermill runs
record); :func:`build_explorer` wraps it in ipywidgets for JupyterLab: a pair menu,
row / column sliders for the position, a class menu. With the ipympl backend
(``%matplotlib widget``) a click on I_m also moves the position.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

from wsss.data.transforms import denormalize
from wsss.maps import normalise_maps
from wsss.models.coattention import co_attention


def load_pair(dataset, m: int, n: int, device: str | torch.device = "cpu") -> dict:
    """Items m and n of a dataset with normalised images (``eval_transforms``) as a pair:
    batched inputs ``x_m``, ``x_n`` (1, 3, H, W), RGB arrays ``image_m``, ``image_n``, label
    ids ``classes_m``, ``classes_n`` (1..K), ``common`` (l_m ∩ l_n) and names."""
    items = dataset[m], dataset[n]
    classes = [[int(c) + 1 for c in torch.nonzero(it["label"]).flatten()] for it in items]
    x = [torch.as_tensor(it["image"]).as_subclass(torch.Tensor)[None].to(device) for it in items]
    return {"m": m, "n": n, "name_m": items[0]["name"], "name_n": items[1]["name"], "x_m": x[0], "x_n": x[1],
            "image_m": denormalize(items[0]["image"]), "image_n": denormalize(items[1]["image"]),
            "classes_m": classes[0], "classes_n": classes[1],
            "common": [c for c in classes[0] if c in classes[1]]}


def feature_grid(model, x: torch.Tensor) -> tuple[int, int]:
    """(h, w) of the backbone's feature map for input ``x``."""
    with torch.no_grad():
        return tuple(model.features([x])[0].shape[-2:])


@torch.no_grad()
def attention_for_position(model, x_m: torch.Tensor, x_n: torch.Tensor, pos: tuple[int, int]) -> dict:
    """The co-attention of position ``pos`` = (row, col) of I_m's feature grid.

    Returns ``m_to_n`` (h_n, w_n): row i of A_mn (sums to 1 over I_n); ``match`` (row, col)
    of its maximum j*; ``back`` (h_m, w_m): row j* of A_nm (sums to 1 over I_m); ``pos``,
    ``index`` i = row * w_m + col, ``grid_m``, ``grid_n``.
    """
    f_m, f_n = model.features([x_m, x_n])
    hm, wm = f_m.shape[-2:]
    hn, wn = f_n.shape[-2:]
    row, col = int(pos[0]), int(pos[1])
    if not (0 <= row < hm and 0 <= col < wm):
        raise ValueError(f"position {(row, col)} is outside I_m's {hm}x{wm} feature grid")
    _, _, a_mn, a_nm = co_attention(f_m.float(), f_n.float(), model.coatt.weight.float(), impl="explicit",
                                    return_attention=True)
    i = row * wm + col
    m_to_n = a_mn[0, i].reshape(hn, wn)
    j = int(m_to_n.argmax())
    back = a_nm[0, j].reshape(hm, wm)
    return {"pos": (row, col), "index": i, "m_to_n": m_to_n.cpu().numpy(), "match": (j // wn, j % wn),
            "back": back.cpu().numpy(), "grid_m": (int(hm), int(wm)), "grid_n": (int(hn), int(wn))}


@torch.no_grad()
def pair_maps(model, x_m: torch.Tensor, x_n: torch.Tensor, cls: int) -> dict:
    """I_m's maps for class ``cls`` (label id 1..K) in the pair: ``cam``, ``coatt`` and
    ``contrastive`` (each rectified and max-normalised, (h, w)), the gate ``gate`` = B_m and
    ``not_gate`` = 1 - B_m, and the class probabilities ``p_cam``, ``p_coatt``, ``p_con``
    (sigmoid of the scores s_m, s_m^{m∩n}, s_m^{m\\n})."""
    k = model.num_classes
    if not 1 <= int(cls) <= k:
        raise ValueError(f"class id {cls} outside 1..{k}")
    c = int(cls) - 1
    out = model(x_m, x_n, self_pairs=False)
    norm = lambda t: normalise_maps(t[0, c].float()).cpu().numpy()  # noqa: E731
    gate = out["B_m"][0, 0].float().cpu().numpy()
    prob = lambda key: float(torch.sigmoid(out[key][0, c].float()))  # noqa: E731
    return {"cls": int(cls), "cam": norm(out["S_m"]), "coatt": norm(out["S_co_m"]), "contrastive": norm(out["S_con_m"]),
            "gate": gate, "not_gate": 1.0 - gate, "p_cam": prob("s_m"), "p_coatt": prob("s_co_m"),
            "p_con": prob("s_con_m")}


def _cell_centre(pos: tuple[int, int], grid: tuple[int, int], shape: tuple[int, ...]) -> tuple[float, float]:
    """Image (x, y) of the centre of feature cell ``pos`` of a ``grid`` over an image of ``shape``."""
    (row, col), (h, w) = pos, grid
    return (col + 0.5) * shape[1] / w, (row + 0.5) * shape[0] / h


def position_from_xy(x: float, y: float, grid: tuple[int, int], shape: tuple[int, ...]) -> tuple[int, int]:
    """The feature cell (row, col) under image point (x, y) (inverse of the cell centres)."""
    h, w = grid
    row = int(np.clip(np.floor(y * h / shape[0]), 0, h - 1))
    col = int(np.clip(np.floor(x * w / shape[1]), 0, w - 1))
    return row, col


def _show(ax, image, heat=None, title="", cmap="jet", vmax=None):
    ax.imshow(image)
    if heat is not None:
        h, w = image.shape[:2]
        ax.imshow(heat, cmap=cmap, alpha=0.55, extent=(0, w, h, 0), interpolation="nearest", vmin=0,
                  vmax=vmax if vmax is not None else max(float(np.max(heat)), 1e-12))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def pair_figure(pair: dict, att: dict, maps: dict, class_name: str | None = None, fig=None):
    """The pair's attention at one position and its class maps, as a 2 x 4 Figure.

    Top: I_m with the position (+), where it looks in I_n (A_mn, best match x), where that
    match looks back in I_m (A_nm), the contrastive map. Bottom, over I_m: plain CAM,
    co-attention CAM, gate B_m, 1 - B_m. ``fig``: draw into this (cleared) figure.
    """
    from matplotlib.figure import Figure

    fig = fig if fig is not None else Figure(figsize=(11, 6), layout="constrained")
    fig.clear()
    axes = fig.subplots(2, 4)
    im, in_ = pair["image_m"], pair["image_n"]
    cname = class_name or f"class {maps['cls']}"
    _show(axes[0, 0], im, title=f"I_m {pair['name_m']}: position {att['pos']}")
    _show(axes[0, 1], in_, att["m_to_n"], title=f"I_n {pair['name_n']}: A_mn[i, :] (i looks here)")
    _show(axes[0, 2], im, att["back"], title=f"I_m: A_nm[j*, :] (from match {att['match']})")
    _show(axes[0, 3], im, maps["contrastive"], title=f"contrastive map {cname} (p={maps['p_con']:.2f})")
    _show(axes[1, 0], im, maps["cam"], title=f"plain CAM {cname} (p={maps['p_cam']:.2f})")
    _show(axes[1, 1], im, maps["coatt"], title=f"co-attention CAM {cname} (p={maps['p_coatt']:.2f})")
    _show(axes[1, 2], im, maps["gate"], title="gate B_m (common)", cmap="viridis", vmax=1.0)
    _show(axes[1, 3], im, maps["not_gate"], title="1 - B_m (not shared)", cmap="viridis", vmax=1.0)
    x, y = _cell_centre(att["pos"], att["grid_m"], im.shape)
    for ax in (axes[0, 0], axes[0, 2]):
        ax.plot([x], [y], marker="+", color="white", markersize=14, markeredgewidth=2.5)
    x, y = _cell_centre(att["match"], att["grid_n"], in_.shape)
    axes[0, 1].plot([x], [y], marker="x", color="white", markersize=10, markeredgewidth=2.5)
    fig.suptitle(f"co-attention of {pair['name_m']} with {pair['name_n']}", fontsize=10)
    fig.axes_m = axes[0, 0]  # the axes a click on I_m lands in (build_explorer)
    return fig


def _pair_label(pair: tuple[int, int], dataset, class_names) -> str:
    m, n = pair
    labels = [[int(c) + 1 for c in np.flatnonzero(np.asarray(dataset.labels[i]))] for i in (m, n)]
    names = [", ".join(class_names[c - 1] for c in ids) if class_names else str(ids) for ids in labels]
    return f"{dataset.names[m]} ({names[0]})  +  {dataset.names[n]} ({names[1]})"


def build_explorer(model, dataset, pairs: Sequence[tuple[int, int]], class_names: Sequence[str] | None = None,
                   device: str | torch.device = "cpu", *, pair: int = 0, position: tuple[int, int] | None = None,
                   cls: int | None = None):
    """An ipywidgets explorer of ``pairs`` (index pairs (m, n) of ``dataset``, whose images
    are normalised by ``eval_transforms``): menus for the pair and the class, row / column
    sliders for the position on I_m, the figure of :func:`pair_figure` below them. It opens
    at pair index ``pair``, ``position`` (row, col) on I_m's feature grid (default: the
    centre) and label id ``cls`` (default: the first class the pair shares), e.g. the
    notebook's PAIR / ROW / COL / CLASS; changing the pair resets position and class.

    Returns ``(box, cb)``: the widget to display and a namespace with the widgets
    (``cb.pair``, ``cb.row``, ``cb.col``, ``cb.cls``, ``cb.out``), the observers
    (``cb.on_pair``, ``cb.on_position``, ``cb.on_class``, ``cb.on_click``) and ``cb.state``
    (the current ``pair``, ``att``, ``maps`` and ``figure``), so that tests can drive it
    without a browser.
    """
    import ipywidgets as W
    import matplotlib
    from IPython.display import display

    if not pairs:
        raise ValueError("build_explorer needs at least one (m, n) pair")
    model.eval()
    names = list(class_names) if class_names is not None else None
    cname = lambda c: names[c - 1] if names else f"class {c}"  # noqa: E731
    if not 0 <= pair < len(pairs):
        raise ValueError(f"pair={pair}: choose an index in 0..{len(pairs) - 1}")
    start = {"position": position, "cls": cls}
    pair_w = W.Dropdown(options=[(_pair_label(p, dataset, names), i) for i, p in enumerate(pairs)], value=pair,
                        description="pair", layout=W.Layout(width="60%"))
    row_w = W.IntSlider(description="row", min=0, max=1, continuous_update=False)
    col_w = W.IntSlider(description="col", min=0, max=1, continuous_update=False)
    cls_w = W.Dropdown(description="class", options=[("-", 1)])
    out = W.Output()
    backend = matplotlib.get_backend().lower()
    canvas_fig = None
    if "ipympl" in backend or "widget" in backend:  # interactive canvas: clicks arrive
        import matplotlib.pyplot as plt

        with plt.ioff():  # shown once, inside the box, not again at the end of the cell
            canvas_fig = plt.figure(figsize=(11, 6), layout="constrained")
    state: dict = {"busy": False}

    def redraw():
        fig = pair_figure(state["pair"], state["att"], state["maps"], cname(state["maps"]["cls"]), fig=canvas_fig)
        state["figure"] = fig
        if canvas_fig is not None:
            fig.canvas.draw_idle()
        else:
            out.clear_output(wait=True)
            with out:
                display(fig)

    def update_attention():
        state["att"] = attention_for_position(model, state["pair"]["x_m"], state["pair"]["x_n"],
                                              (row_w.value, col_w.value))

    def update_maps():
        state["maps"] = pair_maps(model, state["pair"]["x_m"], state["pair"]["x_n"], cls_w.value)

    def on_pair(change=None):
        m, n = pairs[pair_w.value]
        pair = load_pair(dataset, m, n, device)
        state["pair"] = pair
        h, w = feature_grid(model, pair["x_m"])
        state["busy"] = True  # set the widgets without one redraw per change
        try:
            row_w.max, col_w.max = h - 1, w - 1
            row, col = start.pop("position", None) or (h // 2, w // 2)
            row_w.value, col_w.value = min(max(int(row), 0), h - 1), min(max(int(col), 0), w - 1)
            order = pair["common"] + [c for c in pair["classes_m"] if c not in pair["common"]]
            cls_w.options = [(cname(c) + (" (common)" if c in pair["common"] else ""), c) for c in order]
            wanted = start.pop("cls", None)
            cls_w.value = wanted if wanted in order else order[0]
        finally:
            state["busy"] = False
        update_attention()
        update_maps()
        redraw()

    def on_position(change=None):
        if not state["busy"]:
            update_attention()
            redraw()

    def on_class(change=None):
        if not state["busy"]:
            update_maps()
            redraw()

    def on_click(event):
        """A matplotlib button press: on I_m's axes, move the sliders to the cell clicked."""
        fig = state.get("figure")
        if fig is None or event.inaxes is not getattr(fig, "axes_m", None) or event.xdata is None:
            return
        row, col = position_from_xy(event.xdata, event.ydata, state["att"]["grid_m"], state["pair"]["image_m"].shape)
        state["busy"] = True
        try:
            row_w.value, col_w.value = row, col
        finally:
            state["busy"] = False
        on_position()

    pair_w.observe(on_pair, names="value")
    row_w.observe(on_position, names="value")
    col_w.observe(on_position, names="value")
    cls_w.observe(on_class, names="value")
    on_pair()
    view = canvas_fig.canvas if canvas_fig is not None else out
    if canvas_fig is not None:
        canvas_fig.canvas.mpl_connect("button_press_event", on_click)
    box = W.VBox([W.HBox([pair_w, cls_w]), W.HBox([row_w, col_w]), view])
    cb = SimpleNamespace(pair=pair_w, row=row_w, col=col_w, cls=cls_w, out=out, state=state, on_pair=on_pair,
                         on_position=on_position, on_class=on_class, on_click=on_click, redraw=redraw)
    return box, cb
