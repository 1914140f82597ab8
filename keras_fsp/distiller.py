"""`FSPDistiller`: a frozen teacher, a student, loss terms switched in stages,
one forward pass per network. Backend-agnostic (`keras.ops`): the same model
trains on TensorFlow (also under `tf.distribute`) and JAX.

The distiller knows nothing about what its terms compute (`keras_fsp.terms`):
it unions the taps of the active stage's terms, runs each network once,
hands every term the outputs and sums `weight * value` over the terms; what
a stage sets is `keras_fsp.stages.StageController`'s.
"""

import keras
from keras import ops

from keras_fsp import (compat, data_checks, ensemble, jax_steps, kernel_norms, migration, taps,
                       teacher_cache)
from keras_fsp.callbacks import with_nan_guard
from keras_fsp.stages import Stage, StageController
from keras_fsp.terms.base import LOGITS, DistillationTerm, batch_mean
from keras_fsp.terms.task import check_student_loss, default_student_loss, per_example_loss

# Key of the augmented batch in the training-mode outputs of `call`.
AUGMENTED_INPUTS = "/augmented_inputs"  # "/": never a layer's name


def _results(metrics):
    """`{name: value}` of metrics, as Keras' `get_metrics_result` gives them."""
    logs = {}
    for metric in metrics:
        result = metric.result()
        logs.update(result if isinstance(result, dict) else {metric.name: result})
    return logs


@keras.saving.register_keras_serializable(package="keras_fsp")
class FSPDistiller(compat.MultiWorkerBuild, keras.Model):
    """Distils a frozen teacher into a student with loss terms switched in
    stages.

    Functional networks are tapped through multi-output views: one forward
    pass of each yields every output the active stage's terms need (stages
    whose terms read only logits accept any network). The teacher runs in
    inference mode on exactly the student's batch, and not at all in stages
    that do not use it. `call`, `predict` and `evaluate` are the student's.

    Args:
        teacher: trained `keras.Model` returning logits (or probabilities
            from a final softmax layer); frozen here. A list of them is
            their `keras_fsp.teacher_ensemble` with equal weights (call it
            yourself for other weights, or for the member whose features
            automatic pairing reads).
        student: `keras.Model` returning logits.
        terms: `DistillationTerm` instances with their settings, each used
            under its `name` (e.g. `SoftTargetTerm(temperature=3)`); a stage
            naming a registered type gets one with its defaults otherwise.
        stages: `{name: Stage}` besides (or replacing) the built-in `"fsp"`,
            `"hint"`, `"attention"`, `"kd"` and `"task"`
            (`keras_fsp.stages.builtin_stages`).
        stage: the initial stage; default `"kd"` (0.9 soft targets + 0.1
            labels).
        augment: optional layer (e.g. `keras_fsp.augment.PadCropFlip()`) run
            on each training batch inside the step: teacher and student see
            the same augmented batch.

    Switch stages with `set_stage`, or inside one `fit` with
    `keras_fsp.callbacks.StageSchedule`; each trains with its own optimizer
    (its own, or a fresh copy of the compiled one). With fixed inputs,
    `teacher_outputs(x)` caches what the teacher gives and
    `fit({"inputs": x, "teacher": cache}, y)` never runs it.

    Example:

    ```python
    distiller = FSPDistiller(teacher, cifar_resnet(8))
    distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
    distiller.fit(x, y, epochs=60, callbacks=[StageSchedule({0: "fsp", 20: "kd"})])
    ```
    """

    def __init__(self, teacher, student, terms=None, stages=None, stage="kd", augment=None,
                 name="fsp_distiller", **kwargs):
        migration.refuse_removed_arguments(kwargs)
        super().__init__(name=name, **kwargs)
        if isinstance(teacher, (list, tuple)):
            teacher = ensemble.teacher_ensemble(teacher)
        taps.check_networks(teacher, student)
        self.teacher, self.student, self.augment = teacher, student, augment
        if augment is not None and not augment.built and taps.is_functional(student):
            # An unbuilt augmentation (a `keras.Sequential` of layers) makes
            # Keras' JAX `fit` trace the model on a placeholder to build it.
            augment.build(student.inputs[0].shape)
        self.teacher.trainable = False
        self.terms, self._trackers = {}, {}
        self._views = taps.Views()
        self.student_loss = default_student_loss()
        self._student_probabilities = taps.ends_in_softmax(student)
        self.initial_kernel_norms = kernel_norms.InitialKernelNorms(student)
        self._stages = StageController(self, stages)
        for term in terms or []:
            self.add_term(term)
        self._stages.check(self._stages.given.values())
        self.set_stage(stage)
        self.built = True

    def add_term(self, term):
        """Configures `term` against the two networks; adds it under its name."""
        if not isinstance(term, DistillationTerm):
            raise ValueError(f"terms must be keras_fsp.terms.DistillationTerm instances; got {term!r}.")
        term.configure(self.teacher, self.student)
        term.use_student_loss(self.student_loss)
        self.terms.pop(term.name, None)  # (untracked: its variables go with it)
        self.terms[term.name] = term
        if term.name not in self._trackers:  # a tracked dict: no setdefault
            self._trackers[term.name] = keras.metrics.Mean(name=f"{term.name}_loss")
        self._stages.adopt(term)

    @property
    def stage(self):
        """The active `Stage`."""
        return self._stages.active

    @property
    def stages(self):
        """`{name: Stage}` of every stage this distiller knows."""
        return self._stages.stages

    def set_stage(self, stage):
        """Activates a stage (a name or a `Stage`, added to `stages` if new):
        its terms, their weights, which student layers train and its
        optimizer; takes effect also between the epochs of one `fit`."""
        self._stages.set(stage)

    def check_stages(self, stages):
        """`stages` (names or `Stage`s) as `Stage`s, their terms made now."""
        return self._stages.check(stages)

    def active_terms(self, stage=None):
        """The terms of `stage` (default: the active one)."""
        return self._stages.terms_of(stage or self.stage)

    def compile(self, optimizer="sgd", loss=None, metrics=None, auto_scale_loss=True, **kwargs):
        """`keras.Model.compile`: `optimizer` is copied for each stage without
        its own; `loss` (on the student's logits; default sparse
        cross-entropy) is the `"task"` term's and `evaluate`'s;
        `auto_scale_loss` loss-scales every stage's optimizer under float16.
        On JAX, `steps_per_execution=K` runs K steps in one compiled scan."""
        if loss is not None:
            self.student_loss = check_student_loss(loss)
        for term in self.terms.values():
            term.use_student_loss(self.student_loss)
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, auto_scale_loss=False,
                        **kwargs)
        self._stages.compile(self.optimizer, auto_scale_loss)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:  # what `compile` was given, as `compile_from_config` needs it
            config["loss"] = keras.saving.serialize_keras_object(self.student_loss)
            config["auto_scale_loss"] = self._stages.auto_scale_loss
        return config

    def compile_from_config(self, config):
        # Keras' own skips models that override `compile`.
        self.compile(**keras.saving.deserialize_keras_object(config))

    def make_train_function(self, force=False):
        jax_steps.make_train_function(self, super().make_train_function, force)

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, checked first (the arrays, a teacher cache
        `{"inputs": x, "teacher": cache}`, subclassed networks returning
        probabilities); a NaN or infinite term stops it naming the term."""
        inputs, cache = teacher_cache.split(x)
        built = taps.check_outputs_logits({"teacher": self.teacher, "student": self.student}, inputs)
        if built and self._stages.template is not None:
            self._stages.install_optimizer()  # for the variables just made
        if cache is not None:
            teacher_cache.check_fit(self, inputs, cache)
        data_checks.check_fit_arrays(
            taps.tap_shape(self.student, LOGITS, "student")[-1], inputs, y,
            kwargs.get("validation_data"),
            sparse_labels=isinstance(self.student_loss, keras.losses.SparseCategoricalCrossentropy))
        args, kwargs = with_nan_guard(args, kwargs)
        x = jax_steps.prepare_fit(self, x, kwargs)
        with self._stages.training(teacher_cached=cache is not None):
            return super().fit(x, y, *args, **kwargs)

    def call(self, inputs, training=None):
        inputs, cache = teacher_cache.split(inputs)
        if not training:
            return self.student(inputs, training=training)
        outputs = {}
        if cache is not None:
            teacher_cache.refuse_augment(self.augment)
        if self.augment is not None:
            inputs = outputs[AUGMENTED_INPUTS] = self.augment(inputs, training=True)
        outputs.update(self._views.run(self.student, self._stages.student_taps(), inputs, True,
                                       "student"))
        return outputs

    def teacher_targets(self, terms, x, cache=None):
        """`{key: tensor}` the `terms` need from the teacher: from `cache`,
        or from one inference-mode pass of the teacher on `x`."""
        users = [t for t in terms if t.uses_teacher]
        if not users:
            return {}
        if cache is not None:  # the teacher does not run
            shapes = teacher_cache.target_shapes(users, self.teacher)
            return teacher_cache.select(cache, shapes, self.stage.name)
        names = [n for t in users for n in t.teacher_taps]
        features = self._views.run(self.teacher, names, x, False, "teacher")
        # Nothing flows back into the teacher: keep none of its activations.
        features = {k: ops.stop_gradient(v) for k, v in features.items()}
        targets = {}
        for term in users:
            targets.update(term.teacher_targets(features))
        return targets

    def teacher_outputs(self, x, batch_size=None, stage=None, verbose=0):
        """The teacher's targets on `x` for the terms of `stage` (a name, a
        `Stage`, a list; default the active one), computed once for
        `fit({"inputs": x, "teacher": cache}, y)` (`keras_fsp.teacher_cache`)."""
        stages = [stage] if isinstance(stage, (str, Stage)) else stage
        return teacher_cache.teacher_outputs(self, x, batch_size, stages, verbose)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        if not isinstance(y_pred, dict):  # evaluation: the student's own loss
            logits = taps.as_logits(y_pred, self._student_probabilities)
            value = batch_mean(per_example_loss(self.student_loss, y, logits), sample_weight)
            return value / compat.num_replicas() + compat.regularization_loss(self)
        x, cache = teacher_cache.split(x)
        x = y_pred.get(AUGMENTED_INPUTS, x)
        active = self.active_terms()
        teacher = self.teacher_targets(active, x, cache)
        total = 0.0
        # Trackers are weighted by the batch size, as Keras' own loss tracker.
        batch = ops.shape(keras.tree.flatten(y_pred)[0])[0]
        for term in active:
            value = batch_mean(term.compute(y_pred, teacher, y), sample_weight)
            self._trackers[term.name].update_state(value, sample_weight=batch)
            total = total + term.stage_weight * value
        # Each replica averages over its share of the global batch; gradients
        # are summed over replicas, so divide by their number.
        total = total / compat.num_replicas()
        if self.stage.regularization:
            total = total + compat.regularization_loss(self)
        return total

    @property
    def non_trainable_variables(self):
        variables = super().non_trainable_variables
        if getattr(self, "_stages", None) is None or self._stages.runs_teacher():
            return variables
        # A stage without the teacher (or a fit on a teacher cache) leaves its
        # variables out of the step's state: on JAX each one is otherwise an
        # argument and a result of the compiled step, which slows it down.
        teacher = {id(v) for v in self.teacher.variables}
        return [v for v in variables if id(v) not in teacher]

    @property
    def metrics(self):
        metrics = super().metrics
        stage = getattr(self, "_stages", None) and self._stages.active
        if stage is None:
            return metrics
        hidden = {id(m) for t, m in self._trackers.items() if t not in stage.terms}
        if LOGITS not in self._stages.student_taps():  # fsp, hint: nothing to score
            hidden.add(id(compat.compiled_metrics(self)))
        return [m for m in metrics if id(m) not in hidden]

    def reset_metrics(self):
        super().reset_metrics()
        for tracker in self._trackers.values():
            tracker.reset_state()

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if not isinstance(y_pred, dict):  # evaluation: the student's loss and metrics
            super().compute_metrics(x, y, y_pred, sample_weight)
            trackers = {id(m) for m in self._trackers.values()}
            logs = _results(m for m in super().metrics if id(m) not in trackers)
        elif LOGITS not in y_pred:  # fsp/hint stages: the head does not run
            logs = _results(self.metrics)
        else:
            logits = y_pred[LOGITS]  # the compiled metrics expect outputs
            logs = super().compute_metrics(
                x, y, ops.softmax(logits) if self._student_probabilities else logits,
                sample_weight)
        return compat.reducible_logs(self, logs)

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "teacher": serialize(self.teacher),
            "student": serialize(self.student),
            "terms": [serialize(t) for t in self.terms.values()],
            "stages": {n: s.get_config() for n, s in self._stages.custom_stages().items()},
            "stage": self.stage.name,
            "augment": None if self.augment is None else serialize(self.augment),
        }

    @classmethod
    def from_config(cls, config):
        config = {k: v for k, v in config.items() if k not in ("trainable", "dtype")}
        deserialize = keras.saving.deserialize_keras_object
        for key in ("teacher", "student", "augment"):
            config[key] = deserialize(config.get(key))
        config["terms"] = [deserialize(t) for t in config.get("terms") or []]
        config["stages"] = {n: Stage.from_config(c) for n, c in (config.get("stages") or {}).items()}
        return cls(**config)
