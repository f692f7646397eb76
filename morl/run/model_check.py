"""Is a directory a model the learner and the rollout engines can load?

Checked in the driver before any actor starts, so a wrong `model.path` is one error that says what the directory
holds, not a stack trace from inside a Ray actor. It reads only small files: config.json, the weight index, the
tokenizer and processor configs. MiMo-VL-7B-SFT, Qwen2.5-VL-*-Instruct and the toy world's SFT checkpoint all pass.
Beside the checks: the dtype the weights are stored in (safetensors headers) and which checkpoint a directory holds
(`checkpoint_identity`, a few hundred KiB read per weight file).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
FINGERPRINT_CHUNKS, FINGERPRINT_CHUNK_BYTES = 64, 4096  # read per weight file: 256 KiB, whatever the model's size


class ModelDirError(ValueError):
    """`model.path` or `model.processor_path` is not a usable Qwen2.5-VL-compatible HF directory."""


def check_model_dir(path: str, processor_path: str | None = None, key: str = "model.path") -> None:
    """Raise ModelDirError naming the config key (or `key`, the argument that gave `path`), the directory, what is
    missing and what was found."""
    model_dir = _existing_dir(key, path)
    _raise_if(key, model_dir, model_problems(model_dir))
    if processor_path is None:
        hint = "; a tokenizer and processor kept elsewhere go in model.processor_path"
        _raise_if(key, model_dir, processor_problems(model_dir), hint)
    else:
        processor_dir = _existing_dir("model.processor_path", processor_path)
        _raise_if("model.processor_path", processor_dir, processor_problems(processor_dir))


def max_positions(model_dir: Path) -> int | None:
    """The longest sequence the model takes: config.json's max_position_embeddings (its text model's, else the
    top level's); None when it does not say."""
    config = _json_or_empty(model_dir / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    value = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    return value if isinstance(value, int) else None


def stored_dtypes(model_dir: Path) -> list[str]:
    """The floating-point dtypes the weights are stored in, read from the safetensors headers (the files' first bytes);
    for `.bin` weights, config.json's `torch_dtype` (or `dtype`). Empty when neither says."""
    found: set[str] = set()
    for name in _weight_files(model_dir):
        if not name.endswith(".safetensors"):
            continue
        try:
            with (model_dir / name).open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            continue
        found.update(
            SAFETENSORS_DTYPES[t["dtype"]]
            for key, t in header.items()
            if key != "__metadata__" and isinstance(t, dict) and t.get("dtype") in SAFETENSORS_DTYPES
        )
    if found:
        return sorted(found)
    config = _json_or_empty(model_dir / "config.json")
    declared = config.get("torch_dtype") or config.get("dtype")
    return [declared] if isinstance(declared, str) else []


def checkpoint_identity(model_path: str) -> dict[str, str]:
    """Which checkpoint `model_path` holds: its absolute path, and a fingerprint of its content that a copy
    elsewhere shares and another checkpoint does not (`morl compare` shares one SFT column only between runs of
    one fingerprint).

    The fingerprint hashes config.json and, of each weight file, its name, size and 64 evenly spaced 4 KiB chunks:
    any fine-tune changes nearly every chunk, so reading 256 KiB a file tells checkpoints apart without reading 15
    GB; two that differ in a few small tensors only could share it.
    """
    model_dir = Path(model_path).expanduser().resolve()
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for name in _weight_files(model_dir):
        path = model_dir / name
        size = path.stat().st_size
        digest.update(f"\0{name}\0{size}\0".encode())
        with path.open("rb") as f:
            for k in range(FINGERPRINT_CHUNKS):
                f.seek(size * k // FINGERPRINT_CHUNKS)
                digest.update(f.read(FINGERPRINT_CHUNK_BYTES))
    return {"path": str(model_dir), "fingerprint": digest.hexdigest()[:16]}


def _weight_files(model_dir: Path) -> list[str]:
    """The weight files of a checked directory: an index's shards, else the single file there is."""
    for index_name in WEIGHT_INDEXES:
        index = _json_or_empty(model_dir / index_name).get("weight_map")
        if isinstance(index, dict):
            return sorted(set(index.values()))
    return [name for name in WEIGHT_FILES if (model_dir / name).is_file()]


def dtype_notice(model_path: str, dtype: str) -> str:
    """One line for the start of a run: the dtype it trains and samples in, and whether the checkpoint's weights
    are stored otherwise (a bfloat16 checkpoint under `model.dtype: float32` is upcast, at twice the memory)."""
    stored = stored_dtypes(Path(model_path).expanduser())
    line = f"training in {dtype} (model.dtype)"
    if not stored:
        return f"{line}; the dtype of the weights in {model_path} is not recorded"
    if stored == [dtype]:
        return f"{line}, the dtype of the weights in {model_path}"
    return (
        f"{line}: the weights in {model_path} are stored in {', '.join(stored)} and are cast to {dtype} on load; "
        f"set model.dtype to train in the checkpoint's own dtype"
    )


def model_problems(model_dir: Path) -> list[str]:
    """What keeps `from_pretrained` from loading a Qwen2.5-VL model here: its config and its weights."""
    problems = []
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        problems.append("no config.json")
    else:
        try:
            config = json.loads(config_file.read_text())
            model_type, architectures = config.get("model_type"), config.get("architectures") or []
        except (ValueError, AttributeError) as exc:
            problems.append(f"config.json is not a JSON object ({exc})")
        else:
            if model_type != MODEL_TYPE or (architectures and ARCHITECTURE not in architectures):
                problems.append(
                    f"config.json is for model_type {model_type!r} (architectures {architectures}), "
                    f"not {MODEL_TYPE!r} ({ARCHITECTURE})"
                )
    problems.extend(_weight_problems(model_dir))
    return problems


def _weight_problems(model_dir: Path) -> list[str]:
    for index_name in WEIGHT_INDEXES:
        index = model_dir / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                return [f"{index_name} has no readable weight_map ({exc})"]
            missing = [s for s in shards if not (model_dir / s).is_file()]
            return [f"{index_name} lists weight shards that are missing: {', '.join(missing)}"] if missing else []
    if any((model_dir / name).is_file() for name in WEIGHT_FILES):
        return []
    return [f"no weights ({', '.join(WEIGHT_FILES)}, or a sharded index {' / '.join(WEIGHT_INDEXES)})"]


def processor_problems(processor_dir: Path) -> list[str]:
    """What keeps the prompts from being built the way the model was trained: tokenizer, image processor, template."""
    def has(name: str) -> bool:
        return (processor_dir / name).is_file()

    problems = []
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        problems.append("no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    processor_config = _json_or_empty(processor_dir / "processor_config.json")
    if not (has("preprocessor_config.json") or "image_processor" in processor_config):
        problems.append("no image processor (preprocessor_config.json, or processor_config.json with image_processor)")
    if not (
        has("chat_template.jinja")
        or has("chat_template.json")
        or "chat_template" in processor_config
        or "chat_template" in _json_or_empty(processor_dir / "tokenizer_config.json")
    ):
        problems.append(
            "no chat template (chat_template.jinja, chat_template.json, or a chat_template entry in "
            "tokenizer_config.json / processor_config.json)"
        )
    return problems


def _json_or_empty(file: Path) -> dict:
    try:
        loaded = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _existing_dir(key: str, path: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelDirError(f"{key} {path}: no such directory")
    return directory


def _raise_if(key: str, directory: Path, problems: list[str], hint: str = "") -> None:
    if not problems:
        return
    found = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(found[:30]) + (f", ... ({len(found)} entries)" if len(found) > 30 else "") or "nothing"
    raise ModelDirError(
        f"{key} {directory} is not an HF-format Qwen2.5-VL-compatible model directory: "
        f"{'; '.join(problems)}. Found: {shown}{hint}"
    )
