"""LoFA training data: a folder with `metadata.jsonl` (or `metadata.json`), LoRA files and cached conditions.

One record per LoRA sample:

    {"id": "jump_01", "lora": "loras/jump_01.safetensors",
     "condition": {"kind": "text", "prompt": "a man jumps ...", "embedding": "conditions/jump_01.safetensors"},
     "group": "jump", "split": "train", "latents": "latents/jump.safetensors"}

`condition.kind` is "text", "image" ({"kind": "image", "image": "images/x.png", "embedding": ...}: a style or
face image; `embedding` holds its CLIP vision features; a model that mixes two image features also needs
`embedding_2`, the second encoder's features of `image_2` or, without it, of the same image) or "pose"
({"kind": "pose", "frames": "poses/x.safetensors" or a folder of frame images}: rendered pose frames).
`embedding` and `embedding_2` are written by `python -m training encode`.
`caption` ({"prompt", "embedding"}) is the text the base model sees in the diffusion loss; for text conditions it
defaults to the condition itself. `latents` (needed by the Stage-II diffusion loss) holds a tensor "latents"
[N, C, ...]. The authors' layout is read too: `file_name` (LoRA) and `input_emb` (a
weights-only `.pth` with `prompt_emb` and optional `latents`). LoRA files may use any common naming and rank.
`validate` lists every problem of every sample at once, before any training starts.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lofa_core.conditioning import (
    Condition,
    ConditionSpec,
    prepare_image_condition,
    prepare_pose_condition,
    prepare_text_condition,
)
from lofa_core.errors import LoFAError
from lofa_core.fileio import load_torch_weights_only
from lofa_core.lora_formats import LoRAFactors, read_lora_state_dict
from lofa_core.targets import TargetCatalog

SPLITS = ("train", "val", "test")
CONDITION_KINDS = ("text", "image", "pose")


class DatasetError(LoFAError):
    """The dataset folder has problems; the message lists all of them."""


# What reading one sample's files can raise (the loaders turn damaged .pth files and wrong contents into LoFAError).
READ_ERRORS = (LoFAError, SafetensorError, OSError, KeyError, RuntimeError)


@dataclass
class Sample:
    id: str
    lora: Path | None
    condition: dict
    group: str | None
    split: str
    latents: Path | None
    line: int
    embedding: Path | None = None  # cached condition tokens / image features (resolved `condition.embedding`)
    embedding_2: Path | None = None  # image: the second image feature of a mixing model (`condition.embedding_2`)
    frames: Path | None = None  # pose frames (resolved `condition.frames`)
    caption: Path | None = None  # text embedding the base model sees in the diffusion loss
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"sample '{self.id}' (record {self.line}{', group ' + self.group if self.group else ''})"


def metadata_path(folder: str | Path) -> Path:
    folder = Path(folder)
    for name in ("metadata.jsonl", "metadata.json"):
        if (folder / name).exists():
            return folder / name
    raise DatasetError(f"{folder} has no metadata.jsonl or metadata.json; see training/dataset.py for the format.")


def read_records(folder: str | Path) -> list[dict]:
    """The sample records of a dataset; one DatasetError listing every line that is not a usable record."""
    path = metadata_path(folder)
    text = path.read_text()
    problems: list[str] = []
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path} is not valid JSON ({err}).") from err
        if not isinstance(records, list):
            raise DatasetError(f"{path} must hold a JSON list of sample records.")
        numbered = [(f"record {n}", rec) for n, rec in enumerate(records, start=1)]
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    problems.append(f"line {n} is not valid JSON ({err})")
    problems += [f"{where} {problem}" for where, rec in numbered if (problem := _record_problem(rec))]
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) in {path}:\n  - " + "\n  - ".join(problems))
    return [rec for _, rec in numbered]


PATH_KEYS = ("lora", "file_name", "latents", "input_emb")
CONDITION_PATH_KEYS = ("embedding", "embedding_2", "frames")


def _record_problem(rec: object) -> str | None:
    """Why a parsed record cannot be a sample (its paths must be strings, its condition an object), or None."""
    if not isinstance(rec, dict):
        return f"is not a JSON object but {type(rec).__name__}"
    condition = rec.get("condition")
    if condition is not None and not isinstance(condition, dict):
        return "has a 'condition' that is not an object"
    caption = rec.get("caption")
    if caption is not None and not isinstance(caption, dict):
        return "has a 'caption' that is not an object"
    paths = [(k, rec.get(k)) for k in PATH_KEYS] + [(k, (condition or {}).get(k)) for k in CONDITION_PATH_KEYS]
    paths.append(("caption.embedding", (caption or {}).get("embedding")))
    bad = [k for k, v in paths if v is not None and not isinstance(v, str)]
    return f"has non-string paths {bad}" if bad else None


def read_samples(folder: str | Path) -> list[Sample]:
    folder = Path(folder)
    samples = []
    for line, rec in enumerate(read_records(folder), start=1):
        lora = rec.get("lora", rec.get("file_name"))
        condition = dict(rec.get("condition") or {})
        if "input_emb" in rec and "embedding" not in condition:  # the authors' layout
            condition = {"kind": "text", "embedding": rec["input_emb"], **condition}
        condition.setdefault("kind", "text")
        latents = rec.get("latents") or (rec.get("input_emb") if "input_emb" in rec else None)
        sample_id = str(rec.get("id") or (Path(lora).stem if lora else f"record_{line}"))
        embedding, embedding_2 = condition.get("embedding"), condition.get("embedding_2")
        caption = (rec.get("caption") or {}).get("embedding") or (embedding if condition["kind"] == "text" else None)
        frames = condition.get("frames")
        samples.append(Sample(
            id=sample_id, lora=folder / lora if lora else None, condition=condition, group=rec.get("group"),
            split=str(rec.get("split", "train")), latents=folder / latents if latents else None, line=line,
            embedding=folder / embedding if embedding else None,
            embedding_2=folder / embedding_2 if embedding_2 else None, frames=folder / frames if frames else None,
            caption=folder / caption if caption else None,
            extra={k: v for k, v in rec.items() if k not in ("id", "lora", "file_name", "condition", "group",
                                                               "split", "latents", "input_emb")}))
    return samples


def load_tensors(path: Path) -> object:
    """A .safetensors file's tensors, or a .pth read weights-only; a DatasetError naming the file if unreadable."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return load_torch_weights_only(path, DatasetError)


def named_tensor(data: object, key: str, path: Path) -> torch.Tensor:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, torch.Tensor):
        raise DatasetError(f"{path.name} has no '{key}' tensor")
    return value


def load_lora_file(path: Path) -> dict[str, torch.Tensor]:
    obj = load_tensors(path)
    if not (isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise DatasetError(f"{path.name} does not hold a state dict of tensors")
    return obj


def load_embedding(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens [n, D], pooled [P] or None) from our cache file or the authors' `*.tensors.pth`."""
    data = load_tensors(path)
    if path.suffix == ".safetensors":
        return named_tensor(data, "tokens", path), data.get("pooled")
    tokens = data if isinstance(data, torch.Tensor) else named_tensor(data, "prompt_emb", path)
    return (tokens[0] if tokens.dim() == 3 else tokens), None


def load_latents(path: Path) -> torch.Tensor:
    """A latents file's training clips ("latents")."""
    data = load_tensors(path)
    return data if isinstance(data, torch.Tensor) else named_tensor(data, "latents", path)


def load_heldout_latents(path: Path) -> torch.Tensor | None:
    """Clips of the task kept out of LoRA training for evaluation ("heldout"), or None when the file has none."""
    data = load_tensors(path)
    held = data.get("heldout") if isinstance(data, dict) else None
    return held if isinstance(held, torch.Tensor) else None


def load_frames(path: Path) -> torch.Tensor:
    """Pose frames [T, H, W, 3] in [0, 1] from a .safetensors ("frames") or a folder of frame images."""
    if path.is_dir():
        from .encoding import load_image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise DatasetError(f"the folder {path.name} has no frame images (.png, .jpg, .webp)")
        frames = [load_image(p) for p in files]
        if len({f.shape for f in frames}) > 1:
            raise DatasetError(f"the frame images in {path.name} differ in size; render them all at one size")
        return torch.stack(frames)
    return named_tensor(load_tensors(path), "frames", path).float()


def validate(samples: Sequence[Sample], catalog: TargetCatalog, spec: ConditionSpec, *, need_latents: bool = False,
             latent_channels: int | None = None, caption_spec: ConditionSpec | None = None) -> list[str]:
    """Every problem of every sample, as sentences; empty when the dataset is usable."""
    problems = []
    seen: dict[str, int] = {}
    paths = catalog.by_path()
    for s in samples:
        where = s.describe()
        if s.id in seen:
            problems.append(f"{where}: the id is also used by record {seen[s.id]}")
        seen[s.id] = s.line
        if s.split not in SPLITS:
            problems.append(f"{where}: split {s.split!r} is not one of {SPLITS}")
        problems.extend(f"{where}: {p}" for p in _lora_problems(s, paths))
        problems.extend(f"{where}: {p}" for p in _condition_problems(s, spec))
        if need_latents:
            problems.extend(f"{where}: {p}" for p in _latent_problems(s, latent_channels))
            if caption_spec is not None:
                problems.extend(f"{where}: {p}" for p in _caption_problems(s, caption_spec))
    return problems


def _lora_problems(s: Sample, targets: dict) -> list[str]:
    if s.lora is None:
        return ["no LoRA file is given (key 'lora')"]
    if not s.lora.exists():
        return [f"LoRA file {s.lora} is missing"]
    try:
        factors, _ = read_lora_state_dict(load_lora_file(s.lora), targets, source=s.lora.name)
    except READ_ERRORS as err:
        return [f"LoRA file {s.lora.name} cannot be read ({err})"]
    missing = [p for p in targets if p not in factors]
    if missing:
        return [f"LoRA file {s.lora.name} has no LoRA for {len(missing)} of the {len(targets)} target layers "
                f"(e.g. {missing[:2]}); its names do not match the base model, or it covers other layers"]
    out = []
    for path, f in factors.items():
        t = targets[path]
        if f.up.shape[0] != t.out_features or f.down.shape[1] != t.in_features:
            out.append(f"LoRA for {path} is {f.up.shape[0]}x{f.down.shape[1]}, the base model's layer is "
                       f"{t.out_features}x{t.in_features}")
            break
        if not (torch.isfinite(f.up).all() and torch.isfinite(f.down).all()):
            out.append(f"LoRA for {path} contains NaN or Inf")
            break
    return out


def _condition_problems(s: Sample, spec: ConditionSpec) -> list[str]:
    kind = s.condition.get("kind")
    if kind not in CONDITION_KINDS or kind != spec.kind:
        return [f"condition kind {kind!r} does not fit {spec.describe()}"]
    try:
        if kind == "pose":
            if s.frames is None or not s.frames.exists():
                return [f"pose frames {s.condition.get('frames')!r} are missing"]
            prepare_pose_condition(load_frames(s.frames), spec)
            return []
        if s.embedding is None:
            if s.condition.get("prompt") or s.condition.get("image"):
                return ["the condition has no cached embedding: run `python -m training encode` first"]
            return ["the condition has neither a prompt/image nor an embedding"]
        if not s.embedding.exists():
            return [f"condition embedding {s.embedding.name} is missing (run `python -m training encode`)"]
        if kind == "image":
            if spec.second_dim and (s.embedding_2 is None or not s.embedding_2.exists()):
                return ["the model mixes two image features but `embedding_2` is missing: run `python -m training "
                        "encode --image-encoder ... --image-encoder-2 ...`"]
            image_condition(s, spec)
        else:
            prepare_text_condition(*load_embedding(s.embedding), spec)
    except READ_ERRORS as err:
        return [f"condition {s.embedding.name if s.embedding else s.frames} is unusable: {err}"]
    return []


def image_condition(s: Sample, spec: ConditionSpec) -> Condition:
    """A sample's cached CLIP vision features (and the second encoder's, for a mixing model) as a condition."""
    second = load_file(str(s.embedding_2)) if spec.second_dim else None
    return prepare_image_condition(load_file(str(s.embedding)), spec, second)


def _caption_problems(s: Sample, spec: ConditionSpec) -> list[str]:
    if s.caption is None:
        return ["no caption for the diffusion loss: add 'caption': {'prompt': ...} and run `python -m training "
                "encode`"]
    if not s.caption.exists():
        return [f"caption embedding {s.caption.name} is missing (run `python -m training encode`)"]
    try:
        prepare_text_condition(*load_embedding(s.caption), spec)
    except READ_ERRORS as err:
        return [f"caption embedding {s.caption.name} is unusable: {err}"]
    return []


def _latent_problems(s: Sample, channels: int | None) -> list[str]:
    if s.latents is None:
        return ["no latents are given (key 'latents'), but the Stage-II diffusion loss needs them"]
    if not s.latents.exists():
        return [f"latents file {s.latents} is missing"]
    try:
        latents = load_latents(s.latents)
    except READ_ERRORS as err:
        return [f"latents file {s.latents.name} cannot be read ({err})"]
    if latents.dim() < 4 or (channels is not None and latents.shape[1] != channels):
        return [f"latents {list(latents.shape)} are not [N, {channels or 'C'}, ...] latents of the base model"]
    return []


class SampleStore:
    """Lazily loaded LoRA factors, conditions and latents per sample (with a small cache of LoRAs)."""

    def __init__(self, folder: str | Path, samples: Sequence[Sample], catalog: TargetCatalog,
                 spec: ConditionSpec, cache_size: int = 64, caption_spec: ConditionSpec | None = None) -> None:
        self.folder = Path(folder)
        self.samples = list(samples)
        self.by_id = {s.id: s for s in self.samples}
        self.catalog = catalog
        self.targets = catalog.by_path()
        self.spec = spec
        self.caption_spec = caption_spec or spec
        self._captions: dict[str, Condition] = {}
        self._loras: OrderedDict[str, dict[str, LoRAFactors]] = OrderedDict()
        self._conditions: dict[str, Condition] = {}
        self._latents: dict[str, torch.Tensor] = {}
        self.cache_size = cache_size

    def split(self, *names: str) -> list[Sample]:
        return [s for s in self.samples if s.split in names]

    def factors(self, sample: Sample) -> dict[str, LoRAFactors]:
        if sample.id in self._loras:
            self._loras.move_to_end(sample.id)
            return self._loras[sample.id]
        factors, _ = read_lora_state_dict(load_lora_file(sample.lora), self.targets, source=sample.lora.name)
        factors = {p: LoRAFactors(f.up.float(), f.down.float(), f.scale) for p, f in factors.items()}
        self._loras[sample.id] = factors
        if len(self._loras) > self.cache_size:
            self._loras.popitem(last=False)
        return factors

    def delta(self, sample: Sample, path: str) -> torch.Tensor:
        return self.factors(sample)[path].delta()

    def condition(self, sample: Sample) -> Condition:
        """The LoFA prompt of a sample, shaped for the hypernetwork (text tokens, image features or frames)."""
        if sample.id not in self._conditions:
            kind = self.spec.kind
            if kind == "pose":
                cond = prepare_pose_condition(load_frames(sample.frames), self.spec)
            elif kind == "image":
                cond = image_condition(sample, self.spec)
            else:
                cond = prepare_text_condition(*load_embedding(sample.embedding), self.spec)
            self._conditions[sample.id] = cond
        return self._conditions[sample.id]

    def caption(self, sample: Sample) -> Condition:
        """The text the base model sees for this sample in the diffusion loss."""
        if sample.id not in self._captions:
            self._captions[sample.id] = prepare_text_condition(*load_embedding(sample.caption), self.caption_spec)
        return self._captions[sample.id]

    def latents(self, sample: Sample) -> torch.Tensor:
        if sample.id not in self._latents:
            self._latents[sample.id] = load_latents(sample.latents).float()
        return self._latents[sample.id]

    def evaluation_latents(self, sample: Sample) -> tuple[torch.Tensor, bool]:
        """(the task's held-out latents, True), or (its training latents, False) when it has none held out."""
        key = sample.id + "\0heldout"
        if key not in self._latents:
            held = load_heldout_latents(sample.latents)
            self._latents[key] = held.float() if held is not None else None
        held = self._latents[key]
        return (held, True) if held is not None else (self.latents(sample), False)


def check_dataset(folder: str | Path, catalog: TargetCatalog, spec: ConditionSpec, *, need_latents: bool = False,
                  latent_channels: int | None = None, caption_spec: ConditionSpec | None = None) -> list[Sample]:
    """Read and validate; raise one DatasetError naming every bad sample."""
    samples = read_samples(folder)
    problems = validate(samples, catalog, spec, need_latents=need_latents, latent_channels=latent_channels,
                        caption_spec=caption_spec)
    if problems:
        listing = "\n  - ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50
                                                  else "")
        raise DatasetError(f"{len(problems)} problem(s) in {folder}:\n  - {listing}")
    if not any(s.split == "train" for s in samples):
        raise DatasetError(f"{folder} has no sample with split 'train'.")
    return samples
