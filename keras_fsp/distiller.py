"""`FSPDistiller`: a frozen teacher, a student, staged FSP / hint / KD / task
losses, one forward pass per network. Backend-agnostic (`keras.ops`): the same
model trains on TensorFlow (also under `tf.distribute`) and JAX.
"""

import collections
import contextlib

import keras
from keras import ops, tree

from keras_fsp import kernel_norms, taps, teacher_cache
from keras_fsp.fsp import POOLING_MODES, fsp_matrix, pooled_spatial_size
from keras_fsp.losses import FSPLoss, HintLoss, SoftTargetLoss
from keras_fsp.stages import (
    LOSS_TERMS,
    UP_TO_TAPS,
    Stage,
    builtin_stages,
    resolve_stage,
)


# Key of the augmented batch in the training-mode outputs of `call`.
AUGMENTED_INPUTS = "augmented_inputs"


def _num_replicas():
    """Replicas of the enclosing `tf.distribute` strategy (1 elsewhere)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf  # already imported by Keras on this backend

    return tf.distribute.get_strategy().num_replicas_in_sync


def _multi_worker(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy with several workers."""
    if strategy is None or keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def _clone_optimizer(optimizer):
    return keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))


# What a stage needs from the teacher: FSP pair indices, hint map, logits.
_TeacherNeeds = collections.namedtuple("_TeacherNeeds", "pairs hint logits")


class _Views:
    """Cache of tap views, deliberately not tracked by Keras: the views share
    the teacher's and student's layers, which are tracked already."""

    def __init__(self):
        self.cache = {}

    def get(self, model, names, include_logits, role):
        key = (id(model), tuple(names), include_logits)
        if key not in self.cache:
            self.cache[key] = taps.tap_model(model, names, include_logits, role)
        return self.cache[key]


class _LossScaled:
    """The `LossScaleOptimizer` wrapping each stage's own optimizer, made once
    so that returning to a stage resumes its loss scale (not tracked)."""

    def __init__(self):
        self.wrappers = {}  # id(inner) -> (inner, wrapper)

    def get(self, optimizer):
        key = id(optimizer)
        if key not in self.wrappers:
            wrapper = keras.optimizers.LossScaleOptimizer(
                optimizer, name="loss_scale_optimizer"
            )
            self.wrappers[key] = (optimizer, wrapper)
        return self.wrappers[key][1]


class FSPDistiller(keras.Model):
    """Distils a frozen teacher into a student with FSP, hint and soft-target
    losses, in stages.

    Both networks are functional models with one output (the logits). The
    distiller taps their intermediate layers through multi-output views, so
    one forward pass of each yields the logits and every feature map a stage
    needs. The teacher is frozen (weights and batch-norm statistics), runs in
    inference mode on exactly the student's batch, and does not run at all in
    stages that do not need it (`"task"`).

    `call`, `predict` and `evaluate` are the student's: the logits, and the
    task loss plus the compiled metrics. In training mode (`training=True`)
    `call` returns the dict of the student's tapped outputs that the active
    stage needs.

    Stages: `"fsp"`, `"hint"`, `"kd"`, `"task"` (see
    `keras_fsp.stages.builtin_stages`) or any `keras_fsp.Stage`. Switch with
    `set_stage`, or inside one `fit` with
    `keras_fsp.callbacks.StageSchedule`. Each stage trains with its own
    optimizer: the stage's, or a fresh copy of the one given to `compile`.

    Teacher caching: with fixed inputs (no `augment`), compute the teacher's
    targets once with `teacher_outputs(x)` and fit on
    `{"inputs": x, "teacher": cache}`; the teacher then does not run in the
    step (see `keras_fsp.teacher_cache`).

    Mixed precision: build the teacher and student under
    `keras.mixed_precision.set_dtype_policy("mixed_float16")` (or
    `"mixed_bfloat16"`). FSP matrices and every loss are computed in float32;
    when the student computes in float16, every stage's optimizer is wrapped
    in a `keras.optimizers.LossScaleOptimizer` (once; `compile(...,
    auto_scale_loss=False)` turns this off).

    Args:
        teacher: trained functional `keras.Model` returning logits.
        student: functional `keras.Model` returning logits.
        fsp_pairs: teacher layer pairs `[(first, second), ...]` whose FSP
            matrices the student learns; `"auto"` (default) finds each
            section's input and output (`keras_fsp.taps.section_pairs`);
            `None` disables FSP.
        student_fsp_pairs: the student's pairs, when its layer names differ
            from the teacher's. With `fsp_pairs="auto"` they are found
            automatically too.
        fsp_weights: lambda_i per pair; default equal weights of 1.
        fsp_pooling: `"max"` (the paper) or `"avg"`.
        fsp_projection: if True, a student map whose channel count differs
            from the teacher's goes through a learned 1x1 convolution;
            if False (default) such a pair is an error.
        hint_layer: teacher layer giving the FitNets hint.
        guided_layer: student layer the hint guides. A regressor (convolution)
            maps it to the hint's shape when the shapes differ.
        hint_normalize: see `keras_fsp.losses.HintLoss`.
        temperature: softmax temperature of the soft-target loss.
        kd_weight: weight of the soft-target term in the built-in `"kd"`
            stage; the labels get `1 - kd_weight`.
        stages: extra named stages, `{name: Stage}`, usable by name.
        augment: optional layer (e.g. `keras_fsp.augment.PadCropFlip()`)
            applied to each training batch inside the step, before both
            forward passes: teacher and student see the same augmented batch.
        stage: the initial stage; default `"fsp"` when FSP pairs exist,
            otherwise `"kd"`.

    Example:

    ```python
    from keras_fsp import FSPDistiller
    from keras_fsp.callbacks import StageSchedule
    from keras_fsp.models import cifar_resnet

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
        fsp_pairs="auto",
        student_fsp_pairs=None,
        fsp_weights=None,
        fsp_pooling="max",
        fsp_projection=False,
        hint_layer=None,
        guided_layer=None,
        hint_normalize=False,
        temperature=4.0,
        kd_weight=0.9,
        stages=None,
        stage=None,
        augment=None,
        name="fsp_distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        taps._check_functional(teacher, "teacher")
        taps._check_functional(student, "student")
        self.teacher = teacher
        self.student = student
        self.teacher.trainable = False
        self.augment = augment
        self._views = _Views()
        self._loss_scaled = _LossScaled()
        self._auto_scale_loss = True
        self._teacher_cached = False  # fitting on a teacher cache
        self._config = dict(
            fsp_pairs=fsp_pairs,
            student_fsp_pairs=student_fsp_pairs,
            fsp_weights=fsp_weights,
            fsp_pooling=fsp_pooling,
            fsp_projection=fsp_projection,
            hint_layer=hint_layer,
            guided_layer=guided_layer,
            hint_normalize=hint_normalize,
            temperature=temperature,
            kd_weight=kd_weight,
        )

        self.fsp_pairs, self.student_fsp_pairs = self._resolve_fsp_pairs(
            fsp_pairs, student_fsp_pairs
        )
        if fsp_pooling not in POOLING_MODES:
            raise ValueError(
                f"fsp_pooling must be one of {POOLING_MODES}; got {fsp_pooling!r}."
            )
        self.fsp_pooling = fsp_pooling
        self.fsp_loss = FSPLoss(weights=fsp_weights)
        if fsp_weights is not None and len(fsp_weights) != len(self.fsp_pairs):
            raise ValueError(
                f"fsp_weights has {len(fsp_weights)} entries for "
                f"{len(self.fsp_pairs)} FSP pairs {self.fsp_pairs}."
            )
        self.fsp_projections = self._check_fsp_pairs(fsp_projection)

        if (hint_layer is None) != (guided_layer is None):
            raise ValueError(
                "hint_layer (teacher) and guided_layer (student) go together: "
                f"got hint_layer={hint_layer!r}, guided_layer={guided_layer!r}."
            )
        self.hint_layer, self.guided_layer = hint_layer, guided_layer
        self.hint_loss = HintLoss(normalize=hint_normalize)
        self.regressor = self._make_regressor()
        self.kd_loss = SoftTargetLoss(temperature=temperature)
        self._task_loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True
        )

        self.stages = {**builtin_stages(kd_weight), **(stages or {})}
        self._term_weights = {
            t: self.add_weight(
                shape=(), initializer="zeros", trainable=False,
                name=f"{t}_weight",
            )
            for t in LOSS_TERMS
        }
        self._term_trackers = {
            t: keras.metrics.Mean(name=f"{t}_loss") for t in LOSS_TERMS
        }
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
        self._student_trainable = {l.name: l.trainable for l in student.layers}
        self._optimizer_template = None
        self._stage = None
        if stage is None:
            stage = "fsp" if self.fsp_pairs else "kd"
        self.set_stage(stage)
        self.built = True

    # ------------------------------------------------------------------ setup

    def _resolve_fsp_pairs(self, fsp_pairs, student_fsp_pairs):
        if fsp_pairs is None or (
            not isinstance(fsp_pairs, str) and len(fsp_pairs) == 0
        ):
            return [], []
        if isinstance(fsp_pairs, str):
            if fsp_pairs != "auto":
                raise ValueError(
                    f"fsp_pairs must be 'auto', None or a list of layer-name "
                    f"pairs; got {fsp_pairs!r}."
                )
            teacher_pairs = taps.section_pairs(self.teacher)
            student_pairs = (
                taps.section_pairs(self.student)
                if student_fsp_pairs is None
                else student_fsp_pairs
            )
        else:
            teacher_pairs = fsp_pairs
            student_pairs = fsp_pairs if student_fsp_pairs is None else student_fsp_pairs
        teacher_pairs = [tuple(p) for p in teacher_pairs]
        student_pairs = [tuple(p) for p in student_pairs]
        for pairs in (teacher_pairs, student_pairs):
            for p in pairs:
                if len(p) != 2:
                    raise ValueError(
                        f"Each FSP pair is (first_layer, second_layer); got {p!r}."
                    )
        if len(teacher_pairs) != len(student_pairs):
            raise ValueError(
                f"The teacher has {len(teacher_pairs)} FSP pairs "
                f"{teacher_pairs} and the student {len(student_pairs)} "
                f"{student_pairs}: they must match one to one."
            )
        return teacher_pairs, student_pairs

    def _check_fsp_pairs(self, projection):
        """Validates every pair's shapes; returns the student projections."""
        projections = {}
        for t_pair, s_pair in zip(self.fsp_pairs, self.student_fsp_pairs):
            for model, pair, role in (
                (self.teacher, t_pair, "teacher"),
                (self.student, s_pair, "student"),
            ):
                shapes = [taps.output_shape(model, n, role) for n in pair]
                try:
                    pooled_spatial_size(*shapes)
                except ValueError as e:
                    raise ValueError(
                        f"FSP pair {pair} of the {role}: {e}"
                    ) from None
            for t_name, s_name in zip(t_pair, s_pair):
                t_shape = taps.output_shape(self.teacher, t_name, "teacher")
                s_shape = taps.output_shape(self.student, s_name, "student")
                if t_shape[-1] == s_shape[-1] or s_name in projections:
                    continue
                if not projection:
                    raise ValueError(
                        f"FSP pair mismatch: teacher layer {t_name!r} has shape "
                        f"{t_shape} and student layer {s_name!r} has shape "
                        f"{s_shape}; their channel counts must be equal for "
                        "the FSP matrices to have the same size. Tap layers "
                        "with equal channels, or pass fsp_projection=True to "
                        "learn a 1x1 projection of the student's map."
                    )
                proj = keras.layers.Conv2D(
                    t_shape[-1], 1, use_bias=False, name=f"fsp_projection_{s_name}"
                )
                proj.build(s_shape)
                projections[s_name] = proj
        return projections

    def _make_regressor(self):
        if self.hint_layer is None:
            return None
        hint = taps.output_shape(self.teacher, self.hint_layer, "teacher")
        guided = taps.output_shape(self.student, self.guided_layer, "student")
        if hint == guided:
            return None
        if len(hint) != 4 or len(guided) != 4:
            raise ValueError(
                f"Hint layer {self.hint_layer!r} {hint} and guided layer "
                f"{self.guided_layer!r} {guided} differ in shape; the regressor "
                "maps 4-D feature maps only."
            )
        if guided[1] % hint[1] or guided[2] % hint[2]:
            raise ValueError(
                f"The guided layer {self.guided_layer!r} {guided} must be at "
                f"least as large as the hint {self.hint_layer!r} {hint}, by an "
                "integer factor, for a strided regressor to map it."
            )
        strides = (guided[1] // hint[1], guided[2] // hint[2])
        regressor = keras.layers.Conv2D(
            hint[-1], 3, strides=strides, padding="same",
            kernel_initializer="he_normal", name="hint_regressor",
        )
        regressor.build(guided)
        return regressor

    # ----------------------------------------------------------------- stages

    @property
    def stage(self):
        """The active `Stage`."""
        return self._stage

    def set_stage(self, stage):
        """Activates a stage (a name or a `Stage`).

        Sets the loss weights and which student layers train, gives the stage
        its optimizer, and rebuilds the train function, so the switch takes
        effect also in the middle of `fit` (between epochs).

        Raises:
            ValueError: for an unknown name, or a stage whose losses this
                distiller cannot compute (FSP without pairs, hint without
                layers).
        """
        stage = resolve_stage(stage, self.stages)
        if stage is self._stage:
            return
        if "fsp" in stage.losses and not self.fsp_pairs:
            raise ValueError(
                f"Stage {stage.name!r} uses the FSP loss but this distiller "
                "has no FSP pairs (fsp_pairs=None)."
            )
        if stage.fsp_pairs is not None and not all(
            0 <= i < len(self.fsp_pairs) for i in stage.fsp_pairs
        ):
            raise ValueError(
                f"Stage {stage.name!r} selects FSP pairs {list(stage.fsp_pairs)} "
                f"but the distiller has {len(self.fsp_pairs)} pairs "
                f"(indices 0..{len(self.fsp_pairs) - 1}): {self.fsp_pairs}."
            )
        if "hint" in stage.losses and self.hint_layer is None:
            raise ValueError(
                f"Stage {stage.name!r} uses the hint loss: create the "
                "distiller with hint_layer=... and guided_layer=...."
            )
        if getattr(self, "_jax_state", None) is not None:
            # JAX, inside fit: write the last step's state back while the
            # variable lists still match it, and drop it. Otherwise, if the
            # new stage's first step fails, fit's cleanup assigns the stale
            # state to the new stage's variables, and that shape error hides
            # the real one.
            self.jax_state_sync()
            self._jax_state = None
        self._apply_trainable(stage)
        for term, variable in self._term_weights.items():
            variable.assign(stage.losses.get(term, 0.0))
        self._stage = stage
        if self._optimizer_template is not None:
            self._install_optimizer(stage)
        if not getattr(self, "_in_fit", False):
            self._restore_student_trainable()

    def _apply_trainable(self, stage):
        selector = stage.trainable
        if selector is None:
            chosen = None
        elif selector == UP_TO_TAPS:
            names, _ = self._student_taps(stage)
            if not names:
                raise ValueError(
                    f"Stage {stage.name!r} trains {UP_TO_TAPS!r} but taps no "
                    "student layer (it has no 'fsp' or 'hint' term)."
                )
            view = self._views.get(self.student, names, False, "student")
            chosen = {l.name for l in view.layers}
        elif callable(selector):
            chosen = {l.name for l in self.student.layers if selector(l)}
        else:
            for name in selector:
                taps.get_layer(self.student, name, "student")
            chosen = set(selector)
        for layer in self.student.layers:
            original = self._student_trainable[layer.name]
            layer.trainable = original and (chosen is None or layer.name in chosen)
        if self.regressor is not None:
            self.regressor.trainable = "hint" in stage.losses
        for proj in self.fsp_projections.values():
            proj.trainable = "fsp" in stage.losses

    def _needs_loss_scaling(self):
        """Whether training computes in float16, as Keras' `compile` checks
        (there: the model's policy is `"mixed_float16"`); here also when only
        the student (or one of its layers) computes in float16."""
        if not self._auto_scale_loss:
            return False
        layers = [self, self.student, *self.student.layers]
        layers += list(self.fsp_projections.values())
        if self.regressor is not None:
            layers.append(self.regressor)
        return any(getattr(l, "compute_dtype", None) == "float16" for l in layers)

    def _stage_optimizer(self, stage):
        """The stage's optimizer, loss-scaled (once) when training in float16.

        `keras.Model.compile` wraps the compiled optimizer in a
        `LossScaleOptimizer` under `"mixed_float16"`; a stage's own optimizer
        and the per-stage copies would bypass it, so the wrapping is done
        here, for every stage. An optimizer that is a `LossScaleOptimizer`
        already is used as it is.
        """
        if stage.optimizer is not None:
            optimizer = stage.optimizer
        else:
            optimizer = _clone_optimizer(self._optimizer_template)
        if not self._needs_loss_scaling() or isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            return optimizer
        if stage.optimizer is not None:
            return self._loss_scaled.get(optimizer)  # the same wrapper each time
        return keras.optimizers.LossScaleOptimizer(
            optimizer, name="loss_scale_optimizer"
        )

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
        if len(optimizer._trainable_variables) != len(variables):
            raise ValueError(
                f"The optimizer of stage {stage.name!r} was built for "
                f"{len(optimizer._trainable_variables)} variables but the stage "
                f"trains {len(variables)}: give each Stage its own optimizer "
                "instance."
            )
        self.optimizer = optimizer
        # Keras builds the train function once per fit: rebuild it so the new
        # stage's losses and variables are what gets computed.
        self.train_function = None
        self.make_train_function()

    def compile(
        self, optimizer="sgd", loss=None, metrics=None, auto_scale_loss=True,
        **kwargs,
    ):
        """Configures training.

        Args:
            optimizer: the optimizer; each stage without its own optimizer
                trains with a fresh copy of it.
            loss: the task (hard-label) loss on the student's logits;
                default `SparseCategoricalCrossentropy(from_logits=True)`.
                A `keras.losses.Loss` instance.
            metrics: metrics on the student's logits (e.g. `["accuracy"]`).
            auto_scale_loss: if True (default) and the distiller or the
                student computes in float16 (`"mixed_float16"`), every
                stage's optimizer is wrapped in a
                `keras.optimizers.LossScaleOptimizer` (unless it is one).
            **kwargs: passed to `keras.Model.compile`.

        Raises:
            ValueError: if `loss` is not a `keras.losses.Loss` instance.
        """
        if loss is not None:
            if not isinstance(loss, keras.losses.Loss):
                raise ValueError(
                    "loss must be a keras.losses.Loss instance that takes the "
                    "student's logits, e.g. keras.losses."
                    "SparseCategoricalCrossentropy(from_logits=True); got "
                    f"{loss!r}."
                )
            self._task_loss = loss
        self._auto_scale_loss = bool(auto_scale_loss)
        # Loss scaling is applied per stage (`_stage_optimizer`), not here.
        super().compile(
            optimizer=optimizer, loss=None, metrics=metrics,
            auto_scale_loss=False, **kwargs,
        )
        self._optimizer_template = self.optimizer
        self._apply_trainable(self._stage)
        self._install_optimizer(self._stage)
        self._restore_student_trainable()

    # ---------------------------------------------------------- forward pass

    def _pair_indices(self, stage):
        if "fsp" not in stage.losses:
            return []
        if stage.fsp_pairs is None:
            return list(range(len(self.fsp_pairs)))
        return list(stage.fsp_pairs)

    def _student_taps(self, stage):
        names = []
        for i in self._pair_indices(stage):
            names += list(self.student_fsp_pairs[i])
        if "hint" in stage.losses:
            names.append(self.guided_layer)
        # The head runs only when a term needs the logits.
        with_logits = "kd" in stage.losses or "task" in stage.losses
        return list(dict.fromkeys(names)), with_logits

    def _teacher_needs(self, stages):
        """What the stages' losses need from the teacher (`_TeacherNeeds`)."""
        pairs, hint, logits = [], False, False
        for stage in stages:
            pairs += self._pair_indices(stage)
            hint = hint or "hint" in stage.losses
            logits = logits or "kd" in stage.losses
        return _TeacherNeeds(tuple(sorted(set(pairs))), hint, logits)

    def _teacher_keys(self, needs):
        """`{cache key: per-example shape}` of the teacher's targets."""
        def shape(name):
            return taps.output_shape(self.teacher, name, "teacher")

        keys = {}
        for i in needs.pairs:
            a, b = self.fsp_pairs[i]
            key = teacher_cache.fsp_key((a, b), self.fsp_pooling)
            keys[key] = (shape(a)[-1], shape(b)[-1])
        if needs.hint:
            keys[teacher_cache.hint_key(self.hint_layer)] = shape(self.hint_layer)[1:]
        if needs.logits:
            keys[teacher_cache.LOGITS_KEY] = tuple(self.teacher.outputs[0].shape)[1:]
        return keys

    def _teacher_view(self, needs):
        names = []
        for i in needs.pairs:
            names += list(self.fsp_pairs[i])
        if needs.hint:
            names.append(self.hint_layer)
        names = list(dict.fromkeys(names))
        return self._views.get(self.teacher, names, needs.logits, "teacher")

    def _teacher_targets(self, features, needs):
        """The teacher's targets (keyed as in the cache) from its view's
        outputs: FSP matrices of the needed pairs, hint map, logits."""
        # Nothing flows back into the teacher: keep none of its activations.
        features = {k: ops.stop_gradient(v) for k, v in features.items()}
        targets = {}
        for i in needs.pairs:
            a, b = self.fsp_pairs[i]
            key = teacher_cache.fsp_key((a, b), self.fsp_pooling)
            targets[key] = fsp_matrix(features[a], features[b], pooling=self.fsp_pooling)
        if needs.hint:
            targets[teacher_cache.hint_key(self.hint_layer)] = features[self.hint_layer]
        if needs.logits:
            targets[teacher_cache.LOGITS_KEY] = features[taps.LOGITS]
        return targets

    def teacher_outputs(self, x, batch_size=None, stage=None, verbose=0):
        """The teacher's targets on `x`, computed once, for `fit` to reuse.

        Runs the teacher's tapped view in inference mode over `x` in batches
        and returns exactly what the stages' losses need from it, one row
        per example: the FSP matrices of the active pairs (float32; far
        smaller than the feature maps), the hint map and the logits (before
        the temperature). Fit on `{"inputs": x, "teacher": cache}` and the
        teacher does not run in the step. Only valid for fixed inputs: the
        cache belongs to `x` example by example.

        Args:
            x: the training inputs (arrays), in the order given to `fit`.
            batch_size: batch size of the teacher's passes (default 32).
            stage: the stage to cache for, a name, a `Stage`, or a list of
                them (e.g. `["fsp", "kd"]` for a `StageSchedule` over both);
                default the active stage.
            verbose: `predict`'s verbosity.

        Returns:
            dict `{key: numpy array}`; keys `"fsp/{pooling}/{a}/{b}"`,
            `"hint/{layer}"`, `"logits"` (see `keras_fsp.teacher_cache`).

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
        if not any(s.needs_teacher for s in stages):
            raise ValueError(
                f"Stage(s) {[s.name for s in stages]} do not use the teacher "
                "(no 'fsp', 'hint' or 'kd' term): there is nothing to cache. "
                "Pass the stage(s) the cache is for, e.g. stage='fsp'."
            )
        needs = self._teacher_needs(stages)
        return teacher_cache.compute(
            self._teacher_view(needs),
            lambda features: self._teacher_targets(features, needs),
            x, batch_size=batch_size, verbose=verbose,
        )

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
        names, with_logits = self._student_taps(self._stage)
        if not names:
            outputs[taps.LOGITS] = self.student(inputs, training=True)
        else:
            view = self._views.get(self.student, names, with_logits, "student")
            outputs.update(view(inputs, training=True))
        return outputs

    def _fsp_matrices(self, features, pairs, projections=None):
        matrices = []
        for a, b in pairs:
            fa, fb = features[a], features[b]
            if projections:
                fa = projections[a](fa) if a in projections else fa
                fb = projections[b](fb) if b in projections else fb
            matrices.append(fsp_matrix(fa, fb, pooling=self.fsp_pooling))
        return matrices

    def fsp_matrices(self, x):
        """The teacher's and the student's FSP matrices on `x` (inference).

        Returns:
            `(teacher, student)`: two lists of `(batch, m_i, n_i)` arrays.
        """
        t_names = list(dict.fromkeys(n for p in self.fsp_pairs for n in p))
        s_names = list(dict.fromkeys(n for p in self.student_fsp_pairs for n in p))
        t = self._views.get(self.teacher, t_names, False, "teacher")(x, training=False)
        s = self._views.get(self.student, s_names, False, "student")(x, training=False)
        return (
            [ops.convert_to_numpy(g) for g in self._fsp_matrices(t, self.fsp_pairs)],
            [
                ops.convert_to_numpy(g)
                for g in self._fsp_matrices(s, self.student_fsp_pairs, self.fsp_projections)
            ],
        )

    # ----------------------------------------------------------------- losses

    def _task_value(self, y, logits, sample_weight):
        per_example = self._task_loss.call(y, ops.cast(logits, "float32"))
        if sample_weight is not None:
            sw = ops.cast(ops.reshape(sample_weight, ops.shape(per_example)), "float32")
            per_example = per_example * sw
        return ops.mean(per_example)

    def _regularization(self):
        losses = [self._aggregate_additional_loss(l) for l in self.losses]
        return ops.sum(ops.stack(losses)) if losses else 0.0

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if y_pred is None:
            y_pred = self(x, training=training)
        if not isinstance(y_pred, dict):
            # Evaluation: the student's own loss.
            task = self._task_value(y, y_pred, sample_weight)
            return task / _num_replicas() + self._regularization()

        stage = self._stage
        x, cache = teacher_cache.split(x)
        x = y_pred.get(AUGMENTED_INPUTS, x)
        teacher = None
        if stage.needs_teacher:
            needs = self._teacher_needs([stage])
            if cache is None:
                features = self._teacher_view(needs)(x, training=False)
                teacher = self._teacher_targets(features, needs)
            else:  # the teacher does not run
                teacher = teacher_cache.select(
                    cache, self._teacher_keys(needs), stage.name
                )
        values = {}
        if "fsp" in stage.losses:
            index = self._pair_indices(stage)
            g_t = [
                teacher[teacher_cache.fsp_key(self.fsp_pairs[i], self.fsp_pooling)]
                for i in index
            ]
            g_s = self._fsp_matrices(
                y_pred,
                [self.student_fsp_pairs[i] for i in index],
                self.fsp_projections,
            )
            weights = self.fsp_loss.weights
            loss = self.fsp_loss if stage.fsp_pairs is None else FSPLoss(
                weights=None if weights is None else [weights[i] for i in index]
            )
            values["fsp"] = ops.mean(loss.call(g_t, g_s))
        if "hint" in stage.losses:
            guided = y_pred[self.guided_layer]
            if self.regressor is not None:
                guided = self.regressor(guided)
            hint = teacher[teacher_cache.hint_key(self.hint_layer)]
            values["hint"] = ops.mean(self.hint_loss.call(hint, guided))
        if "kd" in stage.losses:
            values["kd"] = ops.mean(
                self.kd_loss.call(
                    teacher[teacher_cache.LOGITS_KEY], y_pred[taps.LOGITS]
                )
            )
        if "task" in stage.losses:
            values["task"] = self._task_value(y, y_pred[taps.LOGITS], sample_weight)

        total = 0.0
        batch = ops.shape(x)[0]  # weight like Keras' own loss tracker
        for term, value in values.items():
            self._term_trackers[term].update_state(value, sample_weight=batch)
            total = total + self._term_weights[term] * value
        # Each replica averages over its share of the global batch; gradients
        # are summed over replicas, so divide by their number.
        total = total / _num_replicas()
        if stage.regularization:
            total = total + self._regularization()
        return total

    @property
    def non_trainable_variables(self):
        variables = super().non_trainable_variables
        stage = getattr(self, "_stage", None)
        if stage is None or (
            stage.needs_teacher and not getattr(self, "_teacher_cached", False)
        ):
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
            name: float(ops.convert_to_numpy(v))
            for name, v in self._initial_kernel_norms.items()
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
            if not self._student_taps(stage)[1]:
                # No logits in this stage (fsp, hint): nothing to score.
                hidden.add(id(self._compile_metrics))
        return [m for m in metrics if id(m) not in hidden]

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`; the student's own trainable flags are restored
        afterwards (stages freeze parts of it only while training).

        `x` may carry a teacher cache: `{"inputs": x, "teacher": cache}` with
        `cache = self.teacher_outputs(x)`; the teacher then does not run.

        Raises:
            ValueError: for a cache with an `augment` layer, a cache of
                another length than `x`, or one lacking what the stage needs
                (also when a `StageSchedule` switches to such a stage).
        """
        inputs, cache = teacher_cache.split(x)
        if cache is not None:
            teacher_cache.refuse_augment(self.augment)
            teacher_cache.check_lengths(inputs, cache)
            if self._stage.needs_teacher:
                needs = self._teacher_needs([self._stage])
                teacher_cache.select(cache, self._teacher_keys(needs), self._stage.name)
        self._apply_trainable(self._stage)
        self._in_fit = True
        self._teacher_cached = cache is not None
        try:
            return super().fit(x, y, *args, **kwargs)
        finally:
            self._in_fit = False
            self._teacher_cached = False
            self._restore_student_trainable()

    def _restore_student_trainable(self):
        for layer in self.student.layers:
            layer.trainable = self._student_trainable[layer.name]

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
            y_pred = y_pred.get(taps.LOGITS)
            if y_pred is None:  # fsp/hint stages: the head does not run
                logs = {m.name: m.result() for m in self.metrics}
        if logs is None:
            logs = super().compute_metrics(x, y, y_pred, sample_weight)
        if _multi_worker(getattr(self, "_distribute_strategy", None)):
            # With several workers Keras reduces each step's logs with
            # `strategy.reduce("MEAN", v, axis=0)`, which fails on scalars
            # ("Invalid reduction dimension 0"): give them one axis, which
            # the reduction removes (tensorflow/tensorflow#72388).
            logs = {k: ops.reshape(v, (1,)) for k, v in logs.items()}
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (TensorFlow trainer) builds from the first distributed batch
        # with `strategy.reduce("MEAN", (x, y), axis=None)`, which fails on
        # per-replica values with several workers (keras-team/keras#20585):
        # build from this worker's first replica's share (shapes only).
        strategy = getattr(self, "_distribute_strategy", None)
        if iterator is not None and _multi_worker(strategy):
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0], next(it)
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # ---------------------------------------------------------- serialization

    def get_config(self):
        builtin = builtin_stages(self._config["kd_weight"])
        custom = {
            name: stage.get_config()
            for name, stage in self.stages.items()
            if builtin.get(name) != stage  # user stages, overrides included
        }
        return {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            **self._config,
            "augment": None
            if self.augment is None
            else keras.saving.serialize_keras_object(self.augment),
            "stages": custom,
            "stage": self._stage.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        if config.get("augment") is not None:
            config["augment"] = keras.saving.deserialize_keras_object(config["augment"])
        config["stages"] = {
            n: Stage.from_config(c) for n, c in config.get("stages", {}).items()
        }
        return cls(**config)
