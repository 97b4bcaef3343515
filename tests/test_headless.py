"""ComfyUI as a headless server (main.py --cpu) with the pack in custom_nodes: node listing, the shipped SDXL
API workflow end to end with tiny models, and validation errors for broken inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_comfy_sdxl import make_checkpoint

from demo import runtime

pytestmark = pytest.mark.headless
WORKFLOWS = runtime.REPO / "workflows"
LOFA_NODES = {"LoFAModelLoader": "Load LoFA Model", "LoFAPredictLoRA": "LoFA Predict LoRA",
              "LoFAApplyLoRA": "LoFA Apply LoRA", "LoFASaveLoRA": "LoFA Save LoRA",
              "LoFAResponsePreview": "LoFA Response Map Preview", "LoFATextCondition": "LoFA Text Condition",
              "LoFAImageCondition": "LoFA Image Condition", "LoFAPoseCondition": "LoFA Pose Condition"}
ALL_WORKFLOWS = ["lofa_sdxl", "lofa_wan21_t2v", "lofa_wan21_pose", "lofa_wan21_style", "lofa_sdxl_identity"]
RUNS_ON_2024 = {"lofa_sdxl", "lofa_sdxl_identity"}
TINY = {"CheckpointLoaderSimple": {"ckpt_name": "tiny_sdxl.safetensors"},
        "LoFAModelLoader": {"lofa_name": "tiny_lofa.safetensors", "dtype": "float32"},
        "KSampler": {"steps": 2}, "EmptyLatentImage": {"width": 64, "height": 64}}


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    base = tmp_path_factory.mktemp("headless")
    root = runtime.prepare_server_root(comfy.root, base / "comfyui")
    comfy.tiny_sdxl.save_checkpoint(root / "models" / "checkpoints" / "tiny_sdxl.safetensors", seed=0)
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, root / "models" / "lofa" / "tiny_lofa.safetensors")
    from test_conditions import _image_checkpoint

    import demo.tiny_clip_vision as tiny_clip

    tiny_clip.save(tiny_clip.build(seed=1), root / "models" / "clip_vision" / "tiny_clip_vision.safetensors")
    _image_checkpoint(comfy, model, root / "models" / "lofa" / "tiny_identity.safetensors",
                      tiny_clip.CONFIG["hidden_size"])
    from PIL import Image

    (root / "input").mkdir(exist_ok=True)
    Image.new("RGB", (80, 96), (200, 150, 120)).save(root / "input" / "face.png")
    srv = runtime.Server(root, base / "output", base / "comfyui.log")
    try:
        srv.wait_ready()
        srv.output_dir = base / "output"
        yield srv
    finally:
        srv.stop()


def sdxl_api() -> dict:
    return json.loads((WORKFLOWS / "api" / "lofa_sdxl.json").read_text())


def test_object_info_lists_every_lofa_node(server):
    info = server.get("/object_info")
    for name, display in LOFA_NODES.items():
        assert name in info, f"{name} missing from /object_info"
        assert info[name]["display_name"] == display and info[name]["category"] == "LoFA"
        assert info[name]["description"], f"{name} has no description"
        for section in info[name]["input"].values():
            for input_name, spec in section.items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert info["LoFAPredictLoRA"]["output"] == ["LORA_MODEL", "LOFA_RESPONSE"]
    assert "tiny_lofa.safetensors" in info["LoFAModelLoader"]["input"]["required"]["lofa_name"][0]


def test_shipped_sdxl_workflow_runs_headless(server):
    graph = runtime.substitute(sdxl_api(), TINY)
    entry = server.wait_done(server.queue(graph))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    outputs = entry["outputs"]
    (lora_rel,) = outputs["12"]["lofa_lora"]
    lora_path = server.root / "models" / "loras" / lora_rel
    assert lora_path.is_file() and lora_rel.startswith("LoFA/sdxl_")
    tensors = load_file(lora_path)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    for node_id in ("11", "14"):  # the sample and the response map
        (image,) = outputs[node_id]["images"]
        assert (server.output_dir / image["subfolder"] / image["filename"]).is_file()


def test_shipped_sdxl_identity_workflow_runs_headless(server):
    graph = json.loads((WORKFLOWS / "api" / "lofa_sdxl_identity.json").read_text())
    graph = runtime.substitute(graph, {**TINY, "LoFAModelLoader": {"lofa_name": "tiny_identity.safetensors",
                                                                   "dtype": "float32"},
                                       "CLIPVisionLoader": {"clip_name": "tiny_clip_vision.safetensors"},
                                       "LoadImage": {"image": "face.png"}})
    entry = server.wait_done(server.queue(graph))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    (lora_rel,) = entry["outputs"]["12"]["lofa_lora"]
    assert (server.root / "models" / "loras" / lora_rel).is_file()


def test_broken_inputs_get_validation_errors_not_a_crash(server):
    missing = runtime.substitute(sdxl_api(), {**TINY, "LoFAModelLoader": {"lofa_name": "no_such.safetensors"}})
    status, body = server.post("/prompt", {"prompt": missing})
    assert status == 400 and "4" in body["node_errors"]
    assert "no_such.safetensors" in json.dumps(body["node_errors"]["4"])

    wrong_type = runtime.substitute(sdxl_api(), TINY)
    wrong_type["7"]["inputs"]["lora"] = ["13", 0]  # an IMAGE into a LORA_MODEL input
    del wrong_type["12"], wrong_type["14"]  # leave only the output that depends on the broken link
    status, body = server.post("/prompt", {"prompt": wrong_type})
    assert status == 400 and "7" in body["node_errors"]
    assert "LORA_MODEL" in json.dumps(body["node_errors"]["7"])

    bad_value = runtime.substitute(sdxl_api(), {**TINY, "LoFAPredictLoRA": {"batch_size": 0}})
    status, body = server.post("/prompt", {"prompt": bad_value})
    assert status == 400 and "6" in body["node_errors"]
    assert server.get("/object_info/LoFAApplyLoRA"), "the server must still answer after bad input"


def definition_sets(server, name: str) -> dict[str, dict]:
    """Node definitions each workflow must satisfy: the recorded current ComfyUI (core nodes) plus the live
    LoFA nodes; the SDXL workflow must also fit this 2024 runtime, which it runs on above."""
    live = server.get("/object_info")
    recorded = json.loads((runtime.REPO / "tests" / "data" / "object_info_comfyui.json").read_text())["nodes"]
    lofa = {k: v for k, v in live.items() if k in LOFA_NODES}
    sets = {"ComfyUI 2025": {**recorded, **lofa}}
    if name in RUNS_ON_2024:
        sets["ComfyUI 2024 (embedded)"] = live
    return sets


def is_file_choice(input_name: str) -> bool:
    """Combo inputs listing files of the machine (models, input images, videos): any name may be right."""
    return input_name.endswith("_name") or input_name in ("image", "file")


def check_api_graph(api: dict, info: dict, label: str) -> None:
    """Every class exists, every required input is given, every given input is declared (inputs newer ComfyUI
    added, like CLIPVisionEncode's crop, are ignored by older versions), links carry the declared type."""
    for node_id, node in api.items():
        definition = info.get(node["class_type"])
        assert definition, f"{label}: node {node_id} uses unknown class {node['class_type']}"
        declared = {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}
        missing = set(definition["input"].get("required", {})) - set(node["inputs"])
        assert not missing, f"{label}: node {node_id} misses inputs {missing}"
        for input_name, value in node["inputs"].items():
            if input_name not in declared and "2024" in label and not isinstance(value, list):
                continue
            assert input_name in declared, f"{label}: {node['class_type']} has no input {input_name}"
            spec = declared[input_name]
            if isinstance(value, list):
                produced = info[api[value[0]]["class_type"]]["output"][value[1]]
                assert produced == spec[0], f"{label}: {node_id}.{input_name} gets {produced}, wants {spec[0]}"
            elif isinstance(spec[0], list) and spec[0] and not is_file_choice(input_name):
                assert value in spec[0], f"{label}: {node_id}.{input_name}={value!r} not in {spec[0]}"


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflows_match_node_definitions(server, name):
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    sets = definition_sets(server, name)
    for label, info in sets.items():
        check_api_graph(api, info, f"{name} on {label}")
    info = sets["ComfyUI 2025"]
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
    assert set(ui_nodes) == set(api)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        target = ui_nodes[str(dst)]
        socket = target["inputs"][dst_slot]
        assert socket["link"] == link_id and api[str(dst)]["inputs"][socket["name"]] == [str(src), src_slot]
        assert kind == info[ui_nodes[str(src)]["type"]]["output"][src_slot]
    for node_id, node in ui_nodes.items():
        literal = [v for v in api[node_id]["inputs"].values() if not isinstance(v, list)]
        values = [v for v in node["widgets_values"] if v not in ("fixed", "randomize")]
        assert values == literal, f"{name}:{node_id} UI widgets {values} differ from API inputs {literal}"


def test_ui_workflows_are_in_a_folder_comfyui_serves():
    ui = sorted(p.name for p in WORKFLOWS.glob("*.json"))
    api = sorted(p.name for p in (WORKFLOWS / "api").glob("*.json"))
    assert ui == api and ui, "every workflow ships in both formats"
    assert Path(WORKFLOWS).name in {"workflows", "example_workflows"}
