"""`python -m training validate` on hostile and non-text datasets: every bad sample is listed with its reason, no
traceback, nothing unpickled but tensors; image and pose datasets are checked against their own condition."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training import tiny_models
from training.__main__ import main as training_main
from training.runs import base_catalog


class Exploit:
    """Pickles into a call of os.system: a weights-only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny_wan.safetensors"
    save_file(tiny_models.tiny_wan_state_dict(tiny_models.build_tiny_wan(seed=4)), path)
    catalog, _ = base_catalog(path, ("attn",))
    return path, {t.path: t.shape for t in catalog.targets}


def lora_state_dict(shapes, rank=2):
    sd = {}
    for path, (out_f, in_f) in shapes.items():
        sd[f"diffusion_model.{path}.lora_up.weight"] = torch.randn(out_f, rank) * 0.01
        sd[f"diffusion_model.{path}.lora_down.weight"] = torch.randn(rank, in_f) * 0.01
    return sd


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_dataset(folder: Path, records: list) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def validate(capsys, folder, base_path, *extra) -> tuple[int, str, str]:
    code = training_main(["validate", "--dataset", str(folder), "--base-model", str(base_path), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_malicious_and_truncated_pth_files_are_listed_not_raised(base, tmp_path, capsys):
    base_path, shapes = base
    marker = tmp_path / "exploited"
    files = tmp_path / "files"
    files.mkdir()
    good_lora = lora_state_dict(shapes)
    save_file(good_lora, files / "good.safetensors")
    save_file({"tokens": torch.randn(6, 4096)}, files / "prompt.safetensors")
    save_file({"latents": torch.randn(2, 16, 2, 8, 8)}, files / "latents.safetensors")
    (files / "evil.pth").write_bytes(pickle.dumps({"w": Exploit(marker)}, protocol=2))
    torch.save(good_lora, files / "cut_zip.pth")
    truncate(files / "cut_zip.pth")
    torch.save(good_lora, files / "cut_legacy.pth", _use_new_zipfile_serialization=False)
    truncate(files / "cut_legacy.pth")
    torch.save([1, 2, 3], files / "a_list.pth")
    torch.save({"prompt_emb": "not a tensor"}, files / "odd_emb.pth")
    (files / "evil_emb.pth").write_bytes(pickle.dumps(Exploit(marker), protocol=2))
    torch.save({"latents": torch.randn(2, 16, 2, 8, 8)}, files / "cut_latents.pth")
    truncate(files / "cut_latents.pth")
    ok = {"kind": "text", "embedding": "files/prompt.safetensors"}
    write_dataset(tmp_path, [
        {"id": "good", "lora": "files/good.safetensors", "condition": ok, "latents": "files/latents.safetensors"},
        {"id": "evil", "lora": "files/evil.pth", "condition": ok, "latents": "files/latents.safetensors"},
        {"id": "cut_zip", "lora": "files/cut_zip.pth", "condition": ok, "latents": "files/latents.safetensors"},
        {"id": "cut_legacy", "lora": "files/cut_legacy.pth", "condition": ok, "latents": "files/latents.safetensors"},
        {"id": "a_list", "lora": "files/a_list.pth", "condition": ok, "latents": "files/latents.safetensors"},
        {"id": "odd_emb", "file_name": "files/good.safetensors", "input_emb": "files/odd_emb.pth"},
        {"id": "evil_emb", "file_name": "files/good.safetensors", "input_emb": "files/evil_emb.pth"},
        {"id": "cut_latents", "lora": "files/good.safetensors", "condition": ok, "latents": "files/cut_latents.pth"},
    ])
    code, out, err = validate(capsys, tmp_path, base_path, "--latents")
    assert code == 1 and "Traceback" not in err and not marker.exists()
    lines = {line.split("'")[1]: line for line in err.splitlines() if line.strip().startswith("- sample '")}
    assert "good" not in lines
    for name in ("evil", "evil_emb"):
        assert f"'{name}.pth' was refused by the weights-only loader" in lines[name], lines[name]
        assert "posix.system" in lines[name] and "pickled objects other than tensors" in lines[name]
    for name in ("cut_zip", "cut_legacy", "cut_latents"):
        assert f"'{name}.pth' could not be read as a PyTorch weights file" in lines[name], lines[name]
        assert "truncated or corrupt" in lines[name]
    assert "a_list.pth does not hold a state dict of tensors" in lines["a_list"]
    assert "odd_emb.pth has no 'prompt_emb' tensor" in lines["odd_emb"]


def test_broken_metadata_lines_are_listed(base, tmp_path, capsys):
    base_path, _ = base
    (tmp_path / "metadata.jsonl").write_text('{"id": "a", "lora": "x.safetensors"}\n{"id": "b", \n[1, 2]\n')
    code, out, err = validate(capsys, tmp_path, base_path)
    assert code == 1 and "Traceback" not in err
    assert "line 2 is not valid JSON" in err and "line 3 is not a JSON object" in err


def image_features(width: int, pooled: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"penultimate_hidden_states": torch.randn(1, 5, width, generator=gen),
            "last_hidden_state": torch.randn(1, 5, width, generator=gen),
            "image_embeds": torch.randn(1, pooled, generator=gen)}


def test_image_dataset_is_validated_with_its_own_condition(base, tmp_path, capsys):
    base_path, shapes = base
    save_file(lora_state_dict(shapes), tmp_path / "lora.safetensors")
    for i in range(3):
        save_file(image_features(32, 16, i), tmp_path / f"img{i}.safetensors")
    save_file(image_features(48, 16, 9), tmp_path / "wide.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "img0.safetensors").read_bytes()[:100])
    records = [{"id": f"s{i}", "lora": "lora.safetensors",
                "condition": {"kind": "image", "image": f"x{i}.png", "embedding": f"img{i}.safetensors"}}
               for i in range(3)]
    write_dataset(tmp_path, records)
    code, out, err = validate(capsys, tmp_path, base_path)
    assert code == 0 and "3 samples OK" in out and "image condition (penultimate_hidden_states" in out, err
    code, out, err = validate(capsys, tmp_path, base_path, "--set", "image_feature=image_embeds")
    assert code == 0 and "image condition (image_embeds" in out, err
    bad = records + [
        {"id": "wide", "lora": "lora.safetensors", "condition": {"kind": "image", "embedding": "wide.safetensors"}},
        {"id": "cut", "lora": "lora.safetensors", "condition": {"kind": "image", "embedding": "cut.safetensors"}}]
    write_dataset(tmp_path, bad)
    code, out, err = validate(capsys, tmp_path, base_path)
    assert code == 1 and "Traceback" not in err
    assert "'wide'" in err and "48 wide" in err and "'cut'" in err and "cut.safetensors" in err
    write_dataset(tmp_path, bad + [
        {"id": "texty", "lora": "lora.safetensors", "condition": {"kind": "text", "embedding": "img0.safetensors"}}])
    code, out, err = validate(capsys, tmp_path, base_path)
    assert code == 1 and "mixes condition kinds ['image', 'text']" in err


def test_pose_dataset_is_validated_with_its_own_condition(base, tmp_path, capsys):
    base_path, shapes = base
    save_file(lora_state_dict(shapes), tmp_path / "lora.safetensors")
    save_file({"frames": torch.rand(5, 20, 30, 3)}, tmp_path / "walk.safetensors")
    save_file({"frames": torch.rand(20, 30, 3)}, tmp_path / "flat.safetensors")
    (tmp_path / "empty_folder").mkdir()
    write_dataset(tmp_path, [{"id": "walk", "lora": "lora.safetensors",
                              "condition": {"kind": "pose", "frames": "walk.safetensors"}}])
    code, out, err = validate(capsys, tmp_path, base_path, "--set", "pose_frames=8", "--set", "pose_size=32")
    assert code == 0 and "1 samples OK" in out and "pose condition (8 frames at 32x32)" in out, err
    write_dataset(tmp_path, [{"id": "walk", "lora": "lora.safetensors",
                              "condition": {"kind": "pose", "frames": "walk.safetensors"}},
                             {"id": "flat", "lora": "lora.safetensors",
                              "condition": {"kind": "pose", "frames": "flat.safetensors"}},
                             {"id": "empty", "lora": "lora.safetensors",
                              "condition": {"kind": "pose", "frames": "empty_folder"}}])
    code, out, err = validate(capsys, tmp_path, base_path)
    assert code == 1 and "Traceback" not in err
    assert "'flat'" in err and "[frames, height, width, 3]" in err
    assert "'empty'" in err and "no frame images" in err


def test_threads_option_sets_torch_threads(base, tmp_path, capsys):
    """`--threads N` (before the command) sets torch's CPU threads for the whole run."""
    base_path, _ = base
    (tmp_path / "metadata.jsonl").write_text("")
    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2
    try:
        training_main(["--threads", str(wanted), "validate", "--dataset", str(tmp_path),
                       "--base-model", str(base_path)])
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
