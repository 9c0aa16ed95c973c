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
