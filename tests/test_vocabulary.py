"""fcclip.vocabulary: parsing every input form, strict validation, builtins, the seen mask and prompt lengths."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from fcclip.vocabulary import (
    Category,
    Vocabulary,
    VocabularyError,
    list_vocabularies,
    load_vocabulary,
    palette_color,
    seen_mask,
    validate_prompt_lengths,
)

PARITY = Path(__file__).parent / "fixtures" / "parity"

# name: (classes, things, classes with synonyms), as /work/shared/vocabularies/README.md lists them.
BUILTINS = {
    "coco_panoptic": (133, 80, 70),
    "coco_stuff": (171, 80, 97),
    "ade20k_150": (150, 100, 116),
    "ade20k_847": (847, 0, 251),
    "cityscapes": (19, 8, 17),
    "mapillary_vistas": (65, 37, 32),
    "pascal_voc_21": (21, 21, 20),
    "pascal_ctx_59": (59, 0, 48),
    "pascal_ctx_459": (459, 0, 48),
}

# The reference's 14 prompt templates (VILD_PROMPT).
TEMPLATES = [
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
]


# --------------------------------------------------------------------------------------------- builtins


def test_list_vocabularies() -> None:
    assert list_vocabularies() == sorted(BUILTINS)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_loads(name: str) -> None:
    vocabulary = load_vocabulary(name)
    classes, things, with_synonyms = BUILTINS[name]
    assert vocabulary.name == name
    assert len(vocabulary) == vocabulary.num_classes == classes
    assert sum(vocabulary.thing_mask) == things
    assert sum(len(names) > 1 for names in vocabulary.synonyms) == with_synonyms
    assert len(set(vocabulary.ids)) == classes
    assert vocabulary.labels == tuple(names[0] for names in vocabulary.synonyms)
    for names in vocabulary.synonyms:
        assert len(set(names)) == len(names)


def test_builtin_details() -> None:
    coco = load_vocabulary("coco_panoptic")
    person = coco.categories[0]
    assert (person.id, person.names[:4], person.is_thing, person.color) == (
        1, ("person", "child", "girl", "boy"), True, (220, 20, 60))
    cityscapes = load_vocabulary("cityscapes")
    assert cityscapes.categories[0].id == 7 and cityscapes.categories[0].train_id == 0
    # A synonym the reference repeats inside a class is kept once (same logits: the class score is a max).
    assert load_vocabulary("ade20k_150").categories[71].names == (
        "stove", "kitchen stove", "kitchen range", "cooking stove")
    assert load_vocabulary("mapillary_vistas").categories[40].names == ("mailbox", "postbox", "letter box")
    # Names the reference gives to two classes are kept in both.
    ade847 = load_vocabulary("ade20k_847")
    assert sum("dog" in names for names in ade847.synonyms) == 3
    # Categories without a colour in the file get palette colours.
    assert ade847.categories[5].color == palette_color(5)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_saved_vocabulary_loads_back_identically(tmp_path: Path, name: str) -> None:
    vocabulary = load_vocabulary(name)
    json_path = tmp_path / f"{name}.json"
    json_path.write_text(json.dumps(vocabulary.to_dict()))
    yaml_path = tmp_path / "saved.yaml"
    yaml_path.write_text(yaml.safe_dump(vocabulary.to_dict(), allow_unicode=True))
    for path in (json_path, str(json_path), yaml_path):
        loaded = load_vocabulary(path)
        assert loaded == vocabulary
        assert loaded.digest == vocabulary.digest
    assert Vocabulary.from_dict(vocabulary.to_dict()) == vocabulary


def test_builtin_loads_by_path_too() -> None:
    from fcclip._paths import config_dir

    assert load_vocabulary(config_dir() / "vocabularies" / "cityscapes.json") == load_vocabulary("cityscapes")


# --------------------------------------------------------------------------------------------- user forms


def test_inline_string() -> None:
    vocabulary = load_vocabulary(" cat; dog,  puppy ;grass, lawn [stuff];  ")
    assert vocabulary.name == "custom"
    assert vocabulary.synonyms == (("cat",), ("dog", "puppy"), ("grass", "lawn"))
    assert vocabulary.labels == ("cat", "dog", "grass")
    assert vocabulary.ids == (1, 2, 3)
    assert vocabulary.thing_mask == [True, True, False]
    assert [c.color for c in vocabulary.categories] == [palette_color(i) for i in range(3)]


def test_inline_keeps_case_and_inner_spaces() -> None:
    vocabulary = load_vocabulary("Teddy  Bear; traffic cone [thing]")
    assert vocabulary.synonyms == (("Teddy  Bear",), ("traffic cone",))
    assert vocabulary.thing_mask == [True, True]


def test_one_class_inline_needs_a_separator() -> None:
    assert load_vocabulary("cat;").synonyms == (("cat",),)
    assert load_vocabulary("cat; dog ; ").synonyms == (("cat",), ("dog",))  # one trailing ';' ends the list
    assert load_vocabulary("cat, kitten").synonyms == (("cat", "kitten"),)
    with pytest.raises(VocabularyError, match=r"'cat;'"):
        load_vocabulary("cat")


def test_builtin_typo_suggests_names() -> None:
    with pytest.raises(VocabularyError, match="ade20k_150") as info:
        load_vocabulary("ade20k150")
    assert "Did you mean" in str(info.value) and "coco_panoptic" in str(info.value)


def test_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "my_classes.txt"
    path.write_text("\ufeff# my classes\n\ncat\ndog, puppy\n   # indented comment\ngrass, lawn [stuff]\n\n",
                    encoding="utf-8")
    vocabulary = load_vocabulary(path)
    assert vocabulary.name == "my_classes"
    assert vocabulary.synonyms == (("cat",), ("dog", "puppy"), ("grass", "lawn"))
    assert vocabulary.thing_mask == [True, True, False]
    assert load_vocabulary(str(path)) == vocabulary


def test_txt_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("# header\ncat\ndog, dog\n")
    with pytest.raises(VocabularyError, match=r"line 3 \('dog, dog'\): duplicate synonym 'dog'") as info:
        load_vocabulary(path)
    assert "bad.txt" in str(info.value)
    path.write_text("cat; dog\n")
    with pytest.raises(VocabularyError, match="one class a line"):
        load_vocabulary(path)
    path.write_text("# only comments\n\n")
    with pytest.raises(VocabularyError, match="empty"):
        load_vocabulary(path)


@pytest.mark.parametrize("suffix", [".txt", ".json", ".yaml", ".yml"])
def test_missing_file_is_a_clear_error(tmp_path: Path, suffix: str) -> None:
    missing = str(tmp_path / f"nothere{suffix}")
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_vocabulary(missing)
    with pytest.raises(FileNotFoundError):
        load_vocabulary(Path(missing))


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "classes.csv"
    path.write_text("cat\n")
    with pytest.raises(VocabularyError, match="unsupported"):
        load_vocabulary(str(path))


def test_existing_file_wins_over_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("cityscapes.txt").write_text("cat\n")
    assert load_vocabulary("cityscapes.txt").synonyms == (("cat",),)
    assert load_vocabulary("cityscapes").num_classes == 19


def test_lists() -> None:
    from_strings = load_vocabulary(["cat", "dog, puppy", "grass, lawn [stuff]"])
    from_lists = load_vocabulary([["cat"], ["dog", "puppy"], ["grass", "lawn", "[stuff]"]])
    assert from_strings == from_lists == load_vocabulary(("cat", ["dog", "puppy"], ["grass", "lawn [stuff]"]))
    assert from_strings.thing_mask == [True, True, False]
    # In a list of lists a name may contain a comma: each item is one name.
    assert load_vocabulary([["Washington, D.C."]]).labels == ("Washington, D.C.",)


def test_vocabulary_is_returned_as_is() -> None:
    vocabulary = load_vocabulary("cat; dog")
    assert load_vocabulary(vocabulary) is vocabulary


def test_json_without_name_and_colours(tmp_path: Path) -> None:
    path = tmp_path / "animals.json"
    path.write_text(json.dumps({"categories": [{"id": 10, "names": ["cat"]},
                                               {"id": 20, "names": ["sky"], "isthing": False, "color": [0, 0, 255]}]}))
    vocabulary = load_vocabulary(path)
    assert vocabulary.name == "animals"
    assert vocabulary.ids == (10, 20)
    assert vocabulary.thing_mask == [True, False]
    assert [c.color for c in vocabulary.categories] == [palette_color(0), (0, 0, 255)]


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("  ;  ; ", "empty"),
        ("cat;;", r"empty class at position 1 of 'cat;;'"),
        ("cat;; dog", r"empty class at position 1"),
        ("; cat; dog", r"empty class at position 0"),
        ("cat; ;", r"empty class at position 1"),
        ([], "empty"),
        ("cat, cat", r"class at index 0 \('cat, cat'\): duplicate synonym 'cat'"),
        ("cat; dog, puppy; mouse, dog",
         r"class at index 2 \('mouse, dog'\): name 'dog' is already used by class at index 1"),
        ("cat; dog,,puppy", r"class at index 1 \('dog,,puppy'\): blank name"),
        ("cat; dog, ", r"class at index 1 .*blank name"),
        ("ca\tt; dog", r"class at index 0 .*control character U\+0009"),
        ("cat; d\u200bog", r"class at index 1 .*U\+200B"),
        ("grass [stuf];", r"unknown tag '\[stuf\]'"),
        ("grass [stuff], lawn;", "misplaced tag"),
        ("[stuff]; cat", r"class at index 0 .*no names"),
        ([[]], "no names"),
        ([["cat", 3]], "names must be strings"),
        (["cat", 3], r"class at index 1 .*got int"),
    ],
)
def test_invalid_user_vocabularies(spec, message: str) -> None:
    with pytest.raises(VocabularyError, match=message):
        load_vocabulary(spec)


def write_json(tmp_path: Path, data) -> Path:
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps(data))
    return path


GOOD = {"id": 1, "names": ["cat"], "isthing": 1, "color": [1, 2, 3]}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "categories": [GOOD], "extra": 1}, r"unknown top-level key\(s\) \['extra'\]"),
        ({"name": "x"}, "missing top-level key 'categories'"),
        ({"categories": {"a": 1}}, "'categories' must be a list"),
        ({"categories": []}, "empty"),
        ([GOOD], "expected an object"),
        ({"categories": [GOOD, {**GOOD, "id": 2, "names": ["dog"], "colour": [1, 2, 3]}]},
         r"class at index 1 \('dog'\): unknown key\(s\) \['colour'\]"),
        ({"categories": [{**GOOD, "names": "cat"}]}, r"class at index 0 .*'names' must be a list of strings"),
        ({"categories": [{**GOOD, "names": ["cat", 1]}]}, "'names' must be a list of strings"),
        ({"categories": [{**GOOD, "names": []}]}, "no names"),
        ({"categories": [{**GOOD, "names": ["cat", " "]}]}, "blank name"),
        ({"categories": [{**GOOD, "names": [" cat"]}]}, "leading or trailing whitespace"),
        ({"categories": [{**GOOD, "names": ["c\nat"]}]}, "control character"),
        ({"categories": [{"names": ["cat"]}]}, "missing key 'id'"),
        ({"categories": [{**GOOD, "id": "1"}]}, "'id' must be an integer"),
        ({"categories": [{**GOOD, "id": True}]}, "'id' must be an integer"),
        ({"categories": [{**GOOD, "id": -1}]}, "non-negative"),
        ({"categories": [GOOD, {**GOOD, "names": ["dog"]}]}, r"class at index 1 \('dog'\): duplicate id 1"),
        ({"categories": [{**GOOD, "isthing": "yes"}]}, "'isthing' must be 0, 1, true or false"),
        ({"categories": [{**GOOD, "isthing": 2}]}, "'isthing'"),
        ({"categories": [{**GOOD, "color": [1, 2]}]}, r"class at index 0 \('cat'\): 'color' must be three integers"),
        ({"categories": [{**GOOD, "color": [1, 2, 300]}]}, "'color'"),
        ({"categories": [{**GOOD, "color": [1, 2, 3.5]}]}, "'color'"),
        ({"categories": [{**GOOD, "color": "red"}]}, "'color'"),
        ({"categories": [{**GOOD, "trainId": "0"}]}, "'trainId'"),
        ({"name": "", "categories": [GOOD]}, "name must be a non-empty string"),
    ],
)
def test_invalid_json(tmp_path: Path, data, message: str) -> None:
    path = write_json(tmp_path, data)
    with pytest.raises(VocabularyError, match=message) as info:
        load_vocabulary(path)
    assert str(path) in str(info.value)


def test_invalid_json_and_yaml_syntax(tmp_path: Path) -> None:
    bad_json = tmp_path / "v.json"
    bad_json.write_text("{not json")
    with pytest.raises(VocabularyError, match="invalid JSON"):
        load_vocabulary(bad_json)
    bad_yaml = tmp_path / "v.yaml"
    bad_yaml.write_text("categories: [unclosed\n")
    with pytest.raises(VocabularyError, match="invalid YAML"):
        load_vocabulary(bad_yaml)


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "street.yml"
    path.write_text("categories:\n  - {id: 7, names: [road, street], isthing: 0, color: [128, 64, 128], trainId: 0}\n"
                    "  - id: 26\n    names: [car]\n    isthing: true\n")
    vocabulary = load_vocabulary(path)
    assert vocabulary.name == "street"
    assert vocabulary.categories[0] == Category(7, ("road", "street"), False, (128, 64, 128), train_id=0)
    assert vocabulary.categories[1].is_thing is True


def test_json_keeps_cross_class_names_and_drops_repeats_within_a_class(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"categories": [{"id": 1, "names": ["animal", "dog", "dog"]},
                                                {"id": 2, "names": ["dog", "puppy"]}]})
    assert load_vocabulary(path).synonyms == (("animal", "dog"), ("dog", "puppy"))


def test_direct_construction_is_validated() -> None:
    category = Category(id=1, names=["cat"], is_thing=True, color=[1, 2, 3])  # lists are stored as tuples
    assert category.names == ("cat",) and category.color == (1, 2, 3) and category.label == "cat"
    vocabulary = Vocabulary("v", [category])
    assert vocabulary.categories == (category,)
    hash(vocabulary)
    with pytest.raises(VocabularyError, match=r"class at index 0 \('cat, cat'\): duplicate synonym"):
        Vocabulary("v", (Category(1, ("cat", "cat"), True, (0, 0, 0)),))
    with pytest.raises(VocabularyError, match="isthing must be a bool"):
        Vocabulary("v", (Category(1, ("cat",), 1, (0, 0, 0)),))  # type: ignore[arg-type]
    with pytest.raises(VocabularyError, match="empty"):
        Vocabulary("v", ())
    with pytest.raises(VocabularyError, match="expected a Category"):
        Vocabulary("v", ("cat",))  # type: ignore[arg-type]


def test_unsupported_spec_type() -> None:
    with pytest.raises(TypeError):
        load_vocabulary(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- digest, palette


def test_digest_is_stable_and_sensitive() -> None:
    vocabulary = Vocabulary("pinned", (Category(1, ("cat",), True, (255, 0, 0)),
                                       Category(7, ("grass", "lawn"), False, (0, 128, 0), train_id=3)))
    # The canonical JSON (sorted keys, no spaces, UTF-8) and its sha256, pinned: no per-run salt (unlike hash()),
    # and a change here changes every cache key built from digests.
    canonical = ('{"categories":[{"color":[255,0,0],"id":1,"isthing":1,"names":["cat"]},{"color":[0,128,0],'
                 '"id":7,"isthing":0,"names":["grass","lawn"],"trainId":3}],"name":"pinned"}')
    assert vocabulary.digest == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert vocabulary.digest == "6e1968fb2216b453d6cb2d47914e38b1c7f4b5c9ec2a93b69875a7917e38d652"
    base = load_vocabulary("cat; dog, puppy; grass [stuff]")
    changed = [
        load_vocabulary("cat; dog, puppy; grass"),
        load_vocabulary("cat; puppy, dog; grass [stuff]"),
        load_vocabulary("Cat; dog, puppy; grass [stuff]"),
        Vocabulary("other", base.categories),
    ]
    assert len({base.digest, *(v.digest for v in changed)}) == 5
    assert load_vocabulary("cat; dog, puppy; grass [stuff]").digest == base.digest


def test_palette_is_distinct_saturated_and_deterministic() -> None:
    colors = [palette_color(i) for i in range(64)]
    assert len(set(colors)) == 64
    assert colors == [palette_color(i) for i in range(64)]
    for color in colors:
        assert all(0 <= v <= 255 for v in color)
        assert max(color) - min(color) >= 90  # saturated, not grey
    # Neighbouring classes differ clearly.
    for a, b in zip(colors, colors[1:]):
        assert sum(abs(x - y) for x, y in zip(a, b)) >= 100


# --------------------------------------------------------------------------------------------- seen mask


def parity_vocabulary() -> Vocabulary:
    data = json.loads((PARITY / "vocabulary.json").read_text())
    return Vocabulary.from_dict({"name": "parity", "categories": data["classes"]})


def test_seen_mask_matches_the_reference() -> None:
    mask = seen_mask(parity_vocabulary(), load_vocabulary("coco_panoptic"))
    seen = {0, 1, 2, 3, 7, 9, 11, 12, 13, 14, 15, 17, 18, 21, 23}
    assert mask == [i in seen for i in range(24)]
    fixture = PARITY / "fixture.json"
    if fixture.exists():
        reference = json.loads(fixture.read_text()).get("category_overlapping_mask")
        if reference is not None:
            assert mask == [bool(v) for v in reference]


def test_seen_mask_is_exact_and_case_sensitive() -> None:
    train = load_vocabulary("dog, puppy; boat")
    vocabulary = load_vocabulary("Dog; puppy; sailboat; boat, ship; dogs")
    assert seen_mask(vocabulary, train) == [False, True, False, True, False]
    coco = load_vocabulary("coco_panoptic")
    assert all(seen_mask(coco, coco))


# --------------------------------------------------------------------------------------------- prompt lengths


def words(prompt: str) -> int:
    return len(prompt.split()) + 2


def test_prompt_lengths_with_a_simple_counter() -> None:
    vocabulary = load_vocabulary(["cat", "dog, " + " ".join(["very"] * 70) + " long dog"])
    validate_prompt_lengths(vocabulary, ["a {}."], words)  # 1 + 72 words + 2: fits
    with pytest.raises(VocabularyError, match=r"class at index 1 \('dog, very.*'\): name 'very very.* 81 tokens"):
        validate_prompt_lengths(vocabulary, ["a photo of a {} in the scene"], words)
    validate_prompt_lengths(vocabulary, ["a photo of a {} in the scene"], words, context_length=100)
    with pytest.raises(ValueError, match="exactly one"):
        validate_prompt_lengths(vocabulary, ["no placeholder"], words)
    with pytest.raises(ValueError, match="exactly one"):
        validate_prompt_lengths(vocabulary, ["{} and {name}"], words)


@pytest.fixture(scope="module")
def clip_token_count():
    open_clip = pytest.importorskip("open_clip")
    tokenizer = open_clip.get_tokenizer("convnext_large_d_320")
    # open_clip 3.x returns the SimpleTokenizer itself (older versions wrapped it); encode() adds no start/end.
    simple = getattr(tokenizer, "tokenizer", tokenizer)
    return lambda prompt: len(simple.encode(prompt)) + 2


def test_prompt_lengths_with_the_clip_tokenizer(clip_token_count) -> None:
    assert clip_token_count("a photo of a cat.") == 8  # <start> a photo of a cat . <end>
    long_name = " ".join(f"word{i}" for i in range(100))
    vocabulary = load_vocabulary(["cat", long_name])
    with pytest.raises(VocabularyError, match=r"class at index 1 .* tokens long, more than .* context length 77"):
        validate_prompt_lengths(vocabulary, TEMPLATES, clip_token_count)
    for name in list_vocabularies():
        validate_prompt_lengths(load_vocabulary(name), TEMPLATES, clip_token_count)
