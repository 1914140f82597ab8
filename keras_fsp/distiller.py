"""`FSPDistiller`: a frozen teacher, a student, loss terms switched in stages,
one forward pass per network. Backend-agnostic (`keras.ops`): the same model
trains on TensorFlow (also under `tf.distribute`) and JAX.

The distiller knows nothing about what its terms compute
(`keras_fsp.terms`): it unions the taps of the active stage's terms, runs
each network once, hands every term the outputs and sums
`weight * value` over the terms.
"""

import contextlib

import keras
from keras import ops

from keras_fsp import (compat, data_checks, jax_steps, kernel_norms, stage_optimizers, taps,
                       teacher_cache)
from keras_fsp.callbacks import with_nan_guard
from keras_fsp.stages import Stage, apply_trainable, builtin_stages, resolve_stage
from keras_fsp.terms import LOGITS, TaskLoss, assemble

# Key of the augmented batch in the training-mode outputs of `call`.
AUGMENTED_INPUTS = "augmented_inputs"
# The term whose value `evaluate` reports as the student's loss.
TASK = "task"


@keras.saving.register_keras_serializable(package="keras_fsp")
class FSPDistiller(keras.Model):
    """Distils a frozen teacher into a student with loss terms switched in
    stages.

    The distiller taps functional networks through multi-output views, so
    one forward pass of each yields the logits and every feature map the
    active stage's terms need. The teacher is frozen (weights and batch-norm
    statistics), runs in inference mode on exactly the student's batch, and
    does not run at all in stages whose terms do not use it (`"task"`).
    Stages whose terms only read logits (`"kd"`, `"task"`, `"dkd"`) accept
    subclassed and Sequential networks too. A network ending in a softmax
    is tapped before it (its logits).

    `call`, `predict` and `evaluate` are the student's: its outputs, and the
    task loss plus the compiled metrics. In training mode (`training=True`)
    `call` returns the dict of the student's tapped outputs that the active
    stage needs.

    Terms (`keras_fsp.terms`): `"fsp"`, `"hint"`, `"kd"` and `"task"` are
    configured by this constructor's arguments; any registered term type
    (`"attention"`, `"dkd"`, your own) used by a stage is created with its
    defaults; `terms=[...]` adds or replaces terms by name.

    Stages: `"fsp"`, `"hint"`, `"kd"`, `"task"` (see
    `keras_fsp.stages.builtin_stages`) or any `keras_fsp.Stage`. Switch with
    `set_stage`, or inside one `fit` with `keras_fsp.callbacks.StageSchedule`.
    Each stage trains with its own optimizer: the stage's, or a fresh copy of
    the one given to `compile` (the `"fsp"` and `"hint"` stages clip that
    copy's gradients to a global norm of 10: their losses start in the
    thousands).

    Teacher caching: with fixed inputs (no `augment`), compute the teacher's
    targets once with `teacher_outputs(x)` and fit on
    `{"inputs": x, "teacher": cache}`; the teacher then does not run in the
    step (see `keras_fsp.teacher_cache`).

    Mixed precision: build the teacher and student under
    `keras.mixed_precision.set_dtype_policy("mixed_float16")` (or
    `"mixed_bfloat16"`). Every term is computed in float32; when the student
    computes in float16, every stage's optimizer is wrapped in a
    `keras.optimizers.LossScaleOptimizer` (`compile(...,
    auto_scale_loss=False)` turns this off).

    Args:
        teacher: trained `keras.Model` returning logits (or probabilities
            from a final softmax layer).
        student: `keras.Model` returning logits.
        terms: extra or replacement terms, a list of `DistillationTerm`
            (each used under its `name`).
        stages: extra named stages, `{name: Stage}`, usable by name.
        stage: the initial stage; default `"fsp"` when the FSP term is
            available, otherwise `"kd"`.
        augment: optional layer (e.g. `keras_fsp.augment.PadCropFlip()`)
            applied to each training batch inside the step, before both
            forward passes: teacher and student see the same augmented batch.
        fsp_pairs: the `"fsp"` term's teacher layer pairs, `"auto"`
            (default: the networks' sections paired by spatial size,
            `keras_fsp.pairing`), or `None` for no FSP term.
        student_fsp_pairs: the student's pairs, when its names differ.
        fsp_weights: lambda_i per pair; default 1 each.
        fsp_pooling: `"max"` (the paper) or `"avg"`.
        fsp_projection: `"auto"` (default): learned 1x1 projections where
            channel counts differ; `False`: such a pair is an error.
        hint_layer: teacher layer of the `"hint"` term (FitNets).
        guided_layer: student layer it guides; a regressor maps it to the
            hint's shape when the shapes differ.
        hint_normalize: see `keras_fsp.losses.HintLoss`.
        temperature: temperature of the `"kd"` term.
        kd_weight: share of the soft targets in the built-in `"kd"` stage,
            in [0, 1]; the labels get `1 - kd_weight`.

    Example:

    ```python
    from keras_fsp import FSPDistiller
    from keras_fsp.callbacks import StageSchedule
    from keras_fsp.papers import cifar_resnet

    teacher = cifar_resnet(26)  # trained
    distiller = FSPDistiller(teacher, cifar_resnet(8))
    distiller.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                      metrics=["accuracy"])
    distiller.fit(x, y, epochs=60,
                  callbacks=[StageSchedule({0: "fsp", 20: "task"})])
    student = distiller.student
    ```
    """

    def __init__(
        self,
        teacher,
        student,
        terms=None,
        stages=None,
        stage=None,
        augment=None,
        fsp_pairs="auto",
        student_fsp_pairs=None,
        fsp_weights=None,
        fsp_pooling="max",
        fsp_projection="auto",
        hint_layer=None,
        guided_layer=None,
        hint_normalize=False,
        temperature=4.0,
        kd_weight=0.9,
        name="fsp_distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        taps.check_model(teacher, "teacher")
        taps.check_model(student, "student")
        if teacher is student:
            raise ValueError(
                "The teacher and the student are the same model object: freezing the teacher "
                "would freeze the student. Pass a separate student (e.g. "
                "keras.models.clone_model(teacher) for self-distillation)."
            )
        taps.check_same_input_shapes(teacher, student)
        self.teacher = teacher
        self.student = student
        self.teacher.trainable = False
        self.augment = augment
        self.fsp_pairs = fsp_pairs
        self.student_fsp_pairs = student_fsp_pairs
        self.fsp_weights = fsp_weights
        self.fsp_pooling = fsp_pooling
        self.fsp_projection = fsp_projection
        self.hint_layer = hint_layer
        self.guided_layer = guided_layer
        self.hint_normalize = hint_normalize
        self.temperature = temperature
        self.kd_weight = kd_weight
        self._given_terms = list(terms or [])
        self._given_stages = dict(stages or {})
        self._views = taps.Views()
        self._stage_optimizers = stage_optimizers.StageOptimizers()
        self._auto_scale_loss = True
        self._teacher_cached = False  # fitting on a teacher cache
        self._student_probabilities = taps.ends_in_softmax(student)

        self.stages = {**builtin_stages(kd_weight), **self._given_stages}
        stage_optimizers.check_not_shared(self.stages.values())
        builtin = assemble.builtin_terms(
            fsp_pairs, student_fsp_pairs, fsp_weights, fsp_pooling, fsp_projection, hint_layer,
            guided_layer, hint_normalize, temperature)
        # _unavailable: term name -> why it cannot be used on these networks.
        self.terms, self._unavailable = assemble.make_terms(
            teacher, student, *builtin, self._given_terms, self._given_stages.values())
        self._term_weights = {
            t: self.add_weight(shape=(), initializer="zeros", trainable=False, name=f"{t}_weight")
            for t in self.terms
        }
        self._term_trackers = {t: keras.metrics.Mean(name=f"{t}_loss") for t in self.terms}
        for stage_ in self._given_stages.values():
            self._check_stage_terms(stage_)
        # The student's batch-normalised kernel norms as created, as variables
        # so that checkpoints keep them: a resumed run restores to the same
        # targets (`keras_fsp.callbacks.RestoreKernelNorms`).
        self._initial_kernel_norms = {
            name: self.add_weight(
                shape=(), trainable=False, name=f"initial_norm_{name}",
                initializer=keras.initializers.Constant(norm),
            )
            for name, norm in kernel_norms.kernel_norms(student).items()
        }
        self._student_trainable = {id(l): l.trainable for l in student.layers}
        self._optimizer_template = None
        self._stage = None
        if stage is None:
            stage = "fsp" if "fsp" in self.terms else "kd"
        self.set_stage(stage)
        self.built = True

    # ------------------------------------------------------------------ terms

    def _check_stage_terms(self, stage):
        assemble.check_stage_terms(stage, self.terms, self._unavailable, self.fsp_pairs)

    def check_stages(self, stages):
        """Raises `ValueError` now for what would fail only when training
        reaches one of `stages` (names or `Stage`s, e.g. a `StageSchedule`'s):
        an unknown stage, a term this distiller cannot compute (e.g. soft
        targets between networks with other class counts), an optimizer
        shared by two stages."""
        stages = [resolve_stage(s, self.stages) for s in stages]
        for stage in stages:
            self._check_stage_terms(stage)
        stage_optimizers.check_not_shared([*self.stages.values(), *stages])

    def _active(self, stage):
        """`[(name, term)]` of the stage's terms."""
        return [(name, self.terms[name]) for name in stage.losses]

    def _student_taps(self, stage):
        return list(dict.fromkeys(n for _, t in self._active(stage) for n in t.student_taps))

    def uses_teacher(self, stage=None):
        """Whether a stage (default: the active one) runs the teacher."""
        stage = self._stage if stage is None else resolve_stage(stage, self.stages)
        return any(t.uses_teacher for _, t in self._active(stage))

    # ----------------------------------------------------------------- stages

    @property
    def stage(self):
        """The active `Stage`."""
        return self._stage

    def set_stage(self, stage):
        """Activates a stage (a name or a `Stage`).

        Sets the loss weights and which student layers train, gives the stage
        its optimizer, and rebuilds the train and test functions, so the
        switch takes effect also in the middle of `fit` (between epochs). A
        `Stage` object not yet known is added to `stages` (so it is saved
        and resumed with the distiller).

        Raises:
            ValueError: for an unknown name, a stage whose terms this
                distiller cannot compute, or a different stage of the same
                name.
        """
        stage = resolve_stage(stage, self.stages)
        if stage is self._stage:
            return
        known = self.stages.get(stage.name)
        if known is not None and known is not stage and known != stage:
            raise ValueError(
                f"The distiller already has a different stage named {stage.name!r}; give the "
                "new stage another name."
            )
        self._check_stage_terms(stage)
        if known is None:
            self.stages[stage.name] = stage
            self._given_stages[stage.name] = stage
            stage_optimizers.check_not_shared(self.stages.values())
        compat.flush_jax_state(self)
        self._apply_trainable(stage)
        for name, variable in self._term_weights.items():
            variable.assign(stage.losses.get(name, 0.0))
        self._stage = stage
        if self._optimizer_template is not None:
            self._install_optimizer(stage)
        if not getattr(self, "_in_fit", False):
            self._restore_student_trainable()

    def term_weight(self, name):
        """The current weight of the term `name` (0 when its stage is not active)."""
        return float(ops.convert_to_numpy(self._term_weights[name]))

    def set_term_weight(self, name, value):
        """Sets the weight of the term `name` in the active stage, without
        retracing the step (see `keras_fsp.callbacks.LossWeightSchedule`)."""
        self._term_weights[name].assign(float(value))

    def _apply_trainable(self, stage):
        tapped = [n for n in self._student_taps(stage) if n != LOGITS]
        apply_trainable(stage, self.student, self._student_trainable, tapped)
        for name, term in self.terms.items():
            term.trainable = name in stage.losses  # the term's own layers

    def _restore_student_trainable(self):
        for layer in self.student.layers:
            layer.trainable = self._student_trainable[id(layer)]

    # -------------------------------------------------------------- optimizers

    def _stage_optimizer(self, stage):
        """The stage's optimizer, loss-scaled when training computes in
        float16 (also when only the student or one of its layers does)."""
        layers = [self, self.student, *self.student.layers, *self.terms.values()]
        scaled = self._auto_scale_loss and stage_optimizers.computes_in_float16(layers)
        return self._stage_optimizers.for_stage(stage, self._optimizer_template, scaled)

    def _install_optimizer(self, stage):
        variables = self.trainable_variables
        strategy = getattr(self, "distribute_strategy", None)
        # A Keras optimizer remembers the strategy it was created under: make
        # (clone) and build it inside the model's, or a stage switch inside
        # `fit` raises "Mixing different tf.distribute.Strategy objects".
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            optimizer = self._stage_optimizer(stage)
            if not optimizer.built:
                optimizer.build(variables)
        built_for = compat.optimizer_variable_count(optimizer)
        if built_for != len(variables):
            raise ValueError(
                f"The optimizer of stage {stage.name!r} was built for {built_for} variables but "
                f"the stage trains {len(variables)}: give each Stage its own optimizer instance."
            )
        self.optimizer = optimizer
        # Keras builds the train and test functions once per fit: rebuild
        # them so the new stage's losses and variables are what gets computed
        # (and validation does not depend on the stage it was first traced in).
        self.train_function = None
        self.test_function = None
        self.make_train_function()

    def make_train_function(self, force=False):
        # On JAX with steps_per_execution > 1: the steps in one compiled scan.
        if not jax_steps.applies(self):
            return super().make_train_function(force)
        if self.train_function is None or force:
            source = getattr(self, "_device_source", None)
            self.train_function = jax_steps.multi_step_train_function(self, source)
        return None

    def compile(self, optimizer="sgd", loss=None, metrics=None, auto_scale_loss=True, **kwargs):
        """Configures training.

        Args:
            optimizer: the optimizer; each stage without its own optimizer
                trains with a fresh copy of it.
            loss: the task (hard-label) loss on the student's logits;
                default `SparseCategoricalCrossentropy(from_logits=True)`.
                A `keras.losses.Loss` instance.
            metrics: metrics on the student's outputs (e.g. `["accuracy"]`).
            auto_scale_loss: if True (default) and the distiller or the
                student computes in float16 (`"mixed_float16"`), every
                stage's optimizer is wrapped in a
                `keras.optimizers.LossScaleOptimizer` (unless it is one).
            **kwargs: passed to `keras.Model.compile`. On JAX,
                `steps_per_execution=K` runs K training steps per dispatch
                inside one compiled `lax.scan` (`keras_fsp.jax_steps`); the
                fastest setting on a GPU is one epoch's worth.

        Raises:
            ValueError: if `loss` is not a `keras.losses.Loss` instance.
        """
        if loss is not None:
            self.terms[TASK].loss = TaskLoss(loss).loss  # checked
        self._auto_scale_loss = bool(auto_scale_loss)
        # Loss scaling is applied per stage (`_stage_optimizer`), not here.
        super().compile(optimizer=optimizer, loss=None, metrics=metrics,
                        auto_scale_loss=False, **kwargs)
        self._optimizer_template = self.optimizer
        self._apply_trainable(self._stage)
        self._install_optimizer(self._stage)
        self._restore_student_trainable()

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:  # what `compile` was given, as `compile_from_config` needs it
            config["loss"] = keras.saving.serialize_keras_object(self.terms[TASK].loss)
            config["auto_scale_loss"] = self._auto_scale_loss
        return config

    def compile_from_config(self, config):
        # Keras' own skips models that override `compile`.
        self.compile(**keras.saving.deserialize_keras_object(config))

    # ----------------------------------------------------------- forward pass

    def call(self, inputs, training=None):
        inputs, cache = teacher_cache.split(inputs)
        if not training:
            return self.student(inputs, training=training)
        outputs = {}
        if cache is not None:
            teacher_cache.refuse_augment(self.augment)
        if self.augment is not None:
            inputs = self.augment(inputs, training=True)
            outputs[AUGMENTED_INPUTS] = inputs  # for the teacher
        outputs.update(
            self._views.run(self.student, self._student_taps(self._stage), inputs, True, "student")
        )
        return outputs

    def _teacher_targets(self, terms, x, cache=None, stage_name=""):
        """`{key: tensor}` the `terms` need from the teacher: from `cache`,
        or from one inference-mode pass of the teacher on `x`."""
        users = [t for t in terms if t.uses_teacher]
        if not users:
            return {}
        if cache is not None:  # the teacher does not run
            return teacher_cache.select(cache, self._target_shapes(users), stage_name)
        names = [n for t in users for n in t.teacher_taps]
        features = self._views.run(self.teacher, names, x, False, "teacher")
        # Nothing flows back into the teacher: keep none of its activations.
        features = {k: ops.stop_gradient(v) for k, v in features.items()}
        targets = {}
        for term in users:
            targets.update(term.teacher_targets(features))
        return targets

    def _target_shapes(self, terms):
        shapes = {}
        for term in terms:
            shapes.update(term.target_shapes(self.teacher))
        return shapes

    def teacher_outputs(self, x, batch_size=None, stage=None, verbose=0):
        """The teacher's targets on `x`, computed once, for `fit` to reuse.

        Runs the teacher in inference mode over `x` in batches and returns
        exactly what the stages' terms need from it, one row per example
        (FSP matrices in float32, far smaller than the feature maps; raw
        maps; logits before any temperature). Fit on
        `{"inputs": x, "teacher": cache}` and the teacher does not run in
        the step. Only valid for fixed inputs: the cache belongs to `x`
        example by example.

        Args:
            x: the training inputs (arrays), in the order given to `fit`.
            batch_size: batch size of the teacher's passes (default 32).
            stage: the stage to cache for, a name, a `Stage`, or a list of
                them (e.g. `["fsp", "kd"]` for a `StageSchedule` over both);
                default the active stage.
            verbose: `predict`'s verbosity.

        Returns:
            dict `{key: numpy array}` (see `keras_fsp.teacher_cache`).

        Raises:
            ValueError: if the distiller has an `augment` layer (the teacher
                must see each augmented batch), or no stage given uses the
                teacher.

        Example:

        ```python
        distiller = FSPDistiller(teacher, student, stage="fsp")
        distiller.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
        cache = distiller.teacher_outputs(x, batch_size=256)
        distiller.fit({"inputs": x, "teacher": cache}, y, batch_size=128)
        ```
        """
        teacher_cache.refuse_augment(self.augment)
        if stage is None:
            stages = [self._stage]
        elif isinstance(stage, (list, tuple)):
            stages = [resolve_stage(s, self.stages) for s in stage]
        else:
            stages = [resolve_stage(stage, self.stages)]
        for s in stages:
            self._check_stage_terms(s)
        terms = list({id(t): t for s in stages for _, t in self._active(s)}.values())
        if not any(t.uses_teacher for t in terms):
            raise ValueError(
                f"Stage(s) {[s.name for s in stages]} do not use the teacher: there is nothing "
                "to cache. Pass the stage(s) the cache is for, e.g. stage='fsp'."
            )
        return teacher_cache.compute(lambda v: self._teacher_targets(terms, v), x,
                                     batch_size=batch_size, verbose=verbose)

    # ------------------------------------------------------------------ loss

    def _weighted_mean(self, per_example, sample_weight):
        per_example = ops.cast(per_example, "float32")
        if sample_weight is not None:
            sw = ops.cast(ops.reshape(sample_weight, ops.shape(per_example)), "float32")
            per_example = per_example * sw
        return ops.mean(per_example)

    def _regularization(self):
        return compat.regularization_loss(self)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        if not isinstance(y_pred, dict):
            # Evaluation: the student's own loss on its outputs.
            logits = y_pred
            if self._student_probabilities:  # softmax of log p is p
                logits = ops.log(ops.clip(ops.cast(y_pred, "float32"), 1e-30, 1.0))
            task = self.terms[TASK].compute({LOGITS: logits}, {}, y)
            return self._weighted_mean(task, sample_weight) / compat.num_replicas() + (
                self._regularization()
            )

        stage = self._stage
        x, cache = teacher_cache.split(x)
        x = y_pred.get(AUGMENTED_INPUTS, x)
        active = self._active(stage)
        teacher = self._teacher_targets([t for _, t in active], x, cache, stage.name)
        total = 0.0
        batch = None
        for name, term in active:
            per_example = term.compute(y_pred, teacher, y)
            if batch is None:  # weight the trackers like Keras' own loss tracker
                batch = ops.shape(per_example)[0]
            value = self._weighted_mean(per_example, sample_weight)
            self._term_trackers[name].update_state(value, sample_weight=batch)
            total = total + self._term_weights[name] * value
        # Each replica averages over its share of the global batch; gradients
        # are summed over replicas, so divide by their number.
        total = total / compat.num_replicas()
        if stage.regularization:
            total = total + self._regularization()
        return total

    @property
    def non_trainable_variables(self):
        variables = super().non_trainable_variables
        stage = getattr(self, "_stage", None)
        if stage is None or (self.uses_teacher(stage) and not self._teacher_cached):
            return variables
        # A stage without the teacher (or fitting on a teacher cache) leaves
        # its variables out of the step's state: on JAX each one is otherwise
        # an argument and a result of the compiled step, which measurably
        # slows the "task" stage down.
        teacher = {id(v) for v in self.teacher.variables}
        return [v for v in variables if id(v) not in teacher]

    def restore_kernel_norms(self):
        """Rescales the student's batch-normalised kernels to the norms they
        had when the distiller was created, without changing the student's
        function (see `keras_fsp.kernel_norms`).

        Returns:
            `{layer name: factor applied}`.
        """
        targets = {
            name: float(ops.convert_to_numpy(v)) for name, v in self._initial_kernel_norms.items()
        }
        return kernel_norms.restore_kernel_norms(self.student, targets)

    # ---------------------------------------------------------------- metrics

    @property
    def metrics(self):
        metrics = super().metrics
        trackers = getattr(self, "_term_trackers", None)
        stage = getattr(self, "_stage", None)
        if trackers is None or stage is None:
            return metrics
        if getattr(self, "_evaluating", False):
            hidden = {id(m) for m in trackers.values()}  # the student's metrics only
        else:
            hidden = {id(m) for t, m in trackers.items() if t not in stage.losses}
            if LOGITS not in self._student_taps(stage):
                # No logits in this stage (fsp, hint): nothing to score.
                hidden.add(id(compat.compiled_metrics(self)))
        return [m for m in metrics if id(m) not in hidden]

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`; the student's own trainable flags are restored
        afterwards (stages freeze parts of it only while training).

        `x` may carry a teacher cache: `{"inputs": x, "teacher": cache}` with
        `cache = self.teacher_outputs(x)`; the teacher then does not run.

        A loss term that turns NaN or infinite stops training with a
        `keras_fsp.callbacks.NonFiniteLossError` naming the term, the stage
        and what to do (`StopOnNonFiniteLoss`, added unless the callbacks
        hold one).

        Raises:
            ValueError: for a cache with an `augment` layer, a cache of
                another length than `x`, or one lacking what the stage needs
                (also when a `StageSchedule` switches to such a stage); for
                a subclassed teacher or student returning probabilities
                (`keras_fsp.taps.check_outputs_logits`).
        """
        inputs, cache = teacher_cache.split(x)
        # A subclassed network: built on the first batch (the stage's
        # optimizer then needs its new variables), refused if it returns
        # probabilities.
        built = taps.check_outputs_logits({"teacher": self.teacher, "student": self.student}, inputs)
        if built and self._optimizer_template is not None:
            self._install_optimizer(self._stage)
        if cache is not None:
            teacher_cache.refuse_augment(self.augment)
            teacher_cache.check_lengths(inputs, cache)
            users = [t for _, t in self._active(self._stage) if t.uses_teacher]
            if users:
                teacher_cache.select(cache, self._target_shapes(users), self._stage.name)
        data_checks.check_fit_arrays(taps.tap_shape(self.student, LOGITS, "student")[-1],
                                     inputs, y, kwargs.get("validation_data"))
        args, kwargs = with_nan_guard(args, kwargs)
        self._apply_trainable(self._stage)
        self._in_fit = True
        self._teacher_cached = cache is not None
        try:
            x, source = jax_steps.prepare_fit(self, x, kwargs)
            if source is not getattr(self, "_device_source", None):
                self.train_function = None  # built for another data source
            self._device_source = source
            return super().fit(x, y, *args, **kwargs)
        finally:
            self._in_fit = False
            self._teacher_cached = False
            self._restore_student_trainable()

    def evaluate(self, *args, **kwargs):
        """The student's `evaluate`: its task loss and compiled metrics."""
        self._evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating = False

    def reset_metrics(self):
        super().reset_metrics()
        for tracker in self._term_trackers.values():
            tracker.reset_state()

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logs = None
        if isinstance(y_pred, dict):
            y_pred = y_pred.get(LOGITS)
            if y_pred is None:  # fsp/hint stages: the head does not run
                logs = {m.name: m.result() for m in self.metrics}
            elif self._student_probabilities:
                y_pred = ops.softmax(y_pred)  # the compiled metrics expect outputs
        if logs is None:
            logs = super().compute_metrics(x, y, y_pred, sample_weight)
        if compat.is_multi_worker(compat.distribution_strategy(self)):
            # With several workers Keras reduces each step's logs with
            # `strategy.reduce("MEAN", v, axis=0)`, which fails on scalars
            # ("Invalid reduction dimension 0"): give them one axis, which
            # the reduction removes (tensorflow/tensorflow#72388).
            logs = {k: ops.reshape(v, (1,)) for k, v in logs.items()}
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = compat.distribution_strategy(self)
        if iterator is not None and compat.is_multi_worker(strategy):
            data_batch = compat.first_replica_batch(strategy, iterator)
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # ---------------------------------------------------------- serialization

    def get_config(self):
        builtin = builtin_stages(self.kd_weight)
        custom = {
            name: stage.get_config()
            for name, stage in self.stages.items()
            if builtin.get(name) != stage  # user stages, overrides included
        }
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "teacher": serialize(self.teacher),
            "student": serialize(self.student),
            "terms": [serialize(t) for t in self._given_terms],
            "stages": custom,
            "stage": self._stage.name,
            "augment": None if self.augment is None else serialize(self.augment),
            "fsp_pairs": self.fsp_pairs,
            "student_fsp_pairs": self.student_fsp_pairs,
            "fsp_weights": self.fsp_weights,
            "fsp_pooling": self.fsp_pooling,
            "fsp_projection": self.fsp_projection,
            "hint_layer": self.hint_layer,
            "guided_layer": self.guided_layer,
            "hint_normalize": self.hint_normalize,
            "temperature": self.temperature,
            "kd_weight": self.kd_weight,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        for key in ("teacher", "student", "augment"):
            if config.get(key) is not None:
                config[key] = deserialize(config[key])
        config["terms"] = [deserialize(t) for t in config.get("terms") or []]
        config["stages"] = {n: Stage.from_config(c) for n, c in (config.get("stages") or {}).items()}
        for key in ("trainable", "dtype"):
            config.pop(key, None)
        return cls(**config)
