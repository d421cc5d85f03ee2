"""Edit generator: (source scene, instruction, target scene) triplets with exact supervision.

Every sample is a pure function of (split, seed, index), so datasets are reproducible, randomly accessible (a grain
data source can generate sample i on demand) and splits never overlap. The `test` split holds out the
(color, kind) compositions in `spec.HELD_OUT_COMPOSITIONS`: train and val never contain them, every test sample does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from editing_jax.data.world import render, spec

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Where a count edit's target puts the copies it adds and which ones it removes (WorldConfig.count_placement).
COUNT_PLACEMENTS: tuple[str, ...] = ("random", "reading_order")
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Options of the world generator."""

    size: int = 64
    min_objects: int = 1
    max_objects: int = spec.MAX_OBJECTS
    edit_types: tuple[str, ...] = spec.EDIT_TYPES
    held_out: tuple[tuple[str, str], ...] = spec.HELD_OUT_COMPOSITIONS
    # 'random': a count edit's new copies go to random free cells and random members are removed (the verifier accepts
    # any cells). 'reading_order': new copies fill the free cells in `spec.CELLS` order and the last members in that
    # order are removed, so the target is a function of the source and the instruction, which a deterministic decoder
    # can learn; every other sample, and every count edit's source and instruction, stay the same.
    count_placement: str = "random"
    # Object counts of source scenes, drawn uniformly from this tuple (repeat a count to draw it more often); () draws
    # uniformly from [min_objects, max_objects]. Adds draw only counts below MAX_OBJECTS (their target needs a free
    # cell). The split's rejection step still acts, so the realized mix differs (data.object_counts in configs).
    object_counts: tuple[int, ...] = ()

    def __post_init__(self):
        unknown = set(self.edit_types) - set(spec.EDIT_TYPES)
        if unknown or not self.edit_types:
            raise ValueError(f"edit_types must be a non-empty subset of {spec.EDIT_TYPES}, got {self.edit_types}")
        if not 1 <= self.min_objects <= self.max_objects <= spec.MAX_OBJECTS:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {spec.MAX_OBJECTS}")
        if self.size < 24:
            raise ValueError(f"size must be at least 24 pixels, got {self.size}")
        if any(not self.min_objects <= n <= self.max_objects for n in self.object_counts):
            raise ValueError(
                f"object_counts must lie in [{self.min_objects}, {self.max_objects}], got {self.object_counts}"
            )
        if self.count_placement not in COUNT_PLACEMENTS:
            raise ValueError(f"count_placement must be one of {COUNT_PLACEMENTS}, got {self.count_placement!r}")

    @classmethod
    def from_config(cls, config) -> WorldConfig:
        """Builds a WorldConfig from a `configs/world` ConfigDict (fields: size)."""
        return cls(size=int(config.size))


@dataclasses.dataclass(frozen=True)
class Edit:
    """An edit in scene-graph space, before rendering."""

    edit_type: str
    source: spec.Scene
    target: spec.Scene
    instruction: str
    keyword: str  # Referring phrase inside the instruction ('red circle', 'background'; '' for identity).
    object_name: str  # Name of the edited object, e.g. 'red circle' ('' when no object is edited).
    edited_source: tuple[spec.SceneObject, ...] = ()  # Edited objects as they are in the source.
    edited_target: tuple[spec.SceneObject, ...] = ()  # Edited objects as they are in the target.


@dataclasses.dataclass(frozen=True)
class EditSample:
    """A rendered edit with all supervision signals."""

    source_image: np.ndarray  # uint8 [S, S, 3]
    target_image: np.ndarray  # uint8 [S, S, 3]
    edit_mask: np.ndarray  # bool [S, S]: pixels that differ between source and target
    object_mask: np.ndarray  # bool [S, S]: edited object(s), source and target positions; background for bg edits
    keyword_span: tuple[int, int]  # [start, end) character span of `keyword` in `instruction`
    edit: Edit

    @property
    def instruction(self) -> str:
        return self.edit.instruction

    def to_example(self) -> dict:
        """Flat dict of NumPy arrays and strings (the tfds / grain record format)."""
        edit = self.edit
        return {
            "source_image": self.source_image,
            "target_image": self.target_image,
            "edit_mask": self.edit_mask.astype(np.uint8),
            "object_mask": self.object_mask.astype(np.uint8),
            "instruction": edit.instruction,
            "source_caption": edit.source.caption(),
            "target_caption": edit.target.caption(),
            "edit_type": edit.edit_type,
            "keyword": edit.keyword,
            "keyword_span": np.asarray(self.keyword_span, np.int32),
            "object_name": edit.object_name,
            "source_scene": edit.source.to_json(),
            "target_scene": edit.target.to_json(),
        }


# Instruction templates. {obj} is the referring name ('red circle'); it is the keyword span.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "make the {obj} {new}",
        "change the color of the {obj} to {new}",
        "recolor the {obj} {new}",
        "turn the {obj} {new}",
        "paint the {obj} {new}",
    ),
    "replace": (
        "replace the {obj} with a {new}",
        "turn the {obj} into a {new}",
        "change the {obj} into a {new}",
        "swap the {obj} for a {new}",
    ),
    "add": (
        "add a {new} {where}",
        "put a {new} {where}",
        "place a {new} {where}",
        "draw a {new} {where}",
    ),
    "remove": ("remove the {obj}", "delete the {obj}", "get rid of the {obj}", "erase the {obj}"),
    "move": (
        "move the {obj} {to}",
        "put the {obj} {to} instead",
        "shift the {obj} {to}",
        "relocate the {obj} {to}",
    ),
    "resize_up": (
        "make the {obj} bigger",
        "enlarge the {obj}",
        "make the {obj} larger",
        "scale up the {obj}",
    ),
    "resize_down": (
        "make the {obj} smaller",
        "shrink the {obj}",
        "make the {obj} tiny",
        "scale down the {obj}",
    ),
    "count": (
        "make there be {number} {obj}s",
        "change the number of {obj}s to {number}",
        "there should be exactly {number} {obj}s",
        "make it {number} {obj}s",
    ),
    "count_one": (
        "make there be one {obj}",
        "change the number of {obj}s to one",
        "there should be exactly one {obj}",
        "keep only one {obj}",
    ),
    "background": (
        "change the {obj} to {new}",
        "make the {obj} {new}",
        "use a {new} {obj}",
        "replace the {obj} with a {new} one",
    ),
    "outline": (
        "make the {obj} hollow",
        "turn the {obj} into an outline",
        "make the {obj} outlined",
        "draw only the outline of the {obj}",
    ),
    "fill": (
        "fill in the {obj}",
        "make the {obj} solid",
        "make the {obj} filled",
        "color in the {obj}",
    ),
    "identity": (
        "do nothing",
        "keep the image as it is",
        "leave everything unchanged",
        "make no changes",
    ),
}
# Destination phrases for move ('to the top left').
_TO_PHRASES = {cell: "to the " + phrase.split(" ", 2)[2] for cell, phrase in spec.CELL_PHRASES.items()}


def _choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _random_object(
    rng: np.random.Generator,
    cell: str,
    exclude: set[tuple[str, str]],
    held_out: set[tuple[str, str]],
) -> spec.SceneObject:
    """A random object whose composition is not in `exclude` (and not held out, which the split check enforces)."""
    options = [(c, k) for c in spec.COLORS for k in spec.KINDS if (c, k) not in exclude]
    # Bias towards held-out compositions half of the time so the test split is cheap to rejection-sample.
    held = [o for o in options if o in held_out]
    color, kind = _choice(rng, held) if held and rng.random() < 0.25 else _choice(rng, options)
    return spec.SceneObject(
        cell=cell,
        kind=kind,
        color=color,
        size=_choice(rng, spec.SIZES),
        style=_choice(rng, spec.STYLES),
    )


def _random_scene(rng: np.random.Generator, config: WorldConfig, num_objects: int) -> spec.Scene:
    cells = rng.permutation(len(spec.CELLS))[:num_objects]
    held_out = set(config.held_out)
    objects: list[spec.SceneObject] = []
    for cell_index in cells:
        used = {o.composition for o in objects}
        # Distractors: with probability 1/2 reuse the kind or color of an existing object.
        obj = _random_object(rng, spec.CELLS[cell_index], used, held_out)
        if objects and rng.random() < 0.5:
            anchor = _choice(rng, objects)
            if rng.random() < 0.5:
                colors = [c for c in spec.COLORS if (c, anchor.kind) not in used]
                obj = dataclasses.replace(obj, kind=anchor.kind, color=_choice(rng, colors))
            else:
                kinds = [k for k in spec.KINDS if (anchor.color, k) not in used]
                obj = dataclasses.replace(obj, color=anchor.color, kind=_choice(rng, kinds))
        objects.append(obj)
    return spec.Scene(background=_choice(rng, spec.BACKGROUNDS), objects=tuple(objects))


def _fill(rng: np.random.Generator, key: str, **fields) -> tuple[str, str]:
    """Fills a random template; returns (instruction, template key used for the keyword)."""
    return _choice(rng, _TEMPLATES[key]).format(**fields), fields.get("obj", "")


def _propose_edit(rng: np.random.Generator, config: WorldConfig, edit_type: str) -> Edit | None:
    """Samples a source scene and applies one edit of `edit_type`; None if the scene does not admit it."""
    lo, hi = config.min_objects, config.max_objects
    if edit_type == "add":
        hi = min(hi, spec.MAX_OBJECTS - 1)
        lo = min(lo, hi)
    counts = [n for n in config.object_counts if n <= hi] or ([hi] if config.object_counts else [])
    num_objects = int(counts[rng.integers(len(counts))] if counts else rng.integers(lo, hi + 1))
    source = _random_scene(rng, config, num_objects)
    used = {o.composition for o in source.objects}

    if edit_type == "identity":
        text, _ = _fill(rng, "identity")
        return Edit(edit_type, source, source, text, "", "")
    if edit_type == "background":
        new = _choice(rng, [b for b in spec.BACKGROUNDS if b != source.background])
        text, _ = _fill(rng, "background", obj="background", new=new)
        target = dataclasses.replace(source, background=new)
        return Edit(edit_type, source, target, text, "background", "background")
    if edit_type == "add":
        if not source.free_cells or num_objects >= spec.MAX_OBJECTS:
            return None
        new = _random_object(rng, _choice(rng, source.free_cells), used, set(config.held_out))
        text, _ = _fill(rng, "add", new=new.describe(), where=spec.CELL_PHRASES[new.cell])
        target = source.replace_object(None, new)
        keyword = f"{new.color} {'outlined ' if new.style == 'outline' else ''}{new.kind}"
        return Edit(edit_type, source, target, text, keyword, new.name, (), (new,))

    obj = _choice(rng, source.objects)
    if edit_type == "count":
        return _count_edit(rng, config, source, obj)

    if edit_type == "color":
        colors = [c for c in spec.COLORS if c != obj.color and (c, obj.kind) not in used]
        if not colors:
            return None
        new = dataclasses.replace(obj, color=_choice(rng, colors))
        text, _ = _fill(rng, "color", obj=obj.name, new=new.color)
    elif edit_type == "replace":
        kinds = [k for k in spec.KINDS if k != obj.kind and (obj.color, k) not in used]
        if not kinds:
            return None
        new = dataclasses.replace(obj, kind=_choice(rng, kinds))
        text, _ = _fill(rng, "replace", obj=obj.name, new=new.kind)
    elif edit_type == "remove":
        if len(source.objects) < 2 and rng.random() < 0.5:
            return None  # Keep most targets non-empty.
        new = None
        text, _ = _fill(rng, "remove", obj=obj.name)
    elif edit_type == "move":
        new = dataclasses.replace(obj, cell=_choice(rng, source.free_cells))
        text, _ = _fill(rng, "move", obj=obj.name, to=_TO_PHRASES[new.cell])
    elif edit_type == "resize":
        bigger = obj.size == "small"
        new = dataclasses.replace(obj, size="large" if bigger else "small")
        text, _ = _fill(rng, "resize_up" if bigger else "resize_down", obj=obj.name)
    elif edit_type == "style":
        to_outline = obj.style == "filled"
        new = dataclasses.replace(obj, style="outline" if to_outline else "filled")
        text, _ = _fill(rng, "outline" if to_outline else "fill", obj=obj.name)
    else:
        raise ValueError(f"unknown edit type {edit_type!r}")
    target = source.replace_object(obj, new)
    return Edit(edit_type, source, target, text, obj.name, obj.name, (obj,), (new,) if new else ())


def _count_edit(
    rng: np.random.Generator, config: WorldConfig, source: spec.Scene, obj: spec.SceneObject
) -> Edit | None:
    """Makes the source hold 1-3 copies of `obj` and asks for a different count; positions of the group are free."""
    others = [o for o in source.objects if o != obj]
    free = [c for c in spec.CELLS if c not in {o.cell for o in others}]
    max_group = min(spec.MAX_OBJECTS - len(others), len(free))
    if max_group < 2:
        return None
    have = int(rng.integers(1, min(3, max_group) + 1))
    want = _choice(rng, [n for n in range(1, max_group + 1) if n != have])
    order = list(rng.permutation(free))
    cells = [obj.cell] + [c for c in order if c != obj.cell]
    copies = [dataclasses.replace(obj, cell=c) for c in cells]
    source = dataclasses.replace(source, objects=tuple(others + copies[:have]))
    # Grow: new copies go to random free cells. Shrink: random members are removed. The random draws happen in both
    # placements, so the generator's stream (every later choice of this sample) does not depend on it.
    kept = sorted(rng.permutation(have)[:want]) if want <= have else []
    if config.count_placement == "reading_order":
        members = sorted(copies[:have], key=lambda o: spec.CELLS.index(o.cell))
        taken = {o.cell for o in members}
        empty = [dataclasses.replace(obj, cell=c) for c in spec.CELLS if c in free and c not in taken]
        group = (members + empty)[:want]
    elif want > have:
        group = copies[:want]
    else:
        group = [copies[i] for i in kept]
    target = spec.Scene(source.background, tuple(others + group), position_free=obj.composition)
    if want == 1:
        text, _ = _fill(rng, "count_one", obj=obj.name)
    else:
        text, _ = _fill(rng, "count", obj=obj.name, number=_NUMBER_WORDS[want])
    changed_source = tuple(c for c in copies[:have] if c not in group)
    changed_target = tuple(c for c in group if c not in copies[:have])
    return Edit("count", source, target, text, obj.name, obj.name, changed_source, changed_target)


def _split_ok(edit: Edit, split: str, held_out: set[tuple[str, str]]) -> bool:
    present = spec.compositions([edit.source, edit.target])
    if split == "test":
        return bool(present & held_out)
    return not present & held_out


def generate_edit(split: str, seed: int, index: int, config: WorldConfig = WorldConfig()) -> Edit:
    """The scene-graph edit of sample `index` of `split`; a pure function of its arguments."""
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([_SPLIT_STREAMS[split], seed, index])
    edit_type = _choice(rng, config.edit_types)
    held_out = set(config.held_out)
    for _ in range(1000):
        edit = _propose_edit(rng, config, edit_type)
        if edit is not None and _split_ok(edit, split, held_out):
            return edit
    raise RuntimeError(
        f"could not generate a {edit_type} edit for {split}/{seed}/{index} with min_objects="
        f"{config.min_objects}, max_objects={config.max_objects}, object_counts={config.object_counts}"
    )


def _keyword_span(instruction: str, keyword: str) -> tuple[int, int]:
    if not keyword:
        return (0, 0)
    start = instruction.find(keyword)
    if start < 0:
        raise AssertionError(f"keyword {keyword!r} not in {instruction!r}")
    return (start, start + len(keyword))


def render_edit(edit: Edit, size: int) -> EditSample:
    source_image = render.render(edit.source, size)
    target_image = render.render(edit.target, size)
    edit_mask = np.any(source_image != target_image, axis=-1)
    object_mask = np.zeros((size, size), bool)
    for obj in edit.edited_source + edit.edited_target:
        object_mask |= render.object_coverage(size, obj) > 0
    if edit.edit_type == "background":
        occupied = np.zeros((size, size), bool)
        for obj in edit.source.objects:
            occupied |= render.object_coverage(size, obj) >= 1.0
        object_mask = ~occupied
    return EditSample(
        source_image=source_image,
        target_image=target_image,
        edit_mask=edit_mask,
        object_mask=object_mask,
        keyword_span=_keyword_span(edit.instruction, edit.keyword),
        edit=edit,
    )


def generate_sample(split: str, seed: int, index: int, config: WorldConfig = WorldConfig()) -> EditSample:
    """Sample `index` of `split`, rendered at `config.size`."""
    return render_edit(generate_edit(split, seed, index, config), config.size)
