"""Draft tree settings: EAGLE-2 dynamic trees, EAGLE-1 static trees from a choices list, and chains.

The trees themselves are drafted by :mod:`.tree_build`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidRequestError

# EAGLE-1's default static tree (SafeAILab/EAGLE v1 model/choices.py): 25 nodes + root, depth 5.
MC_SIM_7B_63 = (
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)  # fmt: skip

MAX_TREE_DEPTH = 128


def config_int(value, what: str) -> int:
    """``value`` as an int (NumPy integers too); bools, floats and strings are errors naming ``what``."""
    import operator

    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise InvalidRequestError(f"{what} must be an integer, got {value!r}") from None


def settings_from_dict(cls, d, what: str):
    """A frozen settings dataclass ``cls`` from a mapping (JSON, the CLI, a request); unknown keys are
    :class:`InvalidRequestError` naming the known ones."""
    from collections.abc import Mapping
    from dataclasses import fields

    if not isinstance(d, Mapping):
        raise InvalidRequestError(f"{what} settings must be a dict of fields, got {type(d).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in known]
    if unknown:
        raise InvalidRequestError(
            f"unknown {what} field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )
    return cls(**d)


@dataclass(frozen=True)
class TreeConfig:
    """How a round drafts.

    ``kind="dynamic"`` (EAGLE-2): ``total_tokens`` nodes including the root (``"auto"``: the size, depth and
    top-k that maximise tokens/s on the engine's device, measured once), chosen by cumulative draft
    log-probability among the candidates of ``depth`` expansion steps of a ``top_k`` beam; as in the official
    code, paths hold up to ``depth + 1`` draft tokens. ``kind="static"`` (EAGLE-1): the fixed tree of
    ``choices`` (paths of child ranks, default ``mc_sim_7b_63``). ``kind="chain"``: one path of ``depth + 1``
    tokens (a dynamic tree with ``top_k = 1``).

    Bounds, checked before anything is allocated: ``top_k`` (and static child ranks + 1) ``<= MAX_TOP_K``
    (64; the Triton LM-head top-k kernel serves k <= 16, larger k takes the torch path); nodes per round,
    root included, ``<= MAX_TOKENS`` (1024: the tree mask and both KV caches reserve that many rows per
    sequence); ``depth < MAX_TREE_DEPTH``. Integer fields accept NumPy integers and reject bools and floats.
    Errors are :class:`InvalidRequestError` naming the field; :meth:`from_dict` also names unknown keys.
    """

    MAX_TOP_K = 64  # plain class attributes, not fields
    MAX_TOKENS = 1024

    kind: str = "dynamic"
    total_tokens: int = 60
    depth: int = 6
    top_k: int = 10
    choices: tuple[tuple[int, ...], ...] = field(default=MC_SIM_7B_63)

    @classmethod
    def from_dict(cls, d) -> "TreeConfig":
        """A tree from a dict of fields (JSON, the CLI, a server request); unknown keys are errors."""
        return settings_from_dict(cls, d, "tree")

    def __post_init__(self):
        if not isinstance(self.kind, str) or self.kind not in ("dynamic", "static", "chain"):
            raise InvalidRequestError(f"tree kind must be dynamic, static or chain, got {self.kind!r}")
        if self.is_auto:
            if self.kind != "dynamic":
                raise InvalidRequestError(f"total_tokens='auto' sizes a dynamic tree, not a {self.kind} one")
            return  # the engine measures and replaces it (see speculative/auto_tree.py)
        for name in ("total_tokens", "depth", "top_k"):
            object.__setattr__(self, name, self._int(getattr(self, name), f"tree {name}"))
        self._check_choices()  # every field is type-checked, whatever the kind
        if self.kind == "static":
            return
        if not 0 <= self.depth < MAX_TREE_DEPTH:
            raise InvalidRequestError(f"tree depth must be in [0, {MAX_TREE_DEPTH}), got {self.depth}")
        if self.kind == "chain":
            object.__setattr__(self, "top_k", 1)
            object.__setattr__(self, "total_tokens", self.depth + 2)
        if not 1 <= self.top_k <= self.MAX_TOP_K:
            raise InvalidRequestError(f"tree top_k must be in [1, {self.MAX_TOP_K}], got {self.top_k}")
        most = min(1 + self.top_k + self.depth * self.top_k**2, self.MAX_TOKENS)
        if not 2 <= self.total_tokens <= most:
            raise InvalidRequestError(
                f"tree total_tokens must be in [2, {most}] for depth {self.depth} and top_k "
                f"{self.top_k} (never above {self.MAX_TOKENS}), got {self.total_tokens}"
            )

    _int = staticmethod(config_int)

    def _check_choices(self):
        import reprlib
        from collections.abc import Sequence

        choices = self.choices
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not choices:
            raise InvalidRequestError(
                f"static tree choices must be a non-empty sequence of paths, got {reprlib.repr(choices)}"
            )
        if len(choices) + 1 > self.MAX_TOKENS:
            raise InvalidRequestError(
                f"static tree choices hold {len(choices)} paths; a tree has at most {self.MAX_TOKENS} nodes "
                "including the root"
            )
        rule = (
            f"each path in static tree choices must be a non-empty sequence of child ranks (integers in "
            f"[0, {self.MAX_TOP_K})) shorter than {MAX_TREE_DEPTH}"
        )
        paths = []
        for path in choices:
            ok = not isinstance(path, (str, bytes)) and isinstance(path, Sequence)
            ok = ok and 0 < len(path) < MAX_TREE_DEPTH
            try:
                ranks = tuple(self._int(rank, "choices") for rank in path) if ok else ()
            except InvalidRequestError:
                ranks = ()
            if not ranks or not all(0 <= rank < self.MAX_TOP_K for rank in ranks):
                raise InvalidRequestError(f"{rule}, got {reprlib.repr(path)}")
            paths.append(ranks)
        unique = set(paths)
        if len(unique) != len(paths):
            raise InvalidRequestError("static tree choices must be distinct paths")
        for path in paths:
            if len(path) > 1 and path[:-1] not in unique:
                raise InvalidRequestError(f"static tree path {list(path)} lacks its parent {list(path[:-1])}")
        object.__setattr__(self, "choices", tuple(paths))

    @property
    def is_auto(self) -> bool:
        """``total_tokens="auto"``: sized to the device by
        :func:`eagle_engine.speculative.auto_tree.auto_tree`."""
        return isinstance(self.total_tokens, str) and self.total_tokens == "auto"

    @property
    def num_nodes(self) -> int:
        """Tree size including the root (the number of rows the target verifies)."""
        return len(self.choices) + 1 if self.kind == "static" else self.total_tokens

    @property
    def max_depth(self) -> int:
        """Longest root-to-leaf path in draft tokens."""
        return max(len(c) for c in self.choices) if self.kind == "static" else self.depth + 1

    @property
    def draft_rows(self) -> int:
        """Draft-cache rows one round's expansion writes."""
        if self.kind == "static":
            return sum(
                1 for c in self.choices if any(len(d) == len(c) + 1 and d[:-1] == c for d in self.choices)
            )
        return self.depth * self.top_k
