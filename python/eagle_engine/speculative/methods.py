"""The speculative methods one engine runs, their settings objects, and the drafter each one builds.

========================  ===========================  ======================================================
method                    needs                        settings
========================  ===========================  ======================================================
``"eagle"``               an EAGLE-1/2/3 head          :class:`~.tree.TreeConfig` (``tree=``)
``"medusa"``              Medusa-1 heads               :class:`MedusaConfig` (``medusa=``)
``"lookahead"``           nothing                      :class:`LookaheadConfig` (``lookahead=``)
``"prompt_lookup"``       nothing                      :class:`PromptLookupConfig` (``prompt_lookup=``)
========================  ===========================  ======================================================

Every method is verified by the same exact tree verification, so greedy output equals the target's own and
sampled output has the target's distribution, whatever the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EagleError, InvalidRequestError
from .tree import TreeConfig, config_int, settings_from_dict

METHODS = ("eagle", "medusa", "lookahead", "prompt_lookup")
# The from_pretrained keyword each method's settings come in.
SETTINGS_KEYWORD = {
    "eagle": "tree", "medusa": "medusa", "lookahead": "lookahead", "prompt_lookup": "prompt_lookup",
}

# Medusa's default tree (FasterDecoding/Medusa medusa_choices.py, mc_sim_7b_63): 63 paths + root, depth 4;
# element i of a path is a rank in Medusa head i's top-k.
MEDUSA_MC_SIM_7B_63 = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,),
    (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0),
    (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0),
    (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1),
    (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)  # fmt: skip


def _in_range(name: str, value, low: int, high: int) -> int:
    value = config_int(value, name)
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be in [{low}, {high}], got {value}")
    return value


@dataclass(frozen=True)
class MedusaConfig:
    """Medusa's static tree: ``choices`` are paths of ranks, element ``i`` a rank in head ``i``'s top-k
    (default: Medusa's ``mc_sim_7b_63``, cut to the heads' number when it is smaller)."""

    choices: tuple[tuple[int, ...], ...] = field(default=MEDUSA_MC_SIM_7B_63)

    @classmethod
    def from_dict(cls, d) -> "MedusaConfig":
        return settings_from_dict(cls, d, "medusa")

    def __post_init__(self):
        # The same path rules as an EAGLE static tree (distinct, parents present, ranks < 64).
        object.__setattr__(self, "choices", TreeConfig(kind="static", choices=self.choices).choices)

    def tree(self, num_heads: int) -> TreeConfig:
        """The static tree over ``num_heads`` heads: paths longer than that are dropped."""
        paths = tuple(c for c in self.choices if len(c) <= num_heads)
        if not paths:
            raise InvalidRequestError(f"no medusa choice fits {num_heads} head(s)")
        return TreeConfig(kind="static", choices=paths)


@dataclass(frozen=True)
class LookaheadConfig:
    """Lookahead decoding (Fu et al., 2024): a Jacobi ``window`` of W positions over ``ngram - 1`` levels
    fills an n-gram pool; up to ``guesses`` (G) pooled n-grams starting with the last token are verified
    each round. Defaults: the lookahead-decoding README's example (``LEVEL=5, WINDOW_SIZE=7,
    GUESS_SET_SIZE=7``): ``window=7, ngram=5, guesses=7``."""

    window: int = 7
    ngram: int = 5
    guesses: int = 7
    pool_buckets: int = 4096  # n-gram pool hash buckets per sequence (entries keep their first token)

    @classmethod
    def from_dict(cls, d) -> "LookaheadConfig":
        return settings_from_dict(cls, d, "lookahead")

    def __post_init__(self):
        object.__setattr__(self, "window", _in_range("lookahead window", self.window, 1, 64))
        object.__setattr__(self, "ngram", _in_range("lookahead ngram", self.ngram, 2, 16))
        object.__setattr__(self, "guesses", _in_range("lookahead guesses", self.guesses, 1, 64))
        buckets = _in_range("lookahead pool_buckets", self.pool_buckets, 1, 1 << 20)
        object.__setattr__(self, "pool_buckets", buckets)


@dataclass(frozen=True)
class PromptLookupConfig:
    """Prompt-lookup decoding: the ``num_tokens`` tokens that followed the latest earlier occurrence of the
    context's last n-gram (the longest ``n`` from ``max_ngram`` down to ``min_ngram`` that occurs) are the
    candidates. Defaults as transformers' ``prompt_lookup_num_tokens=10``, ``max_matching_ngram_size=2``."""

    num_tokens: int = 10
    max_ngram: int = 2
    min_ngram: int = 1

    @classmethod
    def from_dict(cls, d) -> "PromptLookupConfig":
        return settings_from_dict(cls, d, "prompt_lookup")

    def __post_init__(self):
        tokens = _in_range("prompt_lookup num_tokens", self.num_tokens, 1, 128)
        object.__setattr__(self, "num_tokens", tokens)
        object.__setattr__(self, "max_ngram", _in_range("prompt_lookup max_ngram", self.max_ngram, 1, 16))
        object.__setattr__(self, "min_ngram", _in_range("prompt_lookup min_ngram", self.min_ngram, 1, 16))
        if self.min_ngram > self.max_ngram:
            raise InvalidRequestError(
                f"prompt_lookup min_ngram ({self.min_ngram}) must not exceed max_ngram ({self.max_ngram})"
            )


SETTINGS = {"medusa": MedusaConfig, "lookahead": LookaheadConfig, "prompt_lookup": PromptLookupConfig}


def resolve_settings(method: str, value):
    """``None`` -> the method's defaults; a dict of fields; or the settings object itself."""
    cls = SETTINGS[method]
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value)
    raise EagleError(f"{method} settings must be a {cls.__name__} or a dict, got {type(value).__name__}")


def head_method(draft) -> str | None:
    """The method a loaded head drives: ``"medusa"`` for Medusa heads, ``"eagle"`` for EAGLE heads."""
    if draft is None:
        return None
    return "medusa" if getattr(draft, "kind", "") == "medusa" else "eagle"


def resolve_method(method: str | None, draft, given: dict) -> str | None:
    """The engine's method from the explicit ``method``, the loaded ``draft`` and which settings were
    ``given`` (``{"tree": ..., "medusa": ..., ...}``, None where absent). ``None``: vanilla only."""
    if method is not None and method not in METHODS:
        raise EagleError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    from_head = head_method(draft)
    if method is None:
        named = [m for m in ("lookahead", "prompt_lookup") if given.get(m) is not None]
        if from_head is not None and named:
            raise EagleError(f"{named[0]} settings given with a draft head: pick one method")
        if len(named) > 1:
            raise EagleError("lookahead and prompt_lookup settings given: pick one method")
        method = from_head or (named[0] if named else None)
    if method in ("eagle", "medusa") and from_head != method:
        what = "an EAGLE head" if method == "eagle" else "Medusa heads"
        found = {None: "no draft", "medusa": "Medusa heads", "eagle": "an EAGLE head"}[from_head]
        raise EagleError(f"method {method!r} needs {what} (draft_path); got {found}")
    if method in ("lookahead", "prompt_lookup") and draft is not None:
        raise EagleError(f"method {method!r} needs no draft head; do not pass draft_path")
    for m, key in SETTINGS_KEYWORD.items():
        if method is not None and m != method and given.get(key) is not None:
            raise EagleError(f"{key} settings are for method {m!r}, but the method is {method!r}")
    return method


def make_drafter(method: str, target, draft, settings):
    """The :class:`~.drafter.Drafter` of ``method`` over ``target`` (and its ``draft`` head)."""
    n_layers = target.config.num_hidden_layers
    if method == "eagle":
        from .eagle import EagleDrafter

        return EagleDrafter(draft, settings, n_layers)
    if method == "medusa":
        from .medusa import MedusaDrafter

        return MedusaDrafter(draft, settings)
    if method == "lookahead":
        from .lookahead import LookaheadDrafter

        return LookaheadDrafter(settings)
    if method == "prompt_lookup":
        from .prompt_lookup import PromptLookupDrafter

        return PromptLookupDrafter(settings)
    raise EagleError(f"unknown method {method!r}")
