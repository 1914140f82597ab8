"""Student export (TensorFlow only: imports TensorFlow when called)."""

import os


def _student_of(distiller_or_model):
    student = getattr(distiller_or_model, "student", distiller_or_model)
    import keras

    if not isinstance(student, keras.Model):
        raise ValueError(
            "export_student takes an FSPDistiller or a keras.Model; got "
            f"{type(distiller_or_model).__name__}."
        )
    return student


def export_student(distiller_or_model, path, format="tf_saved_model"):
    """Exports the student alone, without the teacher, for serving.

    Args:
        distiller_or_model: an `FSPDistiller` (its student is exported) or a
            `keras.Model`.
        path: output directory (SavedModel) or file ending in `.keras`.
        format: `"tf_saved_model"` (default): a SavedModel whose
            `serving_default` signature takes a float32 batch of images,
            `inputs`, and returns `{"logits": ...}`; it loads with plain
            `tf.saved_model.load` and needs neither Keras nor keras_fsp.
            `"keras"`: a `.keras` file of the student.

    Returns:
        the path written.
    """
    student = _student_of(distiller_or_model)
    if format == "keras":
        if not str(path).endswith(".keras"):
            raise ValueError(f"A .keras export needs a path ending in .keras; got {path!r}.")
        student.save(path)
        return path
    if format != "tf_saved_model":
        raise ValueError(
            f"format must be 'tf_saved_model' or 'keras'; got {format!r}."
        )
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "SavedModel export needs the TensorFlow backend "
            "(KERAS_BACKEND=tensorflow); on other backends export with "
            "format='keras' and convert on a TensorFlow machine."
        )
    import tensorflow as tf

    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(
            f"{path!r} exists and is not empty: choose a new directory so no "
            "earlier export is overwritten."
        )
    spec = tf.TensorSpec((None,) + tuple(student.input_shape[1:]), tf.float32, name="inputs")
    archive = keras.export.ExportArchive()
    archive.track(student)

    def serve(inputs):
        return {"logits": student(inputs, training=False)}

    archive.add_endpoint("serving_default", tf.function(serve, input_signature=[spec]))
    archive.write_out(path, verbose=False)
    return path
