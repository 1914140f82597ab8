"""The command line with the user's own networks and data: a teacher `.keras`
file of the user's, a keras.applications student, `module:function`
networks, and a folder of PNG images (`folder:`), end to end: distil,
killed and resumed, evaluate, and exports that take the raw images."""

import json
import os
import signal

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")

from keras_fsp.apps import cli, data  # noqa: E402
from tests.helpers import run_litert, start_fault_worker  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("the SavedModel, LiteRT and ONNX exports need TensorFlow", allow_module_level=True)

SIZE = 32  # MobileNetV3 takes 32x32 images and up


def _run(*args):
    return cli.run(["keras-fsp", *args])


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """Digits enlarged to 32x32 grayscale PNGs: folder/{train,test}/digit<k>/*.png
    (the raw uint8 test images returned, in the folder's order)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    for k, i in enumerate(order[:300]):
        split = "test" if k < 60 else "train"
        pixels = np.kron(digits.images[i] * 16, np.ones((SIZE // 8, SIZE // 8))).clip(0, 255)
        folder = root / split / f"digit{digits.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype("uint8")).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def user_teacher(png_folder, tmp_path_factory):
    """A small CNN of the user's, trained with plain Keras on the folder's
    normalised images, saved as a .keras file."""
    (x, y), _, info = data.load_arrays(f"folder:{png_folder}")
    keras.utils.set_random_seed(0)
    inputs = keras.Input(info["input_shape"])
    h = inputs
    for filters in (16, 32):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    teacher = keras.Model(inputs, keras.layers.Dense(info["num_classes"])(h), name="users_cnn")
    teacher.compile(keras.optimizers.Adam(3e-3),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(data.normalize(x, info["mean"], info["std"]), y, epochs=60, batch_size=40,
                verbose=0)
    path = tmp_path_factory.mktemp("teacher") / "users_cnn.keras"
    teacher.save(path)
    return path


def test_folder_of_pngs_users_teacher_and_an_applications_student_end_to_end(
        png_folder, user_teacher, tmp_path):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")

    run_dir = tmp_path / "run"
    # 240 images, batch 80: 3 steps an epoch, 8 epochs of KD.
    args = ["distill", f"--dataset=folder:{png_folder}", f"--teacher={user_teacher}",
            "--student=MobileNetV3Small", "--method=kd", "--batch_size=80",
            "--schedule_scale=0.0004", f"--model_dir={run_dir}", "--verbose=0"]
    # Killed inside the second epoch's checkpoint (its weights file).
    killed = start_fault_worker(*args, fault="write:5")
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    assert sorted(os.listdir(run_dir / "checkpoints"))[1:] == ["epoch-000001", "latest"]
    result = _run(*args)
    assert result["initial_epoch"] == 1 and result["complete"], result
    assert result["epochs_total"] > 3 and set(result["stages"].values()) == {"kd"}
    assert result["teacher_test_accuracy"] > 0.6  # the user's teacher learnt the digits
    config = json.loads((run_dir / "config.json").read_text())
    assert config["student"] == "MobileNetV3Small" and config["data"]["input_shape"] == [32, 32, 1]
    assert os.path.getsize(run_dir / "curves.png") > 1000

    evaluated = _run("evaluate", f"--model={run_dir}", f"--model_dir={tmp_path / 'eval'}")
    assert evaluated["test_accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-9)
    assert evaluated["examples"] == 60

    out = tmp_path / "exported"
    # (the run's own SavedModel, in its export/ folder, takes raw images too)
    exported = _run("export", f"--model={run_dir}", f"--model_dir={out}", "--formats=litert,onnx")
    assert exported["inputs"] == "raw"
    (_, _), (x_test, y_test), _ = data.load_arrays(f"folder:{png_folder}")
    raw = np.asarray(x_test, "float32")  # the PNGs' pixels, 0-255
    import tensorflow as tf

    served = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    outputs = {
        "saved_model": next(iter(served(tf.constant(raw)).values())).numpy(),
        "litert": run_litert(out / "model.tflite", raw)[0],
    }
    session = ort.InferenceSession(str(out / "model.onnx"))
    outputs["onnx"] = session.run(None, {session.get_inputs()[0].name: raw})[0]
    for name, logits in outputs.items():
        accuracy = np.mean(np.argmax(logits, -1) == y_test)
        assert accuracy == pytest.approx(result["test_accuracy"], abs=1e-9), name


def test_networks_named_on_the_command_line(png_folder, tmp_path):
    (tmp_path / "nets.py").write_text(
        "import keras\n\n"
        "def small(input_shape, num_classes):\n"
        "    inputs = keras.Input(input_shape)\n"
        "    h = keras.layers.Conv2D(8, 3, strides=2, activation='relu')(inputs)\n"
        "    h = keras.layers.GlobalAveragePooling2D()(h)\n"
        "    return keras.Model(inputs, keras.layers.Dense(num_classes)(h), name='small')\n\n"
        "def three_classes():\n"
        "    inputs = keras.Input((32, 32, 1))\n"
        "    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))\n")
    common = [f"--dataset=folder:{png_folder}", "--batch_size=80", "--schedule_scale=0.00002",
              "--verbose=0"]
    # A teacher of file.py:function trained from the command line.
    result = _run("train-teacher", *common, f"--teacher={tmp_path / 'nets.py'}:small",
                  f"--model_dir={tmp_path / 'teacher'}")
    model = keras.saving.load_model(tmp_path / "teacher" / "teacher.keras")
    assert model.name == "small" and result["parameters"] == model.count_params() == 170
    assert result["complete"] and result["epochs_done"] == 1
    # Mistakes, each one line before anything is written.
    for spec, message in [
        ("MobileNetV9", "--student MobileNetV9: not a file, a module:function or a "
                        "keras.applications network (one of ConvNeXtBase,"),
        (f"{tmp_path / 'nets.py'}:missing", "has no function 'missing'"),
        (f"{tmp_path / 'nets.py'}:three_classes", "takes (32, 32, 1) images and has 3 outputs; "
                                                  "the dataset has (32, 32, 1) images and 10 "
                                                  "classes"),
        ("no_such_module:make", "--student no_such_module:make: cannot import no_such_module "
                                "(ModuleNotFoundError"),
        (str(tmp_path / "none.keras"), "expected a .keras file, a keras.applications name"),
    ]:
        run_dir = tmp_path / "refused"
        with pytest.raises(cli.CLIError) as error:
            _run("distill", *common, "--method=none", f"--student={spec}",
                 f"--model_dir={run_dir}")
        assert message in error.value.message, error.value.message
        assert not run_dir.exists()
    with pytest.raises(cli.CLIError, match="cannot be built for \\(32, 32, 1\\) images and 10 "
                                           "classes: .*"):
        _run("distill", *common, "--method=none", "--student=InceptionV3",
             f"--model_dir={tmp_path / 'inception'}")
    # An architecture as the teacher starts untrained: refused, saying what to do.
    with pytest.raises(cli.CLIError, match=r"nothing to teach; --teacher .*nets.py:small names an "
                                           r"architecture, built untrained: train it first "
                                           r"\(`keras-fsp train-teacher --teacher"):
        _run("distill", *common, "--method=kd", f"--teacher={tmp_path / 'nets.py'}:small",
             "--student_depth=8", f"--model_dir={tmp_path / 'from-untrained'}")
    assert not (tmp_path / "from-untrained").exists()
    with pytest.raises(cli.CLIError, match="--image_size resizes the images of folder: and tfds: "
                                           "datasets only"):
        _run("distill", "--dataset=digits", "--image_size=16", "--method=none")


def test_help_per_subcommand(capsys):
    assert cli.main(["keras-fsp", "export", "--help"]) == 0
    export = capsys.readouterr().out
    assert "--formats" in export and "--raw_inputs" in export and "--dataset" in export
    assert "  --method:" not in export and "  --student:" not in export
    assert cli.main(["keras-fsp", "distill", "--help"]) == 0
    distill = capsys.readouterr().out
    assert "--method" in distill and "--student" in distill and "  --formats:" not in distill
    assert cli.main(["keras-fsp", "--help"]) == 0
    top = capsys.readouterr().out
    assert "keras-fsp SUBCOMMAND --help" in top and "  --formats:" not in top
    assert all(name in top for name in ("train-teacher", "distill", "reproduce", "--dataset"))


def test_a_trained_run_folder_names_its_data_and_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher-run").mkdir()
    run = tmp_path / "student-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "subcommand": "distill", "dataset": "folder:photos", "data_dir": None,
        "image_size": ["64", "48"], "validation_split": 0.1,
        "teacher": str(tmp_path / "teacher-run")}))
    config = cli.parse(["keras-fsp", "visualize", f"--model={run}"])
    assert (config.dataset, config.image_size, config.validation_split) == (
        "folder:photos", ("64", "48"), 0.1)
    assert config.teacher == str(tmp_path / "teacher-run")
    assert config.model_dir == os.path.join("runs", "visualize-folder-photos")
    # Flags given win over what the run folder says.
    config = cli.parse(["keras-fsp", "evaluate", f"--model={run}", "--dataset=digits"])
    assert (config.dataset, config.image_size) == ("digits", ())
