"""Student export for serving: SavedModel, LiteRT, ONNX or a .keras file.

Every format but "keras" goes through Keras' own exporters on the
TensorFlow backend, and imports TensorFlow only when called. A network of
one image input is served as `inputs` (float32); one of several inputs (a
keras-hub text classifier's `token_ids`, `segment_ids`, `padding_mask`) by
its inputs' own names and dtypes, integer token ids staying integers.
"""

import os
import re
import shutil
import tempfile

import keras

from keras_fsp.cloning import with_dtype_policies

# format -> the file suffix it needs (None: a directory).
FORMATS = {"tf_saved_model": None, "litert": ".tflite", "onnx": ".onnx", "keras": ".keras"}
QUANTIZE = (None, "int8")
# An export is staged in `.tmp-export-<pid>-*` beside its path, with the name
# of its target in this file.
_STAGING = re.compile(r"^\.tmp-export-(?:(\d+)-)?")
_TARGET = "target"
_REPLACED = ".replaced"


def _alive(pid):
    if pid is None:
        return False  # a staging folder of keras_fsp 0.2 (no pid in its name)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(parent):
    """Finishes what interrupted exports left in the folder `parent`: an
    export replaced halfway (the old copy moved aside, the new one not yet in
    place) goes back where it was, and the staging folders of processes that
    are gone are deleted."""
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        match = _STAGING.match(name)
        pid = int(match.group(1)) if match and match.group(1) else None
        if not match or _alive(pid):
            continue
        tmp = os.path.join(parent, name)
        try:
            with open(os.path.join(tmp, _TARGET), encoding="utf-8") as f:
                target = os.path.join(parent, os.path.basename(f.read().strip()))
        except OSError:
            target = None
        replaced = os.path.join(tmp, _REPLACED)
        if target and os.path.lexists(replaced) and not os.path.lexists(target):
            os.replace(replaced, target)
        shutil.rmtree(tmp, ignore_errors=True)


def _student_of(distiller_or_model):
    student = getattr(distiller_or_model, "student", distiller_or_model)

    if not isinstance(student, keras.Model):
        raise ValueError(
            "export_student takes an FSPDistiller or a keras.Model; got "
            f"{type(distiller_or_model).__name__}."
        )
    return student


def _check_request(path, format, overwrite, representative_data, quantize):
    """Refuses a bad request before anything is written or traced."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}; got {format!r}.")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or 'int8'; got {quantize!r}.")
    if quantize and format != "litert":
        raise ValueError(f"quantize={quantize!r} is for format='litert'; got format={format!r}.")
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            "quantize='int8' calibrates the activations' ranges: pass "
            "representative_data=, a few hundred normalised training images."
        )
    if representative_data is not None and quantize is None:
        raise ValueError("representative_data= is only used with quantize='int8'.")
    suffix = FORMATS[format]
    if suffix is None:
        known = tuple(s for s in FORMATS.values() if s) + (".h5", ".pb")
        if path.endswith(known) or os.path.isfile(path):
            raise ValueError(f"format={format!r} writes a directory; got the file path {path!r}.")
    elif not path.endswith(suffix) or os.path.isdir(path):
        raise ValueError(f"format={format!r} writes a file ending in {suffix}; got {path!r}.")
    if not overwrite and os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise FileExistsError(
            f"{path!r} exists and is not empty: pass overwrite=True to replace it, "
            "or choose a new path."
        )
    if format != "keras":
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                f"format={format!r} needs the TensorFlow backend (KERAS_BACKEND=tensorflow); "
                f"on {keras.backend.backend()!r} export with format='keras', then load that "
                "file with KERAS_BACKEND=tensorflow and export it there."
            )
    if format == "onnx":
        import importlib.util

        if importlib.util.find_spec("tf2onnx") is None:
            raise ImportError("format='onnx' needs tf2onnx: pip install 'keras-fsp[export]'.")


def float32_copy(model):
    """`model` computing in float32: `model` itself when every layer does,
    else a copy with float32 dtype policies and the same weights (a network
    trained under `"mixed_bfloat16"` or `"mixed_float16"` keeps float32
    variables, so nothing is lost; serving runtimes expect float32 graphs)."""
    def layers(m):
        for layer in m.layers:
            yield layer
            if isinstance(layer, keras.Model):
                yield from layers(layer)

    if all(layer.compute_dtype == "float32" for layer in [model, *layers(model)]):
        return model

    return with_dtype_policies(model, lambda layer: "float32")


@keras.saving.register_keras_serializable(package="keras_fsp")
class Standardize(keras.layers.Layer):
    """`(x - mean) / std` per channel, the statistics constants of the graph
    (not variables, which the ONNX conversion turns into inputs)."""

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    def call(self, x):
        mean = keras.ops.convert_to_tensor(self.mean, dtype=x.dtype)
        return (x - mean) * keras.ops.convert_to_tensor([1.0 / s for s in self.std], x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


def deployable(model, mean, std):
    """`model` taking raw inputs: a functional model that normalises them,
    `(x - mean) / std` per channel (the statistics it trained with,
    `keras_fsp.apps.data.channel_stats`), then runs `model`. Export it, and
    what serves it feeds the images as they come (e.g. 0-255 pixel values
    as float32), as training took them before normalising.
    """
    import numpy as np

    if len(model.inputs) != 1 or not _is_float(model.inputs[0].dtype):
        raise ValueError(
            f"deployable normalises raw images, but {model.name!r} takes "
            f"{[f'{t.name} ({t.dtype})' for t in model.inputs]}: token ids and masks are fed as "
            "they are; export the model itself."
        )
    mean = np.asarray(mean, "float32").reshape(-1)
    std = np.asarray(std, "float32").reshape(-1)
    inputs = keras.Input(model.input_shape[1:], name="inputs")
    normalized = Standardize(mean, std, name="normalization")(inputs)
    return keras.Model(inputs, model(normalized), name=f"{model.name}_raw_inputs")


def output_name(model):
    """What the exports call `model`'s output: `"probabilities"` when it ends
    in a softmax, else `"logits"`."""
    from keras_fsp import taps

    return "probabilities" if taps.ends_in_softmax(model) else "logits"


def _is_float(dtype):
    return "float" in str(dtype)


def _input_spec(student):
    """What every exported format takes: a float32 batch of images named
    `inputs` for a network of one float input; else each input under its
    own name with its dtype (float inputs as float32), in the network's
    structure (a dict for a dict of inputs)."""
    import tensorflow as tf

    inputs = student.inputs
    if len(inputs) == 1 and _is_float(inputs[0].dtype):
        return tf.TensorSpec((None,) + tuple(inputs[0].shape[1:]), tf.float32, name="inputs")

    def spec(t):
        dtype = "float32" if _is_float(t.dtype) else t.dtype
        return tf.TensorSpec((None,) + tuple(t.shape[1:]), dtype, name=t.name)

    structure = student.input if isinstance(student.input, (dict, list, tuple)) else inputs
    return keras.tree.map_structure(spec, structure)


def _write_saved_model(student, path):
    # An ExportArchive rather than `student.export`, whose signature would be
    # `serve(<input layer's name>) -> {"output_0"}`: serving code (and the
    # tests) rely on `serving_default(inputs) -> {"logits"}` (or
    # {"probabilities"} for a network ending in a softmax).
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(student)
    name = output_name(student)

    def serve(inputs):
        return {name: student(inputs, training=False)}

    archive.add_endpoint("serving_default", tf.function(serve, input_signature=[_input_spec(student)]))
    archive.write_out(path, verbose=False)


def _int8_options(representative_data):
    """TFLiteConverter attributes for full-integer post-training quantization,
    which Keras' LiteRT exporter sets on its converter."""
    import numpy as np
    import tensorflow as tf

    samples = np.asarray(representative_data, dtype="float32")
    return {
        "optimizations": [tf.lite.Optimize.DEFAULT],
        # The converter calibrates the activations' int8 ranges on these,
        # one image at a time.
        "representative_dataset": lambda: ([samples[i:i + 1]] for i in range(len(samples))),
        # Int8 ops only (conversion fails rather than leave a float op
        # behind); the input and output stay float32 (a quantize/dequantize
        # at each end), so callers feed the same normalised images.
        "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
    }


def _convert_erfc_to_onnx():
    """Teaches tf2onnx TensorFlow's `Erfc` as `1 - Erf(x)` (ONNX has no
    Erfc), unless it knows it: TensorFlow computes the exact GELU of
    transformers (keras-hub's ViT) with Erfc, which tf2onnx cannot convert
    otherwise."""
    import numpy as np
    from tf2onnx import constants, handler, utils

    opsets = handler.tf_op.get_opsets().get(constants.ONNX_DOMAIN, [])
    if any("Erfc" in ops for ops in opsets):
        return

    @handler.tf_op("Erfc")
    class Erfc:  # noqa: F841 (registered by the decorator)
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
            one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
            erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=node.name, name="erf")
            shapes, dtypes, output = node.output_shapes, node.output_dtypes, node.output[0]
            ctx.remove_node(node.name)
            ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=[output], name=node.name,
                          shapes=shapes, dtypes=dtypes)


def _write_onnx(student, path):
    """The student as ONNX, its inputs named as `_input_spec` names them and
    its output as `output_name`: its frozen graph converted by tf2onnx."""
    import tensorflow as tf
    import tf2onnx

    from keras_fsp import compat

    _convert_erfc_to_onnx()
    spec, name = _input_spec(student), output_name(student)
    serve = tf.function(lambda inputs: {name: student(inputs, training=False)}, input_signature=[spec])
    frozen = compat.frozen_function(serve.get_concrete_function())
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    rename = dict(zip(inputs, [s.name for s in tf.nest.flatten(spec)]))
    rename[outputs[0]] = name
    with tf.device("/cpu:0"):
        tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(add_shapes=True), name=student.name,
                                       input_names=inputs, output_names=outputs,
                                       tensors_to_rename=rename, output_path=path)


def _write(student, path, format, representative_data, quantize):
    if format == "keras":
        student.save(path)
    elif format == "tf_saved_model":
        _write_saved_model(student, path)
    elif format == "onnx":
        _write_onnx(student, path)
    else:
        options = _int8_options(representative_data) if quantize == "int8" else {}
        student.export(path, format=format, input_signature=[_input_spec(student)],
                       verbose=False, **options)


def export_student(distiller_or_model, path, format="tf_saved_model", overwrite=False,
                   representative_data=None, quantize=None):
    """Exports the student alone, without the teacher, for serving.

    Args:
        distiller_or_model: an `FSPDistiller` (its student is exported) or a
            `keras.Model`.
        path: where to write: a directory for `"tf_saved_model"`, else a file
            ending in `.tflite`, `.onnx` or `.keras`.
        format: `"tf_saved_model"` (default): a SavedModel whose
            `serving_default` signature takes a float32 batch of images,
            `inputs`, and returns `{"logits": ...}` (`{"probabilities":
            ...}` for a network ending in a softmax); it loads with plain
            `tf.saved_model.load` and needs neither Keras nor keras_fsp.
            `"litert"`: a LiteRT (TFLite) flatbuffer for
            `ai_edge_litert.interpreter.Interpreter`, input `inputs`.
            `"onnx"`: an ONNX model (via tf2onnx) for
            `onnxruntime.InferenceSession`, input `inputs`.
            `"keras"`: a `.keras` file of the student.
            All but `"keras"` need the TensorFlow backend; every format takes
            and returns float32 (the model's inputs: normalised as in
            training, or raw images for a `deployable` model; a network of
            several or integer inputs takes each under its own name and
            dtype, e.g. `token_ids`, `padding_mask`), and computes
            in float32 whatever dtype policy the student trained under
            (`float32_copy`).
        overwrite: replace an existing file or non-empty directory at `path`
            (the new export is written beside it first, then renamed over
            it); `False` refuses it.
        representative_data: with `quantize="int8"`: float32 inputs (a few
            hundred normalised training images) that calibrate the int8
            activation ranges.
        quantize: `None` or, for `"litert"`, `"int8"`: full-integer
            post-training quantization (int8 weights and activations,
            float32 input and output).

    Returns:
        the path written.
    """
    student = _student_of(distiller_or_model)
    path = os.fspath(path)
    _check_request(path, format, overwrite, representative_data, quantize)
    student = float32_copy(student)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    recover(parent)
    # Written into a sibling temporary folder (same file system, so the
    # renames below are atomic): a failed export leaves `path` untouched.
    tmp = tempfile.mkdtemp(prefix=f".tmp-export-{os.getpid()}-", dir=parent)
    try:
        name = os.path.basename(os.path.normpath(path))
        with open(os.path.join(tmp, _TARGET), "w", encoding="utf-8") as f:
            f.write(name)
        staged = os.path.join(tmp, name)
        _write(student, staged, format, representative_data, quantize)
        if os.path.isdir(path):
            # rename() cannot replace a non-empty directory: move the old one
            # into the temporary folder, which is deleted below (an
            # interruption between the two renames is undone by `recover`).
            os.replace(path, os.path.join(tmp, _REPLACED))
        os.replace(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
