"""Vocabularies: the classes a model segments, each with its synonyms.

A `Vocabulary` is a name and a tuple of `Category` (dataset id, names, thing/stuff, colour). The first name of a
category is the label users see; every name is a synonym that gets its own text-classifier row (the model takes the
max over a class's synonyms), and a class counts as "seen in training" when any of its names is exactly a name of
the training vocabulary (`seen_mask`).

`load_vocabulary` turns anything a user may type into a validated `Vocabulary`:

- a builtin name (`list_vocabularies()`: the JSON files in `configs/vocabularies/`);
- a `.json` / `.yaml` / `.yml` file in the builtin format (`Vocabulary.to_dict`);
- a `.txt` file, one class a line: ``grass, lawn [stuff]``;
- an inline string, classes split by ``;``: ``"cat; dog, puppy; grass [stuff]"``;
- a list of strings (one class each, synonyms split by commas) or a list of lists of names.

Duplicate names: the reference's own class lists contain them, and every builtin file must load. Within a class,
ADE20K-150/847 ("kitchen range"), Mapillary Vistas ("mailbox") and Pascal VOC's background ("bag", "tiles") repeat
a synonym; across classes, ADE20K-847 (45 names, e.g. "dog" in 'animal', 'dog' and 'andiron') and Pascal
Context-459 ("rug", "stone") share names. Files in the builtin format therefore keep cross-class duplicates as they
are (the reference scores such a name for every class that lists it, and so do we) and drop a repeated synonym
inside a class, which changes no logit: two identical prompts give identical classifier rows and the class score is
their max (only the number of classifier rows differs from the reference). Every `Vocabulary` has unique names
within each class. Vocabularies typed by users (.txt, inline, lists) are stricter: there a repeated name, within a
class or across classes, is an error, since it is almost always a mistake.
"""
from __future__ import annotations

import colorsys
import difflib
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Union

from fcclip._paths import config_dir

__all__ = [
    "Category",
    "Vocabulary",
    "VocabularyError",
    "VocabularySpec",
    "list_vocabularies",
    "load_vocabulary",
    "palette_color",
    "prompts_surely_fit",
    "seen_mask",
    "validate_prompt_lengths",
]

# The prompt-template ensemble each class name is encoded with (the reference's; fcclip.text encodes them).
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

_FILE_SUFFIXES = (".txt", ".json", ".yaml", ".yml")
_TOP_KEYS = {"name", "categories"}
_CATEGORY_KEYS = {"id", "names", "isthing", "color", "trainId"}
_TAG = re.compile(r"\[(\w*)\]\s*$")
_ANY_TAG = re.compile(r"\[[^\[\]]*\]")


class VocabularyError(ValueError):
    """A vocabulary that cannot be used; the message names the offending entry (index and text)."""


@dataclass(frozen=True)
class Category:
    """One class of a vocabulary.

    Attributes:
        id: the dataset's category id (as its annotation files use it).
        names: the label users see, then its synonyms; each is one text-classifier row.
        is_thing: True for countable objects (instances), False for stuff.
        color: RGB colour for overlays.
        train_id: the dataset's training id where it has one (Cityscapes, ADE20K-847), else None.
    """

    id: int
    names: tuple[str, ...]
    is_thing: bool
    color: tuple[int, int, int]
    train_id: int | None = None

    def __post_init__(self) -> None:
        # Accept lists for convenience; store tuples so that categories stay hashable.
        if isinstance(self.names, list):
            object.__setattr__(self, "names", tuple(self.names))
        if isinstance(self.color, list):
            object.__setattr__(self, "color", tuple(self.color))

    @property
    def label(self) -> str:
        """The first name: what users see."""
        return self.names[0]


@dataclass(frozen=True)
class Vocabulary:
    """A named, ordered tuple of categories. The position of a category is its contiguous class index.

    Construction validates: at least one category, each with at least one name; names are strings without
    control characters or surrounding whitespace and unique within their category; ids are unique non-negative
    integers; `isthing` is a bool; colours are three integers in 0..255. A name may appear in several categories
    (the reference's ADE20K-847 list does that).
    """

    name: str
    categories: tuple[Category, ...]

    def __post_init__(self) -> None:
        if isinstance(self.categories, list):
            object.__setattr__(self, "categories", tuple(self.categories))
        if not isinstance(self.name, str) or not self.name.strip():
            raise VocabularyError(f"vocabulary name must be a non-empty string, got {self.name!r}")
        if not self.categories:
            raise VocabularyError(f"vocabulary {self.name!r} is empty: it needs at least one class")
        seen_ids: dict[int, int] = {}
        for index, category in enumerate(self.categories):
            _check_category(index, category)
            if category.id in seen_ids:
                raise _entry_error(
                    index, category.names, f"duplicate id {category.id} (also class at index {seen_ids[category.id]})"
                )
            seen_ids[category.id] = index

    def __len__(self) -> int:
        return len(self.categories)

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.categories)

    @property
    def labels(self) -> tuple[str, ...]:
        """The first name of each class, (K,)."""
        return tuple(c.names[0] for c in self.categories)

    @property
    def synonyms(self) -> tuple[tuple[str, ...], ...]:
        """All names of each class, (K, variable)."""
        return tuple(c.names for c in self.categories)

    @property
    def thing_mask(self) -> list[bool]:
        """True for thing classes, (K,)."""
        return [c.is_thing for c in self.categories]

    @property
    def ids(self) -> tuple[int, ...]:
        """Dataset category id of each class, (K,)."""
        return tuple(c.id for c in self.categories)

    @cached_property
    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON of `to_dict()`: equal vocabularies have equal digests, in any run."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The builtin JSON format; `Vocabulary.from_dict` (and `load_vocabulary` on a saved file) reads it back."""
        categories = []
        for c in self.categories:
            entry: dict[str, Any] = {"id": c.id, "names": list(c.names), "isthing": int(c.is_thing),
                                     "color": list(c.color)}
            if c.train_id is not None:
                entry["trainId"] = c.train_id
            categories.append(entry)
        return {"name": self.name, "categories": categories}

    @classmethod
    def from_dict(cls, data: Any, *, default_name: str = "custom") -> Vocabulary:
        """Parse the builtin format (strict keys). `name` may be omitted, then `default_name` is used.

        Colours may be omitted (a palette colour by index is used), `isthing` too (default True). A synonym repeated
        within a class is dropped (the reference lists contain some); a name in two classes is kept.
        """
        if not isinstance(data, dict):
            raise VocabularyError(f"expected an object with 'name' and 'categories', got {type(data).__name__}")
        unknown = sorted(set(data) - _TOP_KEYS, key=str)
        if unknown:
            raise VocabularyError(f"unknown top-level key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
        if "categories" not in data:
            raise VocabularyError("missing top-level key 'categories'")
        name = data.get("name", default_name)
        raw = data["categories"]
        if not isinstance(raw, list):
            raise VocabularyError(f"'categories' must be a list, got {type(raw).__name__}")
        return cls(name=name, categories=tuple(_category_from_dict(i, entry) for i, entry in enumerate(raw)))


VocabularySpec = Union[Vocabulary, str, "os.PathLike[str]", Sequence[Union[str, Sequence[str]]]]


def list_vocabularies() -> list[str]:
    """Names of the builtin vocabularies (the stems of `configs/vocabularies/*.json`), sorted."""
    return sorted(p.stem for p in _builtin_dir().glob("*.json"))


def load_vocabulary(spec: VocabularySpec) -> Vocabulary:
    """Load a vocabulary from any of the forms users write.

    `spec` is one of:

    - a `Vocabulary`: returned as is;
    - an `os.PathLike`, or a string naming an existing file: `.json` / `.yaml` / `.yml` in the builtin format
      (`{"name": ..., "categories": [...]}`; without "name" the file stem is used), or `.txt`, one class a line
      (synonyms separated by commas, blank lines and lines starting with ``#`` ignored; named after the file stem).
      A string ending in one of those suffixes that names no file raises FileNotFoundError;
    - a builtin name (`list_vocabularies()`), e.g. ``"ade20k_150"``;
    - an inline string: classes separated by ``;``, synonyms by ``,``: ``"cat; dog, puppy; grass [stuff]"``.
      Whitespace around names is stripped; one trailing ``;`` is allowed, so a one-class inline vocabulary is
      written ``"cat;"``, but an empty class elsewhere (``"cat;;dog"``, ``"cat;;"``, ``"; cat"``) is an error, like
      an empty vocabulary. A string with neither ``;`` nor ``,`` that is no builtin name and no file is an error
      (with the closest builtin names), so that a typo such as ``"ade20k150"`` does not silently become a
      one-class vocabulary;
    - a list: each item a string (one class, synonyms separated by commas) or a list of names (one class).

    Classes from .txt, inline strings and lists get ids 1..N in order, are things unless they end with a
    ``[stuff]`` tag (``[thing]`` is accepted too), get palette colours by index, and are named "custom" (inline,
    lists) or after the file. There a name may appear in only one class.

    Raises:
        VocabularyError: the vocabulary is invalid; the message names the offending entry.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(spec, Vocabulary):
        return spec
    if isinstance(spec, os.PathLike):
        return _load_file(Path(os.fspath(spec)))
    if isinstance(spec, str):
        if not spec.strip():
            raise VocabularyError("empty vocabulary: the string is blank")
        if _is_file(spec):
            return _load_file(Path(spec))
        if spec.strip().lower().endswith(_FILE_SUFFIXES):
            raise FileNotFoundError(f"vocabulary file not found: {spec!r}")
        builtins = list_vocabularies()
        if spec.strip() in builtins:
            return _load_file(_builtin_dir() / f"{spec.strip()}.json")
        if ";" in spec or "," in spec:
            parts = spec.split(";")
            if len(parts) > 1 and not parts[-1].strip():
                parts.pop()  # one trailing ';' ends the list: "cat;" is a one-class vocabulary
            blank = [i for i, part in enumerate(parts) if not part.strip()]
            if blank:
                raise VocabularyError(
                    f"empty class at position {blank[0]} of {spec!r}: two ';' with nothing between them (or a "
                    "leading ';'); remove it, or write the class you meant"
                )
            return _from_entries("custom", list(enumerate(parts)), what="class")
        close = difflib.get_close_matches(spec.strip(), builtins, n=3, cutoff=0.6)
        hint = f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise VocabularyError(
            f"unknown vocabulary {spec!r}: not a builtin name and not a file. {hint}"
            f"Builtin vocabularies: {', '.join(builtins)}. "
            f"For a one-class inline vocabulary write {spec.strip() + ';'!r}"
        )
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        return _from_entries("custom", list(enumerate(spec)), what="class")
    raise TypeError(f"cannot make a vocabulary from {type(spec).__name__}; see load_vocabulary's docstring")


def seen_mask(vocabulary: Vocabulary, train_vocabulary: Vocabulary) -> list[bool]:
    """For each class of `vocabulary`, whether it was seen in training, (K,).

    A class is seen when any of its names equals (exact, case-sensitive string) any name of any class of
    `train_vocabulary` (normally coco_panoptic). This is the reference's `category_overlapping_mask`, which picks
    the in-vocabulary ensemble weight (alpha for seen classes, beta for unseen ones).
    """
    train_names = {name for c in train_vocabulary.categories for name in c.names}
    return [any(name in train_names for name in c.names) for c in vocabulary.categories]


def prompts_surely_fit(vocabulary: Vocabulary, templates: Sequence[str] = PROMPT_TEMPLATES,
                       context_length: int = 77) -> bool:
    """Whether every prompt (each template filled with each name) fits ``context_length`` tokens for certain, told
    without a tokenizer (nor PyTorch): CLIP's byte-level BPE gives a prompt at most one token per UTF-8 byte, plus its
    start and end tokens. False says only that :func:`validate_prompt_lengths` must count them."""
    longest = max((len(t.format(name).lower().encode("utf-8")) for category in vocabulary.categories
                   for name in category.names for t in templates), default=0)
    return longest + 2 <= context_length


def validate_prompt_lengths(
    vocabulary: Vocabulary,
    templates: Sequence[str],
    count_tokens: Callable[[str], int],
    context_length: int = 77,
) -> None:
    """Check that every prompt (each template filled with each name) fits the text encoder's context.

    `templates` are format strings with one ``{}``. `count_tokens(prompt)` returns the prompt's token count
    including the start and end tokens (with open_clip: ``len(tokenizer.encode(prompt)) + 2``). A prompt longer
    than `context_length` would be truncated silently by the tokenizer and lose its end token.

    Raises:
        VocabularyError: naming the class, the name, the prompt and its token count.
        ValueError: a template without exactly one ``{}``.
    """
    for template in templates:
        try:
            ok = template.count("{}") == 1 and template.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}' and no other fields")
    for index, category in enumerate(vocabulary.categories):
        for name in category.names:
            for template in templates:
                prompt = template.format(name)
                count = count_tokens(prompt)
                if count > context_length:
                    raise _entry_error(
                        index, category.names,
                        f"name {name!r} makes the prompt {prompt!r} {count} tokens long, "
                        f"more than the text encoder's context length {context_length}",
                    )


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def _builtin_dir() -> Path:
    return config_dir() / "vocabularies"


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # name too long, embedded NUL, ...
        return False


def _load_file(path: Path) -> Vocabulary:
    suffix = path.suffix.lower()
    if suffix not in _FILE_SUFFIXES:
        raise VocabularyError(
            f"{path}: unsupported vocabulary file type {path.suffix!r}; use .txt, .json, .yaml or .yml"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # FileNotFoundError names the path
    except UnicodeDecodeError:
        raise VocabularyError(f"{path}: not a UTF-8 text file; save the vocabulary as UTF-8") from None
    try:
        if suffix == ".txt":
            entries = []
            for line_number, line in enumerate(text.splitlines(), start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    if ";" in line:
                        raise VocabularyError(f"line {line_number} ({line.strip()!r}): ';' in a .txt vocabulary; "
                                              "write one class a line, synonyms separated by commas")
                    entries.append((line_number, line))
            return _from_entries(path.stem, entries, what="line")
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise VocabularyError(f"invalid JSON: {exc}") from None
        else:
            import yaml

            from fcclip.config import yaml_problem

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise VocabularyError(f"invalid YAML: {yaml_problem(exc)}") from None
        return Vocabulary.from_dict(data, default_name=path.stem)
    except VocabularyError as exc:
        raise VocabularyError(f"{path}: {exc}") from None


def _from_entries(name: str, entries: list[tuple[int, Any]], *, what: str) -> Vocabulary:
    """Classes typed by users: `entries` are (line number or list position, str or list of names).

    Blank strings are skipped. Ids 1..N, palette colours, things unless tagged ``[stuff]``; a name may appear in
    one class only. Messages name the class by its contiguous index, or by line number for .txt files.
    """
    categories: list[Category] = []
    owner: dict[str, int] = {}
    for position, entry in entries:
        if isinstance(entry, str) and not entry.strip():
            continue
        index = len(categories)
        where = f"{what} {position}" if what == "line" else f"class at index {index}"
        where = f"{where} ({_entry_text(entry)!r})"
        names, isthing = _parse_entry(where, entry)
        for n in names:
            if n in owner:
                raise VocabularyError(
                    f"{where}: name {n!r} is already used by class at index {owner[n]} "
                    f"({categories[owner[n]].names[0]!r}); a name may belong to one class only"
                )
            owner[n] = index
        categories.append(Category(id=index + 1, names=names, is_thing=isthing, color=palette_color(index)))
    if not categories:
        raise VocabularyError("empty vocabulary: no classes given")
    return Vocabulary(name=name, categories=tuple(categories))


def _parse_entry(where: str, entry: Any) -> tuple[tuple[str, ...], bool]:
    """One user-typed class -> (names, isthing). A trailing ``[stuff]`` / ``[thing]`` tag sets isthing."""
    if isinstance(entry, str):
        raw = entry.split(",")
    elif isinstance(entry, Sequence) and not isinstance(entry, (bytes, bytearray)):
        raw = list(entry)
        for item in raw:
            if not isinstance(item, str):
                raise VocabularyError(f"{where}: names must be strings, got {type(item).__name__}")
    else:
        raise VocabularyError(f"{where}: a class must be a string or a list of names, got {type(entry).__name__}")
    isthing = True
    tag = _TAG.search(raw[-1]) if raw else None
    if tag:
        if tag.group(1) not in ("stuff", "thing"):
            raise VocabularyError(f"{where}: unknown tag '[{tag.group(1)}]'; use [stuff] or [thing]")
        isthing = tag.group(1) == "thing"
        raw[-1] = raw[-1][: tag.start()]
        if not raw[-1].strip() and len(raw) > 1:
            raw.pop()  # "grass, lawn, [stuff]" or ["grass", "lawn", "[stuff]"]
    names = tuple(n.strip() for n in raw)
    if not any(names):
        raise VocabularyError(f"{where}: class has no names")
    for n in names:
        if _ANY_TAG.search(n):
            raise VocabularyError(f"{where}: misplaced tag in {n!r}; a [stuff] or [thing] tag ends the class")
    _check_names(where, names)
    return names, isthing


def _category_from_dict(index: int, entry: Any) -> Category:
    """One category of the builtin format (strict keys, checked types)."""
    if not isinstance(entry, dict):
        raise _entry_error(index, entry, f"a category must be an object, got {type(entry).__name__}")
    names = entry.get("names")
    unknown = sorted(set(entry) - _CATEGORY_KEYS, key=str)
    if unknown:
        raise _entry_error(index, names, f"unknown key(s) {unknown}; allowed: {sorted(_CATEGORY_KEYS)}")
    for key in ("id", "names"):
        if key not in entry:
            raise _entry_error(index, names, f"missing key {key!r}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _entry_error(index, names, f"'names' must be a list of strings, got {names!r}")
    # The reference lists repeat a few synonyms inside a class (see the module docstring): keep the first.
    names = tuple(dict.fromkeys(names))
    isthing = entry.get("isthing", True)
    if isinstance(isthing, int) and isthing in (0, 1):  # bool is an int too
        isthing = bool(isthing)
    else:
        raise _entry_error(index, names, f"'isthing' must be 0, 1, true or false, got {isthing!r}")
    color = entry.get("color")
    color = palette_color(index) if color is None else _as_color(index, names, color)
    train_id = entry.get("trainId")
    if train_id is not None and (not isinstance(train_id, int) or isinstance(train_id, bool)):
        raise _entry_error(index, names, f"'trainId' must be an integer, got {train_id!r}")
    category_id = entry["id"]
    if not isinstance(category_id, int) or isinstance(category_id, bool):
        raise _entry_error(index, names, f"'id' must be an integer, got {category_id!r}")
    return Category(id=category_id, names=names, is_thing=isthing, color=color, train_id=train_id)


def _as_color(index: int, names: Any, color: Any) -> tuple[int, int, int]:
    if isinstance(color, (list, tuple)) and len(color) == 3 and all(_is_byte(v) for v in color):
        return (color[0], color[1], color[2])
    raise _entry_error(index, names, f"'color' must be three integers in 0..255, got {color!r}")


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _check_category(index: int, category: Any) -> None:
    """The invariants of a category inside a Vocabulary."""
    if not isinstance(category, Category):
        raise _entry_error(index, category, f"expected a Category, got {type(category).__name__}")
    names = category.names
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        raise _entry_error(index, names, f"names must be a tuple of strings, got {names!r}")
    if not names:
        raise _entry_error(index, names, "class has no names")
    _check_names(f"class at index {index} ({_entry_text(names)!r})", names)
    for n in names:
        if n != n.strip():
            raise _entry_error(index, names, f"name {n!r} has leading or trailing whitespace")
    if not isinstance(category.id, int) or isinstance(category.id, bool) or category.id < 0:
        raise _entry_error(index, names, f"id must be a non-negative integer, got {category.id!r}")
    if not isinstance(category.is_thing, bool):
        raise _entry_error(index, names, f"isthing must be a bool, got {category.is_thing!r}")
    color = category.color
    if not (isinstance(color, tuple) and len(color) == 3 and all(_is_byte(v) for v in color)):
        raise _entry_error(index, names, f"color must be three integers in 0..255, got {color!r}")
    train_id = category.train_id
    if train_id is not None and (not isinstance(train_id, int) or isinstance(train_id, bool)):
        raise _entry_error(index, names, f"train_id must be an integer or None, got {category.train_id!r}")


def _check_names(where: str, names: tuple[str, ...]) -> None:
    """Names are non-blank, free of control characters and unique within their class."""
    for n in names:
        if not n.strip():
            raise VocabularyError(f"{where}: blank name")
        bad = next((ch for ch in n if unicodedata.category(ch).startswith("C")), None)
        if bad is not None:
            raise VocabularyError(f"{where}: name {n!r} contains the control character U+{ord(bad):04X}")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise VocabularyError(f"{where}: duplicate synonym {n!r}")
        seen.add(n)


def _entry_error(index: int, names: Any, reason: str) -> VocabularyError:
    return VocabularyError(f"class at index {index} ({_entry_text(names)!r}): {reason}")


def _entry_text(entry: Any) -> str:
    """How an entry reads in an error message."""
    if isinstance(entry, str):
        text = entry.strip()
    elif isinstance(entry, (list, tuple)) and all(isinstance(n, str) for n in entry):
        text = ", ".join(entry)
    else:
        text = repr(entry)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_byte(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255


def palette_color(index: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour for class `index` (deterministic).

    Hues step by the golden ratio, so neighbouring indices get far-apart hues; saturation and value cycle through
    three levels so that classes whose hues come close again still differ.
    """
    hue = (index * 0.618033988749895) % 1.0
    saturation = (0.85, 0.65, 1.0)[(index // 3) % 3]
    value = (0.95, 0.8, 0.65)[index % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(r * 255), round(g * 255), round(b * 255))
