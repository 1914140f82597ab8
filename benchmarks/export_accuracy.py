"""Test accuracy of a trained student as float32 Keras, LiteRT float,
LiteRT int8 (post-training quantization) and ONNX, each run by its own
runtime (LiteRT's interpreter, ONNX Runtime).

    keras-fsp distill --method kd --dataset npz:cifar10.npz --schedule_scale 0.05 \
        --teacher results/teachers/cifar10_resnet26_seed0.weights.h5 --model_dir runs/kd-short
    python benchmarks/export_accuracy.py --dataset npz:cifar10.npz \
        --model runs/kd-short/student.keras --out_dir runs/kd-short/exports \
        --json_out benchmarks/results/export-cifar10-resnet8-kd.json

The images are normalised with the training set's per-channel mean and std
(as in training); int8 calibrates on the first `--representative` of them.
Needs the TensorFlow backend and `pip install 'keras-fsp[export]'`.
"""

import json
import os

from absl import app, flags

flags.DEFINE_string("dataset", "digits", "digits | npz:PATH (as keras-fsp --dataset).")
flags.DEFINE_string("model", None, "The trained student, a .keras file.", required=True)
flags.DEFINE_string("out_dir", "/tmp/export-accuracy", "Where the exported files go.")
flags.DEFINE_integer("representative", 500, "Training images that calibrate int8.")
flags.DEFINE_integer("batch_size", 500, "Images per LiteRT invocation.")
flags.DEFINE_string("json_out", None, "Also write the results here.")
FLAGS = flags.FLAGS


def litert_logits(path, x, batch_size):
    """Logits of `x` from a .tflite file, through LiteRT's interpreter."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    logits = []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        # Resized (and reallocated) only when the batch's size changes.
        if tuple(interpreter.get_input_details()[0]["shape"]) != batch.shape:
            interpreter.resize_tensor_input(inp["index"], batch.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], batch)
        interpreter.invoke()
        logits.append(interpreter.get_tensor(out["index"]))
    return np.concatenate(logits)


def onnx_logits(path, x, batch_size):
    """Logits of `x` from an .onnx file, through ONNX Runtime."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def main(_):
    import keras
    import numpy as np

    import keras_fsp
    from keras_fsp.apps import data

    (x_train, _), (x_test, y_test), info = data.load_arrays(FLAGS.dataset)
    x_test = data.normalize(x_test, info["mean"], info["std"])
    calibration = data.normalize(x_train[:FLAGS.representative], info["mean"], info["std"])
    model = keras.saving.load_model(FLAGS.model)
    y_test = np.asarray(y_test).reshape(-1)

    def accuracy(logits):
        return float(np.mean(logits.argmax(1) == y_test))

    reference = model.predict(x_test, batch_size=FLAGS.batch_size, verbose=0)
    results = {"keras_float32": {"accuracy": accuracy(reference)}}
    exports = (("litert_float32", "litert", ".tflite", litert_logits, {}),
               ("litert_int8", "litert", ".tflite", litert_logits,
                {"quantize": "int8", "representative_data": calibration}),
               ("onnx_float32", "onnx", ".onnx", onnx_logits, {}))
    for name, format, suffix, run, options in exports:
        path = keras_fsp.export_student(model, os.path.join(FLAGS.out_dir, name + suffix),
                                        format=format, overwrite=True, **options)
        logits = run(path, x_test, FLAGS.batch_size)
        results[name] = {
            "accuracy": accuracy(logits), "bytes": os.path.getsize(path),
            "agreement_with_keras": float(np.mean(logits.argmax(1) == reference.argmax(1))),
            # Quantization error of the logits: typical, 99th percentile, worst.
            **{f"{k}_abs_logit_error": float(np.percentile(np.abs(logits - reference), q))
               for k, q in (("median", 50), ("p99", 99), ("max", 100))},
        }
    results.update(dataset=FLAGS.dataset, model=FLAGS.model, test_images=len(x_test),
                   representative_images=len(calibration))
    print(json.dumps(results, indent=1))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    app.run(main)
