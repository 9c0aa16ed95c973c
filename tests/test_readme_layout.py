"""README.md's "Layout" section matches the tree: every top-level folder, every module and sub-package of fcclip/
and pipelines/ is named there, and every folder it names exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCE = {"build", "dist", "demo", "out"}  # outputs of builds and demos (.gitignore)


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def _named(block: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", block) is not None


def test_layout_names_every_folder_and_module():
    block = _layout_block()
    folders = [p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
               and p.name not in NOT_SOURCE and not p.name.endswith(".egg-info")]
    missing = [f"{name}/" for name in folders if not _named(block, f"{name}/")]
    for package in ("fcclip", "pipelines"):
        for path in (ROOT / package).iterdir():
            if path.name.startswith("_") or path.name == "__pycache__":
                continue
            if path.suffix == ".py" or (path.is_dir() and any(path.iterdir())):
                if not _named(block, path.stem):
                    missing.append(f"{package}/{path.name}")
    assert not missing, f"README's Layout section does not name: {missing}"


def test_layout_names_only_folders_that_exist():
    block = _layout_block()
    top = [line.split()[0] for line in block.splitlines() if line and not line.startswith(" ")]
    assert top and all(name.endswith("/") and (ROOT / name).is_dir() for name in top), top


# ------------------------------------------------------------------------------------- the README's commands
def _readme_commands() -> list[tuple[str, list[str]]]:
    """Every example `fcclip ...` command in README.md's code blocks (continuation lines joined, `$ ` prompts and
    trailing comments dropped; the command after `fcclip submit ... --`), as (line, argv); usage synopses (with
    `[...]`, `|`, `...` or placeholders in capitals) are not examples and are left out."""
    import shlex

    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip().removeprefix("$ ")
            match = re.search(r"(?:^|\s|/)fcclip (\w.*)$", re.split(r"\s+#\s", line, maxsplit=1)[0])
            if not match or line.startswith(("#", "import ", "from ")):
                continue
            command = re.split(r"\s--\s+fcclip\s+", match.group(1), maxsplit=1)[-1]
            argv = shlex.split(command, comments=True)
            ends = [i for i, a in enumerate(argv) if a.startswith((">", "2>", "&&", ";"))]  # the shell's from here
            argv = argv[:ends[0]] if ends else argv
            if any(c in command for c in ("[", "|", "...")) or any(re.fullmatch(r"[A-Z][A-Z_]+", a) for a in argv):
                continue
            commands.append((line, argv))
    return commands


def test_the_readme_commands_parse_and_name_what_exists():
    """A user copies these: each parses with the real command line, and each vocabulary, model preset and training
    config it names by a builtin name exists (a README once said `--vocab coco`, which is no builtin name)."""
    from fcclip.config import list_models, list_train_configs
    from fcclip.vocabulary import list_vocabularies
    from fcclip_pipelines.cli import build_parser

    commands = _readme_commands()
    assert len(commands) >= 25 and {argv[0] for _, argv in commands} >= {"label", "review", "train", "export"}
    parser = build_parser()
    for line, argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README command does not parse: {line}") from None
        vocab = getattr(args, "vocab", None)
        if vocab and ";" not in vocab and "," not in vocab and not re.search(r"\.(json|txt|ya?ml)$", vocab):
            assert vocab in list_vocabularies(), f"no builtin vocabulary {vocab!r}: {line}"
        model = getattr(args, "model", None)
        if model and model != "..." and not model.endswith((".yaml", ".yml")):
            assert model in list_models(), f"no model preset {model!r}: {line}"
        if args.command == "train":
            assert args.config in list_train_configs(), f"no training config {args.config!r}: {line}"
