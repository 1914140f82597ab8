"""Teacher caching: the teacher's targets computed once, reused every epoch.

When the training inputs are fixed (no random augmentation), the teacher's
contribution to a stage's loss is the same at every epoch: the FSP matrices
of the active pairs, the hint map, the logits. The FSP paper (Yim et al.
2017) stored the teacher's FSP matrices instead of recomputing them and
measured a 2.18x faster stage. `FSPDistiller.teacher_outputs(x)`
(`teacher_outputs` here) computes
these targets once (inference mode, in batches) and returns them as numpy
arrays, one row per example; `fit` takes them next to the inputs:

```python
cache = distiller.teacher_outputs(x, batch_size=256)
distiller.fit({"inputs": x, "teacher": cache}, y, epochs=20)
```

Keras slices and shuffles the arrays of a dict input together, so each
example keeps its own targets. In a step with a cache the teacher does not
run at all.

Cache keys say what each array is; they come from the terms
(`DistillationTerm.teacher_targets`), so a cache made for another stage,
other pairs or another FSP pooling is refused rather than silently misused:

- `"/fsp/{pooling}/{first}/{second}"`: the teacher's FSP matrix of the pair
  `(first, second)`, float32 `(examples, channels_first, channels_second)`;
- `"{layer}"`: the teacher's raw map of `layer` (the FitNets hint), keyed
  as the term taps it;
- `"/attention/{p}/{layer}"`: the normalised attention map of `layer`;
- `"/logits"` (`keras_fsp.terms.LOGITS`): the teacher's logits `(examples, classes)`, before any
  temperature, so one cache serves every temperature.

The keys and shapes are checked; the example order and the teacher's weights
cannot be: make the cache from exactly the `x` given to `fit`, with the
teacher it trains against, and let `fit` do the shuffling.

Backend-agnostic: nothing here imports TensorFlow.
"""

import keras
import numpy as np

from keras_fsp import compat

# Keys of a cached batch: `{INPUTS: x, TEACHER: cache}`.
INPUTS = "inputs"
TEACHER = "teacher"


def split(x):
    """Splits a batch into `(inputs, cache)`; `cache` is None if not cached.

    Args:
        x: the inputs, or a dict `{"inputs": inputs, "teacher": cache}`.

    Returns:
        `(inputs, cache)`.

    Raises:
        ValueError: if a dict has the `"teacher"` key next to keys other than
            `"inputs"`, or a cache that is not a dict.
    """
    if not isinstance(x, dict) or TEACHER not in x:
        return x, None
    if set(x) != {INPUTS, TEACHER}:
        raise ValueError(
            f"A batch with a teacher cache is the dict {{{INPUTS!r}: x, "
            f"{TEACHER!r}: cache}}; got the keys {sorted(x)}. Put the "
            f"model's inputs under {INPUTS!r}."
        )
    cache = x[TEACHER]
    if not isinstance(cache, dict):
        raise ValueError(
            f"x[{TEACHER!r}] must be the dict returned by "
            f"FSPDistiller.teacher_outputs; got {type(cache).__name__}."
        )
    return x[INPUTS], cache


def refuse_augment(augment):
    """Raises if the distiller augments its batches (the cache would be wrong).

    Raises:
        ValueError: if `augment` is not None.
    """
    if augment is not None:
        raise ValueError(
            "Teacher caching needs fixed inputs, but this distiller augments "
            f"every batch (augment={type(augment).__name__}): the teacher must "
            "see the augmented batch, which changes at each step. Create the "
            "distiller with augment=None to train from a cache (augment the "
            "data before caching, if at all), or fit without the cache."
        )


def select(cache, expected, stage_name):
    """The cache entries a stage needs, checked against their expected shapes.

    Works on numpy arrays and on (symbolic) backend tensors alike: only the
    static shape is read (dimensions unknown when tracing are not checked).

    Args:
        cache: dict of cached arrays or tensors (batch first).
        expected: `{key: shape without the batch axis}` of what the stage
            needs.
        stage_name: the stage, for the error messages.

    Returns:
        `{key: cache[key]}` for every key of `expected`.

    Raises:
        ValueError: naming the missing keys, or the key whose shape differs.
    """
    missing = [k for k in expected if k not in cache]
    if missing:
        raise ValueError(
            f"The teacher cache has no {missing} that stage {stage_name!r} "
            f"needs; it holds {sorted(cache)}. It was made for another "
            "stage, other FSP pairs or another FSP pooling: make it with "
            f"distiller.teacher_outputs(x, stage={stage_name!r}), or with "
            "stage=[...] listing every stage you train from it."
        )
    for key, shape in expected.items():
        got = tuple(cache[key].shape)[1:]
        # A dimension unknown at trace time (None) cannot be checked.
        if len(got) != len(shape) or any(
            g is not None and s is not None and g != s for g, s in zip(got, shape)
        ):
            raise ValueError(
                f"The teacher cache entry {key!r} has per-example shape {got}; "
                f"this distiller's teacher gives {tuple(shape)}. The cache "
                "comes from another teacher: remake it with this distiller's "
                "teacher_outputs."
            )
    return {k: cache[k] for k in expected}


def check_lengths(inputs, cache):
    """Raises unless `inputs` and every cached array hold as many examples.

    Only arrays with a known length are compared (not datasets).

    Raises:
        ValueError: naming the lengths that differ.
    """
    def length(a):
        shape = getattr(a, "shape", None)
        return None if not shape else shape[0]

    lengths = {k: length(v) for k, v in cache.items()}
    firsts = [length(a) for a in keras.tree.flatten(inputs)]
    n = next((l for l in firsts if l is not None), None)
    wrong = {k: l for k, l in lengths.items() if l is not None and l != n}
    if n is not None and wrong:
        raise ValueError(
            f"The teacher cache does not match the inputs: x has {n} examples "
            f"but the cache's {sorted(wrong)} hold {sorted(set(wrong.values()))}."
            " Make the cache with distiller.teacher_outputs(x) from the same "
            "x, in the same order, and shuffle only through fit."
        )


class _TargetModel(keras.Model):
    """The teacher's target computation as a model, so that `predict`
    batches and compiles it on any backend."""

    def __init__(self, targets):
        super().__init__(name="teacher_cache")
        self._targets = targets
        # Hand `x` to the teacher as given, as the training step does (no
        # cast to this wrapper's dtype policy).
        compat.pass_inputs_unconverted(self)
        self.built = True

    def call(self, x):
        return self._targets(x)


def target_shapes(terms, teacher):
    """`{key: per-example shape}` of what `terms` need from `teacher`."""
    shapes = {}
    for term in terms:
        shapes.update(term.target_shapes(teacher))
    return shapes


def check_fit(distiller, inputs, cache):
    """The checks of a cached `fit` before any training: fixed inputs, as
    many cached rows as examples, and what the active stage needs."""
    refuse_augment(distiller.augment)
    check_lengths(inputs, cache)
    users = [t for t in distiller.active_terms() if t.uses_teacher]
    if users:
        select(cache, target_shapes(users, distiller.teacher), distiller.stage.name)


def teacher_outputs(distiller, x, batch_size=None, stages=None, verbose=0):
    """The teacher's targets for the terms of `stages` (default the active
    one) on `x`, computed once in batches (see `FSPDistiller.teacher_outputs`).

    Returns:
        `{cache key: numpy array}`, one row per example; FSP matrices in
        float32.
    """
    refuse_augment(distiller.augment)
    stages = distiller.check_stages(stages or [distiller.stage])
    terms = list({id(t): t for s in stages for t in distiller.active_terms(s)}.values())
    if not any(t.uses_teacher for t in terms):
        raise ValueError(
            f"Stage(s) {[s.name for s in stages]} do not use the teacher: there is nothing "
            "to cache. Pass the stage(s) the cache is for, e.g. stage='fsp'."
        )
    model = _TargetModel(lambda v: distiller.teacher_targets(terms, v))
    out = model.predict(x, batch_size=batch_size, verbose=verbose)
    return {
        k: np.asarray(v, "float32") if k.startswith("/fsp/") else np.asarray(v)
        for k, v in out.items()
    }
