"""The method table: every distillation method by name, with its recipe and
the label of its row in a results table. The command line (`keras-fsp
distill --method NAME`, and `--help`), `keras-fsp reproduce --methods`, the
README's list of methods and the tests all read it.

A new method is one module: its term (`keras_fsp.terms.register_term`), a
recipe, and a line here:

```python
from keras_fsp.papers import methods, recipes

def logit_mse(teacher, student, steps_per_epoch, augment=None, scale=1.0):
    return recipes.single_stage(teacher, student, steps_per_epoch,
                                {"logit_mse": 1.0, "task": 1.0}, "logit_mse",
                                augment=augment, scale=scale)

methods.register_method("logit-mse", logit_mse, "logit MSE + labels")
```

and `keras-fsp --plugins my_method.py distill --method logit-mse` runs it.
"""

import dataclasses
from typing import Callable, Tuple

from keras_fsp.papers import recipes


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the table.

    Attributes:
        name: its name (`--method`, a results table's row key).
        recipe: `recipe(teacher, student, steps_per_epoch, augment=...,
            scale=..., **options)` -> `keras_fsp.papers.recipes.Recipe`
            (`teacher` is None for a method without one).
        label: its row label in a results table.
        uses_teacher: False for a method that trains the student alone.
        options: the recipe's keyword arguments the command line may set
            (`"temperature"`: `--temperature`).
    """

    name: str
    recipe: Callable
    label: str
    uses_teacher: bool = True
    options: Tuple[str, ...] = ()

    def settings(self):
        """`{name: default}` of what `--method_options` may set: the keyword
        arguments of the recipe (`keras_fsp.papers.recipes.settings`)."""
        return recipes.settings(self.recipe)

    def parse_settings(self, items):
        """`items` ("NAME=VALUE" strings) as the recipe's keyword arguments,
        each VALUE read as its default's type.

        Raises:
            ValueError: naming the item and the settings the method has.
        """
        known, out = self.settings(), {}
        for item in items:
            name, equals, text = (part.strip() for part in item.partition("="))
            if not equals or not name or not text:
                raise ValueError(f"{item!r}: give NAME=VALUE, e.g. {_example(known)}.")
            if name not in known:
                listed = ", ".join(f"{k}={v}" for k, v in known.items()) or "none"
                raise ValueError(f"{self.name} has no setting {name!r}; its settings (with "
                                 f"their defaults): {listed}.")
            if name in out:
                raise ValueError(f"{name} is given twice.")
            out[name] = _read(name, text, known[name])
        return out

    def build(self, teacher, student, steps_per_epoch, **kwargs):
        """The method's recipe for these networks, named after the method."""
        recipe = self.recipe(teacher, student, steps_per_epoch, **kwargs)
        recipe.name = self.name
        return recipe


def _example(known):
    name, default = next(iter(known.items()), ("beta", 1.0))
    return f"{name}={default}"


def _read(name, text, default):
    """`text` as a value of the type of `default`."""
    kind = type(default)
    if name.endswith("clipnorm") and text.lower() == "none":  # a clip norm of none: unclipped
        return None
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
    elif default is None:  # any number, None or a string
        if text.lower() == "none":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    elif kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            pass
    wanted = {bool: "true or false", int: "a whole number"}.get(kind, "a number")
    raise ValueError(f"{name}={text}: give {wanted} (its default is {default}).")


def split_variant(text):
    """`"dkd:beta=1:warmup_epochs=5"` -> `("dkd", ["beta=1", "warmup_epochs=5"])`:
    a method with settings, as `keras-fsp reproduce --methods` names one."""
    name, *items = text.split(":")
    return name, items


METHODS = {}


def register_method(name, recipe, label, uses_teacher=True, options=()):
    """Adds a method to the table (a plugin's too); returns its `Method`.

    Raises:
        ValueError: for a name that another recipe already has.
    """
    method = Method(name, recipe, label, uses_teacher, tuple(options))
    known = METHODS.get(name)
    if known is not None and known.recipe.__qualname__ != recipe.__qualname__:
        raise ValueError(f"A method is already registered as {name!r}; choose another name.")
    METHODS[name] = method
    return method


def get(name):
    """The `Method` called `name`.

    Raises:
        ValueError: naming the methods when there is no such one.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


@recipes.passes_on(recipes.student_alone)
def _student_alone(teacher, student, steps_per_epoch, **kwargs):
    return recipes.student_alone(student, steps_per_epoch, **kwargs)


# The papers' methods and their combinations, in the order of the tables.
register_method("none", _student_alone, "student alone", uses_teacher=False)
register_method("kd", recipes.hinton_kd, "KD (T = 4, 0.9 soft + 0.1 hard)", options=("temperature",))
register_method("fitnet", recipes.fitnets, "FitNets (hint, then KD with lambda 4 -> 1)",
                options=("temperature",))
register_method("fsp", recipes.fsp_paper, "FSP (stage 1 clipped, kernel norms restored)")
register_method("dense-fsp", recipes.dense_fsp, "dense sequential FSP (kernel norms restored)")
register_method("at", recipes.attention_transfer, "attention transfer (beta 1000)")
register_method("dkd", recipes.decoupled_kd, "decoupled KD (alpha 1, beta 8, T 4)",
                options=("temperature",))
register_method("fsp-kd", recipes.fsp_kd, "FSP stage 1, then KD", options=("temperature",))
register_method("dense-fsp-kd", recipes.dense_fsp_kd, "dense FSP stage 1, then KD",
                options=("temperature",))
register_method("at-kd", recipes.attention_kd, "attention transfer + KD", options=("temperature",))
register_method("ls-kd", recipes.standardized_kd, "KD on standardised logits (T 2, 9 KD + 0.1 labels)",
                options=("temperature",))
register_method("dist", recipes.dist, "DIST (T 4, beta = gamma = 2)", options=("temperature",))
register_method("rkd", recipes.rkd, "RKD (distance 25, angle 50) + labels")
register_method("pkt", recipes.pkt, "PKT (beta 30000) + labels")
register_method("sp", recipes.similarity_preserving, "similarity-preserving KD (beta 3000) + labels")
register_method("rkd-kd", recipes.rkd_kd, "RKD + KD (T 4, labels 1, KD 1)", options=("temperature",))
register_method("pkt-kd", recipes.pkt_kd, "PKT + KD (T 4, labels 1, KD 1)", options=("temperature",))
register_method("sp-kd", recipes.similarity_preserving_kd, "SP + KD (T 4, labels 1, KD 1)",
                options=("temperature",))
register_method("crd", recipes.crd, "CRD (beta 0.8, 16384 queued negatives, T 0.07) + labels")
register_method("crd-kd", recipes.crd_kd, "CRD + KD (T 4, labels 1, KD 1, CRD beta 0.8)",
                options=("temperature",))
register_method("function-matching", recipes.function_matching,
                "function matching (mixup, KD at T 1 without labels)",
                options=("temperature",))
register_method("reviewkd", recipes.review_kd,
                "ReviewKD (ABF fusion, HCL weight 1, 20-epoch warm-up) + labels")
register_method("reviewkd-kd", recipes.review_kd_with_kd,
                "ReviewKD + KD (T 4, labels 1, KD 1, HCL weight 1)", options=("temperature",))
