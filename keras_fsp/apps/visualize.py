"""Pictures of a distillation: FSP matrices of teacher and student side by
side, and where each network looks (saliency and Grad-CAM++ maps).

Matplotlib (its Agg canvas, without pyplot) and, for the attribution maps, tf-keras-vis and
TensorFlow are imported when a function is called, not with the module.
`plot_fsp_matrices` works on any backend; the attribution maps need
`KERAS_BACKEND=tensorflow`.

Example:

```python
from keras_fsp.apps import visualize

paths = visualize.visualize_distillation(
    distiller, x_test[:256], y_test[:256], info["class_names"], "pictures",
    display_images=x_test_raw[:256])
```
"""

import os

import numpy as np

METHODS = ("saliency", "gradcam++")
_METHOD_TITLES = {"saliency": "saliency", "gradcam++": "Grad-CAM++"}


# What `visualize_distillation` draws into its folder.
ATTRIBUTIONS = "attributions.png"
FSP_MATRICES = "fsp_matrices.png"
PICTURES = (ATTRIBUTIONS, FSP_MATRICES)


def _figure(figsize):
    """A figure drawn by the Agg canvas, outside pyplot: no window, and the
    caller's pyplot backend and figures (e.g. in a notebook) stay untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------- FSP matrices


def _batch_mean(matrix):
    matrix = np.asarray(matrix, dtype="float64")
    if matrix.ndim == 3:
        matrix = matrix.mean(axis=0)
    if matrix.ndim != 2:
        raise ValueError(
            f"FSP matrices must be (m, n) or (batch, m, n); got shape {matrix.shape}."
        )
    return matrix


def _pair_label(name):
    if name is None:
        return None
    if isinstance(name, str):
        return name
    name = tuple(name)
    if len(name) == 2 and all(isinstance(n, str) for n in name):
        return f"{name[0]} \u2192 {name[1]}"
    return " / ".join(_pair_label(n) for n in name)


def plot_fsp_matrices(teacher_matrices, student_matrices, path, pair_names=None, title=None):
    """Draws teacher and student FSP matrices and their difference.

    One row per FSP pair: the teacher's matrix, the student's (the two share
    one colour scale, so equal colours mean equal values) and
    `|teacher - student|` with its own scale; the row's mean squared
    difference (the FSP loss of that pair, up to its weight) is in the title.

    Args:
        teacher_matrices: list of `(m, n)` or `(batch, m, n)` arrays (averaged
            over the batch), e.g. `FSPTerm.matrices_of(teacher, student, x)[0]`.
        student_matrices: the student's, in the same order.
        path: the PNG file to write (folders are created).
        pair_names: one label per pair: a string or a `(first, second)` layer
            pair; default "pair 1", "pair 2", ...
        title: the figure's title.

    Returns:
        `path`.
    """
    from matplotlib.ticker import MaxNLocator
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    teacher = [_batch_mean(g) for g in teacher_matrices]
    student = [_batch_mean(g) for g in student_matrices]
    if len(teacher) != len(student) or not teacher:
        raise ValueError(
            f"Need one student matrix per teacher matrix (and at least one); "
            f"got {len(teacher)} and {len(student)}."
        )
    if pair_names is None:
        pair_names = [f"pair {i + 1}" for i in range(len(teacher))]
    if len(pair_names) != len(teacher):
        raise ValueError(f"{len(pair_names)} pair_names for {len(teacher)} pairs.")

    rows = len(teacher)
    fig = _figure((14, 3.6 * rows + 0.6))
    axes = fig.subplots(rows, 3, squeeze=False)

    def show(ax, matrix, cmap, vmin, vmax, label):
        image = ax.imshow(
            matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
            interpolation="nearest",
        )
        bar = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.06)
        fig.colorbar(image, cax=bar).ax.tick_params(labelsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    for row, (g_t, g_s, name) in enumerate(zip(teacher, student, pair_names)):
        label = _pair_label(name)
        vmin = min(g_t.min(), g_s.min())
        vmax = max(g_t.max(), g_s.max())
        if vmax <= vmin:  # a constant row: centre it in a visible range
            half = max(abs(vmin) * 0.05, 1e-6)
            vmin, vmax = vmin - half, vmax + half
        m, n = g_t.shape
        show(axes[row, 0], g_t, "viridis", vmin, vmax, f"teacher  {label}\n({m}\u00d7{n})")
        m, n = g_s.shape
        show(axes[row, 1], g_s, "viridis", vmin, vmax, f"student  {label}\n({m}\u00d7{n})")
        ax = axes[row, 2]
        if g_t.shape == g_s.shape:
            diff = np.abs(g_t - g_s)
            mse = float(np.mean(np.square(g_t - g_s)))
            show(ax, diff, "magma", 0.0, max(diff.max(), 1e-12),
                 f"|teacher \u2212 student|\nmean squared difference {mse:.3g}")
        else:
            ax.axis("off")
            ax.text(0.5, 0.5, f"shapes differ:\n{g_t.shape} vs {g_s.shape}",
                    ha="center", va="center", transform=ax.transAxes)
        axes[row, 0].set_ylabel("channel i of the first map", fontsize=8)
        for col in range(3):
            if axes[row, col].axison:
                axes[row, col].set_xlabel("channel j of the second map", fontsize=8)
    fig.suptitle(
        title or "FSP matrices G = F1\u1d40F2 / (h\u00b7w), averaged over the images",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97 if rows > 1 else 0.93))
    return _save(fig, path)


# -------------------------------------------------------- attribution maps


def _last_feature_map_layer(model):
    for layer in reversed(model.layers):
        if type(layer).__name__ == "InputLayer":
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue  # a shared layer with several outputs
        if len(shape) == 4:
            return layer.name
    raise ValueError(
        f"Grad-CAM++ needs a layer with a 4-D feature-map output; {model.name!r} "
        "has none. Pass penultimate_layer=..."
    )


def attribution_maps(model, images, labels, method="saliency", penultimate_layer=None):
    """Where `model` looks to score each image's class (tf-keras-vis).

    Args:
        model: a single-output Keras model returning logits (or scores).
        images: `(N, H, W, C)` inputs as the model expects them (normalised).
        labels: `N` class indices whose logit is explained (e.g. the true
            labels, or the model's predictions).
        method: `"saliency"` (vanilla gradients: `|d logit / d image|`, the
            maximum over channels) or `"gradcam++"`.
        penultimate_layer: Grad-CAM++'s feature-map layer (a name); default
            the model's last layer with a 4-D output (`"stage3"` in
            `keras_fsp.papers.cifar_resnet`). Used as given: no search for a
            convolution before it.

    Returns:
        float32 `(N, H, W)`, each map scaled to [0, 1] (min-max per image,
        as tf-keras-vis does).
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "attribution_maps uses tf-keras-vis and needs KERAS_BACKEND="
            f"tensorflow; the backend is {keras.backend.backend()!r}."
        )
    import warnings

    import tensorflow as tf
    from tf_keras_vis.utils.scores import CategoricalScore

    images = np.asarray(images, dtype="float32")
    labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(
            f"attribution_maps needs images (N, H, W, C) and N labels; got "
            f"{images.shape} and {len(labels)} labels."
        )
    score = CategoricalScore(labels)
    with warnings.catch_warnings():
        # Keras warns that a list input does not match the named input.
        warnings.filterwarnings("ignore", message="The structure of `inputs`")
        if method == "saliency":
            from tf_keras_vis.saliency import Saliency

            maps = Saliency(model, clone=False)(score, tf.constant(images))
        elif method == "gradcam++":
            from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus

            if penultimate_layer is None:
                penultimate_layer = _last_feature_map_layer(model)
            maps = GradcamPlusPlus(model, clone=False)(
                score, tf.constant(images), penultimate_layer=penultimate_layer,
                seek_penultimate_conv_layer=False,
            )
        else:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    maps = np.asarray(maps, dtype="float32").reshape(images.shape[:3])
    return np.nan_to_num(maps)


def _display(images, display_images):
    """Pixels in [0, 1] for drawing, (N, H, W, C) with C in {1, 3}."""
    if display_images is not None:
        shown = np.asarray(display_images)
        if shown.ndim == 3:
            shown = shown[..., None]
        if shown.dtype == np.uint8 or shown.max(initial=0) > 1.0:
            shown = shown.astype("float32") / 255.0
        return np.clip(shown.astype("float32"), 0.0, 1.0)
    # Normalised images: stretch each one to [0, 1].
    shown = np.asarray(images, dtype="float32")
    low = shown.min(axis=(1, 2, 3), keepdims=True)
    high = shown.max(axis=(1, 2, 3), keepdims=True)
    return (shown - low) / np.maximum(high - low, 1e-12)


def _class_name(class_names, index):
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def _predict(model, images):
    logits = model.predict(np.asarray(images, "float32"), verbose=0, batch_size=256)
    return np.argmax(logits, axis=-1)


def plot_attributions(
    teacher,
    student,
    images,
    labels,
    class_names,
    path,
    methods=METHODS,
    display_images=None,
    penultimate_layer=None,
    title=None,
):
    """A grid of what teacher and student look at, one row per image.

    Columns: the image (its true class and each network's prediction, with
    a check or cross), then for each method the teacher's and the student's
    map for the true class: saliency drawn on its own, Grad-CAM++ overlaid
    on the image. Every map is scaled to [0, 1] per image; one colour bar
    per method.

    Args:
        teacher, student: single-output Keras models returning logits.
        images: `(N, H, W, C)` model inputs (normalised).
        labels: `N` true class indices (the class the maps explain).
        class_names: names of the classes (or None: numbers).
        path: the PNG file to write.
        methods: any of `"saliency"`, `"gradcam++"`.
        display_images: the same images un-normalised (uint8 0..255, or float
            in [0, 1]) for drawing; default: each normalised image stretched
            to [0, 1].
        penultimate_layer: Grad-CAM++ layer, one name for both networks or a
            `(teacher_layer, student_layer)` pair; default the last 4-D layer.
        title: the figure's title.

    Returns:
        `path`.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    images = np.asarray(images, dtype="float32")
    labels = np.asarray(labels).reshape(-1).astype(int)
    methods = tuple(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be among {METHODS}; got {m!r}.")
    shown = _display(images, display_images)
    if len(shown) != len(images):
        raise ValueError(
            f"display_images has {len(shown)} images for {len(images)} images."
        )
    if isinstance(penultimate_layer, (tuple, list)):
        layers = {"teacher": penultimate_layer[0], "student": penultimate_layer[1]}
    else:
        layers = {"teacher": penultimate_layer, "student": penultimate_layer}
    networks = {"teacher": teacher, "student": student}
    predictions = {role: _predict(net, images) for role, net in networks.items()}
    maps = {
        (m, role): attribution_maps(net, images, labels, m, layers[role])
        for m in methods
        for role, net in networks.items()
    }

    n = len(images)
    cols = 1 + 2 * len(methods)
    # Fixed geometry (inches), so every row's panels line up exactly.
    height, width = shown.shape[1:3]
    panel_w = 2.1
    panel_h = float(np.clip(panel_w * height / width, 1.2, 3.2))
    gap_x, caption, top, bottom, side = 0.15, 0.62, 0.45 + 0.62, 0.95, 0.2
    fig_w = 2 * side + cols * panel_w + (cols - 1) * gap_x
    fig_h = top + n * panel_h + (n - 1) * caption + bottom
    fig = _figure((fig_w, fig_h))

    def panel(row, col):
        x = side + col * (panel_w + gap_x)
        y = fig_h - top - row * (panel_h + caption) - panel_h
        return fig.add_axes((x / fig_w, y / fig_h, panel_w / fig_w, panel_h / fig_h))

    axes = np.array([[panel(i, j) for j in range(cols)] for i in range(n)])
    gray = shown.shape[-1] == 1
    image_kw = dict(
        cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest",
        aspect="auto",
    )
    map_kw = dict(vmin=0, vmax=1, aspect="auto")
    colour_maps = {"saliency": "inferno", "gradcam++": "jet"}
    luminance = shown[..., 0] if gray else shown @ np.array([0.299, 0.587, 0.114], "float32")
    for i in range(n):
        picture = shown[i, ..., 0] if gray else shown[i]
        ax = axes[i, 0]
        ax.imshow(picture, **image_kw)
        true = labels[i]
        lines = [f"true: {_class_name(class_names, true)}"]
        for role in ("teacher", "student"):
            pred = predictions[role][i]
            mark = "\u2713" if pred == true else "\u2717"
            lines.append(f"{role}: {_class_name(class_names, pred)} {mark}")
        ax.set_title("\n".join(lines), fontsize=8.5, loc="left", pad=3)
        for j, (m, role) in enumerate((m, r) for m in methods for r in ("teacher", "student")):
            ax = axes[i, 1 + j]
            heat = maps[(m, role)][i]
            if m == "gradcam++":
                # A grey copy of the image under the map keeps its colours readable.
                ax.imshow(luminance[i], cmap="gray", interpolation="nearest", **map_kw)
                ax.imshow(heat, cmap=colour_maps[m], alpha=0.5, interpolation="bilinear", **map_kw)
            else:
                ax.imshow(heat, cmap=colour_maps[m], interpolation="nearest", **map_kw)
            if i == 0:
                ax.set_title(f"{role}\n{_METHOD_TITLES[m]}", fontsize=9.5, pad=3)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for k, m in enumerate(methods):
        x = side + (1 + 2 * k) * (panel_w + gap_x) + 0.1
        bar_ax = fig.add_axes(
            (x / fig_w, 0.55 / fig_h, (2 * panel_w + gap_x - 0.2) / fig_w, 0.13 / fig_h)
        )
        scale = ScalarMappable(Normalize(0, 1), cmap=colour_maps[m])
        bar = fig.colorbar(scale, cax=bar_ax, orientation="horizontal")
        bar.set_label(f"{_METHOD_TITLES[m]} (per image, 0..1)", fontsize=8.5)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(
        title or "Where teacher and student look (maps for the true class)",
        fontsize=11, y=1 - 0.12 / fig_h, va="top",
    )
    return _save(fig, path)


# ------------------------------------------------------------------ driver


def _fsp_term(teacher, student, fsp_pairs, student_fsp_pairs, pooling):
    """An FSP term configured on the two networks (its pairs resolved)."""
    from keras_fsp.terms import FSPTerm

    term = FSPTerm(pairs="auto" if fsp_pairs is None else fsp_pairs,
                   student_pairs=student_fsp_pairs, pooling=pooling, projection=False)
    term.configure(teacher, student)
    return term


def _model_name(model, role):
    return "" if model.name == role else f" ({model.name})"


def _names_of_pairs(teacher_pairs, student_pairs):
    names = []
    for t, s in zip(teacher_pairs, student_pairs):
        names.append(t if tuple(t) == tuple(s) else f"{_pair_label(t)}  (student: {_pair_label(s)})")
    return names


def visualize_distillation(
    distiller_or_models,
    images,
    labels,
    class_names,
    output_dir,
    num_images=6,
    display_images=None,
    fsp_pairs="auto",
    student_fsp_pairs=None,
    fsp_pooling="max",
    methods=METHODS,
    batch_size=128,
):
    """Draws a distillation's pictures into `output_dir`.

    - `attributions.png`: `plot_attributions` on the first `num_images`
      images;
    - `fsp_matrices.png`: teacher vs student FSP matrices averaged over all
      `images` (computed in batches of `batch_size`).

    Args:
        distiller_or_models: an `FSPDistiller` (the pairs, pooling and
            projections of its `"fsp"` term are used), or a
            `(teacher, student)` tuple.
        images: `(N, H, W, C)` model inputs (normalised), e.g. test images.
        labels: `N` true class indices.
        class_names: names of the classes, or None.
        output_dir: folder for the PNG files (created).
        num_images: how many images the attribution grid shows.
        display_images: the un-normalised images, for drawing.
        fsp_pairs, student_fsp_pairs, fsp_pooling: for a `(teacher, student)`
            tuple: the layer pairs (`"auto"` or None: the section pairs, as
            in `FSPDistiller`) and the pooling. Ignored for a distiller.
        methods: attribution methods (see `plot_attributions`).

    Returns:
        `[attributions_path, fsp_matrices_path]`.
    """
    images = np.asarray(images, dtype="float32")
    labels = np.asarray(labels).reshape(-1)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"visualize_distillation needs images and as many labels; got "
            f"{len(images)} images and {len(labels)} labels."
        )
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "visualize_distillation draws attribution maps with tf-keras-vis "
            "and needs KERAS_BACKEND=tensorflow (plot_fsp_matrices works on "
            f"any backend); the backend is {keras.backend.backend()!r}."
        )
    os.makedirs(output_dir, exist_ok=True)
    if isinstance(distiller_or_models, (tuple, list)):
        teacher, student = distiller_or_models
        term = _fsp_term(teacher, student, fsp_pairs, student_fsp_pairs, fsp_pooling)
    else:
        distiller = distiller_or_models
        teacher, student = distiller.teacher, distiller.student
        if "fsp" not in distiller.terms:
            raise ValueError("The distiller has no FSP term to draw (no stage of it uses 'fsp').")
        term = distiller.terms["fsp"]
    t_pairs, s_pairs = term.pairs, term.student_pairs

    def compute(x):
        return term.matrices_of(teacher, student, x)

    k = min(num_images, len(images))
    attributions = plot_attributions(
        teacher, student, images[:k], labels[:k], class_names,
        os.path.join(output_dir, ATTRIBUTIONS), methods=methods,
        display_images=None if display_images is None else np.asarray(display_images)[:k],
    )

    sums_t = sums_s = None
    for start in range(0, len(images), batch_size):
        g_t, g_s = compute(images[start:start + batch_size])
        g_t = [np.asarray(g, "float64").sum(0) for g in g_t]
        g_s = [np.asarray(g, "float64").sum(0) for g in g_s]
        if sums_t is None:
            sums_t, sums_s = g_t, g_s
        else:
            sums_t = [a + b for a, b in zip(sums_t, g_t)]
            sums_s = [a + b for a, b in zip(sums_s, g_s)]
    fsp = plot_fsp_matrices(
        [g / len(images) for g in sums_t],
        [g / len(images) for g in sums_s],
        os.path.join(output_dir, FSP_MATRICES),
        pair_names=_names_of_pairs(t_pairs, s_pairs),
        title=(
            f"FSP matrices of the teacher{_model_name(teacher, 'teacher')} and the "
            f"student{_model_name(student, 'student')}, mean over {len(images)} images"
        ),
    )
    return [attributions, fsp]
