"""CogniEdit's MLLM instruction decomposition: prompt, tag parser, VLM reasoner and an exact offline world reasoner.

Before editing, CogniEdit asks a VLM to look at the source image and the instruction and to answer in four tagged
parts (its Fig. 12): <info> a thorough description of the image, <think> step-by-step reasoning about what the
instruction refers to and what must change, <answer> an explicit rewritten instruction, and <object> the object to
edit with the properties it must end up with. The editor is then conditioned on the richer text.

Two reasoners share one interface, `(images [B, H, W, 3] uint8, instructions, infos) -> list[Decomposition]`:
`MLLMReasoner` queries a served VLM through `mllm.ChatClient`; `WorldReasoner` derives the same structure exactly from
a world sample's scene graphs, so the pipeline runs offline and its decompositions are always right.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from editing_jax.data.world import spec
from editing_jax.rewards import mllm

TAGS: tuple[str, ...] = ("info", "think", "answer", "object")

# Written in our own words after the decomposition template of CogniEdit (Fig. 12; the official inference code,
# yl4467/CogniEdit inference_r1.py, sends it as the system turn with the source image and instruction as the user
# turn): describe, reason, rewrite the instruction, and name the target with its properties, each in its own tag.
DECOMPOSITION_PROMPT = """\
You will be shown an image and an instruction for editing it. Work in four steps and put each step in its own tag.
1. Inside <info> </info>: describe the image in detail: every object, how many there are, their colors, sizes and \
positions, any text, and how the objects relate to each other.
2. Inside <think> </think>: reason briefly, step by step, about which part of the image the instruction refers to \
and what exactly has to change. Do not repeat yourself.
3. Inside <answer> </answer>: restate the edit as one explicit, self-contained instruction that names the exact \
object (with its color and position) and the exact change.
4. Inside <object> </object>: name the object to edit and list the properties it must have after the edit \
(number, color, position).
Answer in exactly this layout: <info> ... </info> <think> ... </think> <answer> ... </answer> <object> ... </object>"""


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """A decomposed instruction.

    Attributes:
        info, think, answer, object: the text of each tag, stripped ('' when absent).
        missing: tags that are absent or empty.
        unclosed: tags whose closing tag is missing (their text runs to the next tag or the end).
        raw: the reply the fields were parsed from.
        error: why there is no reply at all (a failed request), else None.
    """

    info: str
    think: str
    answer: str
    object: str
    missing: tuple[str, ...] = ()
    unclosed: tuple[str, ...] = ()
    raw: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.missing and self.error is None

    def edit_instruction(self, fallback: str) -> str:
        """The rewritten instruction, or `fallback` (the original instruction) when the reply has none."""
        return self.answer or fallback

    def to_text(self) -> str:
        """The tagged form; `parse_decomposition(d.to_text())` gives back the four fields."""
        return " ".join(f"<{tag}> {getattr(self, tag)} </{tag}>" for tag in TAGS)


_TAG_TOKEN = re.compile(r"<\s*(/?)\s*(" + "|".join(TAGS) + r")\s*>", re.IGNORECASE)
_SPECIAL_TOKEN = re.compile(r"<\|[^|<>]{1,40}\|>")  # Chat-template tokens such as <|im_end|> left in decoded text.


def parse_decomposition(text: str) -> Decomposition:
    """Parses '<info>...</info> <think>...</think> <answer>...</answer> <object>...</object>' from model output.

    Tolerant of case ('<Answer>'), whitespace inside tags ('< /think >'), chat-template tokens, any order, extra text
    between tags, a missing closing tag (the text runs to the next tag or the end: truncated generations) and a
    missing opening tag when the closing one is present (reasoning models whose chat template opens <think> for
    them: the text runs from the previous tag or the start). The first occurrence of a tag wins. Tag text is stripped
    and its whitespace collapsed to single spaces.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected the reply as a string, got {type(text).__name__}")
    clean = _SPECIAL_TOKEN.sub(" ", text)
    tokens = [(m.start(), m.end(), m.group(1) == "/", m.group(2).lower()) for m in _TAG_TOKEN.finditer(clean)]
    fields, missing, unclosed = {}, [], []
    for tag in TAGS:
        content, closed = _tag_content(clean, tokens, tag)
        fields[tag] = " ".join(content.split()) if content is not None else ""
        if not fields[tag]:
            missing.append(tag)
        elif not closed:
            unclosed.append(tag)
    return Decomposition(**fields, missing=tuple(missing), unclosed=tuple(unclosed), raw=text)


def _tag_content(text: str, tokens: list[tuple[int, int, bool, str]], tag: str) -> tuple[str | None, bool]:
    """(content, closed) of the first occurrence of `tag`; content None when the tag does not occur."""
    for index, (_, end, closing, name) in enumerate(tokens):
        if name != tag:
            continue
        if not closing:
            for start, _, later_closing, later_name in tokens[index + 1 :]:
                if later_name == tag and later_closing:
                    return text[end:start], True
                if later_name != tag:
                    return text[end:start], False  # Unclosed: stop at the next tag.
            return text[end:], False
        # A closing tag with no opening before it: take the text since the previous tag (or the start).
        begin = tokens[index - 1][1] if index > 0 else 0
        return text[begin : tokens[index][0]], True
    return None, False


def format_user_turn(instruction: str) -> str:
    return f"Instruction: {instruction}"


@dataclasses.dataclass(frozen=True)
class MLLMReasoner:
    """Decomposes instructions with a served VLM: one request per sample (source image, then the instruction).

    A failed request yields a `Decomposition` with `error` set and every tag missing (so `edit_instruction` falls
    back to the original instruction, as the official code does) unless `raise_on_error`.
    """

    client: mllm.ChatClient
    prompt: str = DECOMPOSITION_PROMPT
    raise_on_error: bool = False

    def __call__(
        self,
        images: np.ndarray,
        instructions: Sequence[str],
        infos: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Decomposition]:
        """Args: images uint8 [B, H, W, 3] (the source images); instructions: B strings; infos: unused."""
        images = np.asarray(images)
        if images.ndim != 4 or len(images) != len(instructions):
            raise ValueError(f"need images [B, H, W, 3] and B instructions, got {images.shape} and {len(instructions)}")
        requests = [
            mllm.ChatRequest(format_user_turn(text), (images[i],), system=self.prompt)
            for i, text in enumerate(instructions)
        ]
        replies = self.client.complete_batch(requests, return_exceptions=not self.raise_on_error)
        out = []
        for reply in replies:
            if isinstance(reply, mllm.ChatError):
                out.append(Decomposition("", "", "", "", missing=TAGS, error=str(reply)))
            else:
                out.append(parse_decomposition(reply))
        return out


def decompose(
    client: mllm.ChatClient, images: np.ndarray, instructions: Sequence[str], **kwargs: Any
) -> list[Decomposition]:
    """Shorthand for `MLLMReasoner(client, **kwargs)(images, instructions)`."""
    return MLLMReasoner(client, **kwargs)(images, instructions)


# ---------------------------------------------------------------------------------------------------------------------
# Exact world reasoner.


@dataclasses.dataclass(frozen=True)
class WorldReasoner:
    """Produces a decomposition for world samples from their scene graphs, with no model.

    info = the source scene (background and every object with size, color, style, kind and position); think = which
    object the instruction refers to (and its same-color or same-kind distractors) and what changes; answer = an
    explicit instruction naming the object by its full description and position; object = the object name
    ('background' for background edits, 'none' for identity). The output goes through `parse_decomposition`, the
    same path as a VLM reply. Each info needs 'source_scene' and 'target_scene' (Scene, JSON or dict) and
    'edit_type'; 'object_name' is used when present.
    """

    def __call__(
        self,
        images: np.ndarray | None,
        instructions: Sequence[str],
        infos: Sequence[Mapping[str, Any]],
    ) -> list[Decomposition]:
        """Args: images: ignored (the scene graph stands in for perception); instructions, infos: B each."""
        if len(instructions) != len(infos):
            raise ValueError(f"got {len(instructions)} instructions but {len(infos)} infos")
        return [parse_decomposition(self.text(text, info)) for text, info in zip(instructions, infos, strict=True)]

    def text(self, instruction: str, info: Mapping[str, Any]) -> str:
        """The tagged reply for one sample."""
        missing = [k for k in ("source_scene", "target_scene", "edit_type") if k not in info]
        if missing:
            raise KeyError(f"world reasoning needs {missing} in the sample info (EditSample.to_example() keys)")
        source, target = _scene(info["source_scene"]), _scene(info["target_scene"])
        edit_type = str(info["edit_type"])
        removed = [o for o in source.objects if o not in target.objects]
        added = [o for o in target.objects if o not in source.objects]
        name = str(info.get("object_name") or _object_name(edit_type, removed, added))
        think, answer = _plan(edit_type, source, target, removed, added)
        think = f'The instruction "{instruction}" ' + _reference(edit_type, source, name, removed, added) + " " + think
        if removed or added or source.background != target.background:
            think += " Everything else stays as it is."
        fields = {
            "info": _describe_scene(source),
            "think": think,
            "answer": answer,
            "object": name or "none",
        }
        return " ".join(f"<{tag}> {fields[tag]} </{tag}>" for tag in TAGS)


def _scene(value: spec.Scene | str | Mapping) -> spec.Scene:
    if isinstance(value, spec.Scene):
        return value
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return spec.Scene.from_json(value) if isinstance(value, str) else spec.Scene.from_dict(dict(value))


def _where(obj: spec.SceneObject) -> str:
    return spec.CELL_PHRASES[obj.cell]


def _to(cell: str) -> str:
    """'to the top left', 'to the center', ... (the destination form of a cell phrase)."""
    return "to the " + spec.CELL_PHRASES[cell].split(" ", 2)[2]


def _a(obj: spec.SceneObject) -> str:
    return f"a {obj.describe()} {_where(obj)}"


def _the(obj: spec.SceneObject) -> str:
    return f"the {obj.describe()} {_where(obj)}"


def _join(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _describe_scene(scene: spec.Scene) -> str:
    if not scene.objects:
        return f"The image shows an empty {scene.background} background."
    listed = "; ".join(_a(o) for o in scene.objects)
    return f"The image shows a {scene.background} background with {_plural(len(scene.objects), 'object')}: {listed}."


def _object_name(edit_type: str, removed: list, added: list) -> str:
    if edit_type == "background":
        return "background"
    changed = removed or added
    return changed[0].name if changed else ""


def _reference(edit_type: str, source: spec.Scene, name: str, removed: list, added: list) -> str:
    """Which object the instruction refers to, and the distractors it must not be confused with."""
    if edit_type == "identity":
        return "asks for no change."
    if edit_type == "background":
        return "refers to the background."
    if edit_type == "add":
        return f"asks for a new {added[0].describe()}." if added else "asks for a new object."
    group = [o for o in source.objects if o.name == name]
    if not group:
        return f"refers to the {name}, which is not in the image yet."
    if len(group) == 1:
        text = f"refers to the {name}, which is {_where(group[0])}."
    else:
        text = f"refers to the {_plural(len(group), name)}: " + _join(_where(o) for o in group) + "."
    color, kind = group[0].composition
    distractors = [o for o in source.objects if o.name != name and (o.color == color or o.kind == kind)]
    if distractors:
        text += " It must not be confused with " + _join(_the(o) for o in distractors) + "."
    return text


def _plan(edit_type: str, source: spec.Scene, target: spec.Scene, removed: list, added: list) -> tuple[str, str]:
    """(think sentence about the change, explicit instruction) for one edit, from the scene-graph difference."""
    keep = ", keeping everything else unchanged."
    one_to_one = len(removed) == 1 and len(added) == 1
    old, new = (removed[0], added[0]) if one_to_one else (None, None)
    if edit_type == "identity" and not removed and not added and source.background == target.background:
        return "Nothing needs to change.", "Keep the image exactly as it is, changing nothing."
    if edit_type == "background" and not removed and not added:
        return (
            f"The background changes from {source.background} to {target.background}.",
            f"Change the {source.background} background to {target.background}, keeping all objects unchanged.",
        )
    if edit_type == "add" and not removed and len(added) == 1:
        return (
            f"A {added[0].describe()} appears {_where(added[0])}, where there is nothing now.",
            f"Add {_a(added[0])}{keep}",
        )
    if edit_type == "remove" and len(removed) == 1 and not added:
        return (
            f"It disappears and the {target.background} background shows in its place.",
            f"Remove {_the(removed[0])}, filling its place with the {target.background} background{keep}",
        )
    if edit_type == "color" and one_to_one:
        return (
            f"Its color changes from {old.color} to {new.color}; its shape, size, style and position stay.",
            f"Recolor {_the(old)} {new.color}{keep}",
        )
    if edit_type == "replace" and one_to_one:
        return (
            f"Its shape changes from {old.kind} to {new.kind}; its color, size, style and position stay.",
            f"Replace {_the(old)} with {_a(new)}{keep}",
        )
    if edit_type == "move" and one_to_one:
        return (
            f"It moves from the {old.cell} cell to the {new.cell} cell, unchanged otherwise.",
            f"Move {_the(old)} {_to(new.cell)}{keep}",
        )
    if edit_type == "resize" and one_to_one:
        return (
            f"Its size changes from {old.size} to {new.size}.",
            f"Make {_the(old)} {new.size}{keep}",
        )
    if edit_type == "style" and one_to_one:
        look = "only an outline" if new.style == "outline" else "filled in"
        return f"It changes from {old.style} to {new.style}.", f"Make {_the(old)} {look}{keep}"
    if edit_type == "count" and (removed or added) and not (removed and added):
        name = (removed or added)[0].name
        have = len([o for o in source.objects if o.name == name])
        want = len([o for o in target.objects if o.name == name])
        think = f"The number of {name}s changes from {have} to {want}."
        if added:
            where = _join(_where(o) for o in added)
            copies = "copy" if len(added) == 1 else "copies"
            return think, f"Add {len(added)} more {copies} of the {name} ({where}) so there are {want}{keep}"
        where = _join(_where(o) for o in removed)
        noun = name if len(removed) == 1 else name + "s"
        return think, f"Remove the {noun} {where} so that {want} {'remains' if want == 1 else 'remain'}{keep}"
    return _generic_plan(source, target, removed, added)


def _generic_plan(source: spec.Scene, target: spec.Scene, removed: list, added: list) -> tuple[str, str]:
    """Any scene difference as a list of explicit steps (used when an edit does not fit its type's pattern)."""
    steps = [f"remove {_the(o)}" for o in removed] + [f"add {_a(o)}" for o in added]
    if source.background != target.background:
        steps.append(f"change the {source.background} background to {target.background}")
    if not steps:
        return "Nothing needs to change.", "Keep the image exactly as it is, changing nothing."
    text = "; ".join(steps)
    return f"The edit amounts to: {text}.", text[0].upper() + text[1:] + ", keeping everything else unchanged."
