"""ComfyUI as a headless server (main.py --cpu) with the pack in custom_nodes: node listing, every shipped API
workflow run end to end with tiny models (only model file names and sizes substituted), ComfyUI's template
browser, and validation errors for broken inputs.

Each workflow run asserts: success in /history, the LoRA file written, the patched weights the sampler used
(saved by ComfyUI's own ModelSave / CheckpointSave) equal W + s * alpha * B @ A of that file, and the latents
sampled with LoFA Apply LoRA equal those sampled with ComfyUI's LoraLoaderModelOnly on the saved float32 file.
The WAN workflows need a ComfyUI with WAN (current); the SDXL ones also run on the 2024 runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from support import tiny_wan, tiny_wan_parts
from test_comfy_sdxl import make_checkpoint
from test_conditions import _image_checkpoint
from test_official import TINY_WAN_RELEASE, write_release

from demo import runtime
from lofa_core import base_signature
from lofa_core.checkpoint import save_checkpoint
from lofa_core.conditioning import image_spec, pose_spec
from lofa_core.factory import SMALL, new_hypernet
from lofa_core.families import build_catalog
from lofa_core.families.wan import TEXT_CONDITION as WAN_TEXT
from lofa_core.lora_formats import read_lora_state_dict
from lofa_core.targets import strip_model_prefix
from training import tiny_models
from training.untrained import randomise_lora_heads_

pytestmark = pytest.mark.headless
WORKFLOWS = runtime.WORKFLOWS
LOFA_NODES = {"LoFAModelLoader": "Load LoFA Model", "LoFAPredictLoRA": "LoFA Predict LoRA",
              "LoFAApplyLoRA": "LoFA Apply LoRA", "LoFASaveLoRA": "LoFA Save LoRA",
              "LoFAAverageLoRAs": "LoFA Average LoRAs",
              "LoFAResponsePreview": "LoFA Response Map Preview", "LoFATextCondition": "LoFA Text Condition",
              "LoFAImageCondition": "LoFA Image Condition", "LoFAPoseCondition": "LoFA Pose Condition"}
ALL_WORKFLOWS = ["lofa_sdxl", "lofa_wan21_t2v", "lofa_wan21_pose", "lofa_wan21_style", "lofa_sdxl_identity"]
RUNS_ON_2024 = {"lofa_sdxl", "lofa_sdxl_identity"}
TINY_CLIP_VISION = {"CLIPVisionLoader": {"clip_name": "tiny_clip_vision.safetensors"}}
SDXL = {"CheckpointLoaderSimple": {"ckpt_name": "tiny_sdxl.safetensors"}, "KSampler": {"steps": 2},
        "EmptyLatentImage": {"width": 64, "height": 64}}
WAN = {"UNETLoader": {"unet_name": "tiny_wan.safetensors"}, "CLIPLoader": {"clip_name": "tiny_umt5.safetensors"},
       "VAELoader": {"vae_name": "tiny_wan_vae.safetensors"}, "KSampler": {"steps": 2},
       "EmptyHunyuanLatentVideo": {"width": 32, "height": 32, "length": 1}}


@dataclass(frozen=True)
class Run:
    """A shipped API workflow and the tiny-model file names and sizes substituted into it."""

    workflow: str
    values: dict
    wan: bool = False


RUNS = {
    "sdxl": Run("lofa_sdxl", {**SDXL, "LoFAModelLoader": {"lofa_name": "tiny_lofa.safetensors"}}),
    "sdxl_identity": Run("lofa_sdxl_identity", {**SDXL, **TINY_CLIP_VISION, "LoadImage": {"image": "face.png"},
                                                "LoFAModelLoader": {"lofa_name": "tiny_identity.safetensors"}}),
    # as shipped: the authors' release, stage1_preview.pth + stage2_preview.pth (here tiny, for the tiny WAN)
    "wan_official": Run("lofa_wan21_t2v", WAN, wan=True),
    "wan_t2v": Run("lofa_wan21_t2v", {**WAN, "LoFAModelLoader": {"lofa_name": "tiny_wan_text.safetensors"}}, wan=True),
    "wan_pose": Run("lofa_wan21_pose", {**WAN, "LoFAModelLoader": {"lofa_name": "tiny_wan_pose.safetensors"},
                                        "LoadVideo": {"file": "pose.mp4"}}, wan=True),
    "wan_style": Run("lofa_wan21_style", {**WAN, **TINY_CLIP_VISION, "LoadImage": {"image": "style.png"},
                                          "LoFAModelLoader": {"lofa_name": "tiny_wan_style.safetensors"}}, wan=True),
}


def wan_lofa_checkpoint(path: Path, weights: dict[str, torch.Tensor], spec, seed: int) -> None:
    """A LoFA checkpoint for the tiny WAN, signed with its weights."""
    catalog = build_catalog({k: tuple(v.shape) for k, v in weights.items()})
    signature = base_signature.compute(catalog, lambda t: weights[f"{t.path}.weight"], "tiny_wan.safetensors")
    torch.manual_seed(seed)
    net = randomise_lora_heads_(new_hypernet(catalog, spec, **SMALL), seed=seed)
    save_checkpoint(path, net, catalog, spec, provenance={"trained": False}, base_signature=signature)


def save_wan_models(root: Path) -> None:
    """The WAN workflows' models in tiny form, in the folders the workflows' notes name."""
    from support import tiny_clip_vision as tiny_clip

    weights = tiny_models.tiny_wan_state_dict(tiny_models.build_tiny_wan(seed=21))
    (root / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(root / "models" / "diffusion_models" /
                                                                  "tiny_wan.safetensors"))
    tiny_wan_parts.save_umt5(root / "models" / "text_encoders" / "tiny_umt5.safetensors")
    tiny_wan_parts.save_vae(root / "models" / "vae" / "tiny_wan_vae.safetensors")
    lofa = root / "models" / "lofa"
    write_release(lofa, dims=TINY_WAN_RELEASE, seed=23)
    wan_lofa_checkpoint(lofa / "tiny_wan_text.safetensors", weights, WAN_TEXT, seed=24)
    wan_lofa_checkpoint(lofa / "tiny_wan_pose.safetensors", weights, pose_spec(frames=4, frame_size=32), seed=25)
    wan_lofa_checkpoint(lofa / "tiny_wan_style.safetensors", weights, image_spec(tiny_clip.CONFIG["hidden_size"]),
                        seed=26)
    tiny_wan_parts.save_pose_video(root / "input" / "pose.mp4")
    Image.new("RGB", (64, 48), (40, 90, 200)).save(root / "input" / "style.png")


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    base = tmp_path_factory.mktemp("headless")
    registrations = runtime.TINY_MODEL_REGISTRATIONS + ("support.tiny_clip_vision", "support.tiny_wan_parts")
    root = runtime.prepare_server_root(comfy.root, base / "comfyui", registrations,
                                       import_paths=(runtime.REPO / "tests",))
    comfy.tiny_sdxl.save_checkpoint(root / "models" / "checkpoints" / "tiny_sdxl.safetensors", seed=0)
    model = comfy.tiny_sdxl.build_model(seed=0)
    make_checkpoint(comfy, model, root / "models" / "lofa" / "tiny_lofa.safetensors")
    from support import tiny_clip_vision as tiny_clip

    tiny_clip.save(tiny_clip.build(seed=1), root / "models" / "clip_vision" / "tiny_clip_vision.safetensors")
    _image_checkpoint(comfy, model, root / "models" / "lofa" / "tiny_identity.safetensors",
                      tiny_clip.CONFIG["hidden_size"])
    (root / "input").mkdir(exist_ok=True)
    Image.new("RGB", (80, 96), (200, 150, 120)).save(root / "input" / "face.png")
    if tiny_wan.native_available():
        save_wan_models(root)
    srv = runtime.Server(root, base / "output", base / "comfyui.log")
    try:
        srv.wait_ready()
        srv.output_dir = base / "output"
        yield srv
    finally:
        srv.stop()


def api_graph(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def sdxl_api() -> dict:
    return api_graph("lofa_sdxl")


def node_id(graph: dict, class_type: str) -> str:
    (found,) = [k for k, v in graph.items() if v["class_type"] == class_type]
    return found


def run(server, graph: dict) -> dict:
    entry = server.wait_done(server.queue(graph))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry


def with_probes(graph: dict, prefix: str, lora_loader: str | None = None) -> dict:
    """The graph plus ComfyUI's own nodes that save what the sampler used: the patched MODEL (ModelSave, or
    CheckpointSave where a checkpoint loader provides CLIP and VAE) and the sampled latents (SaveLatent).
    With `lora_loader`, LoFA Apply LoRA is replaced by the stock LoraLoaderModelOnly on that LoRA file."""
    graph = json.loads(json.dumps(graph))
    apply = node_id(graph, "LoFAApplyLoRA")
    graph[node_id(graph, "LoFASaveLoRA")]["inputs"]["dtype"] = "float32"
    if lora_loader is not None:
        inputs = graph[apply]["inputs"]
        graph[apply] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": inputs["model"], "lora_name": lora_loader, "strength_model": inputs["strength_model"]}}
    save_model = {"model": [apply, 0], "filename_prefix": f"{prefix}/model"}
    if any(n["class_type"] == "CheckpointLoaderSimple" for n in graph.values()):
        checkpoint = node_id(graph, "CheckpointLoaderSimple")
        graph["900"] = {"class_type": "CheckpointSave", "inputs": {
            **save_model, "clip": [checkpoint, 1], "vae": [checkpoint, 2]}}
    else:
        graph["900"] = {"class_type": "ModelSave", "inputs": save_model}
    graph["901"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id(graph, "KSampler"), 0],
                                                           "filename_prefix": f"{prefix}/latent"}}
    return graph


def saved(server, folder: str, kind: str) -> Path:
    (path,) = (server.output_dir / folder).glob(f"{kind}_*")
    return path


def base_weights(server, run_case: Run) -> dict[str, torch.Tensor]:
    """W of the tiny base model, from the file the workflow loaded, keyed like ComfyUI's diffusion model."""
    models = server.root / "models"
    if run_case.wan:
        sd = load_file(models / "diffusion_models" / run_case.values["UNETLoader"]["unet_name"])
    else:
        sd = load_file(models / "checkpoints" / run_case.values["CheckpointLoaderSimple"]["ckpt_name"])
        sd = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    return {strip_model_prefix(k): v for k, v in sd.items()}


@pytest.mark.parametrize("case", list(RUNS))
def test_shipped_workflow_runs_headless(server, case):
    run_case = RUNS[case]
    if run_case.wan and not tiny_wan.native_available():
        pytest.skip("the WAN workflows need a ComfyUI with WAN (2025+); they run on current ComfyUI")
    graph = runtime.substitute(api_graph(run_case.workflow), run_case.values)
    entry = run(server, with_probes(graph, f"{case}/lofa"))

    save_lora = node_id(graph, "LoFASaveLoRA")
    (lora_name,) = entry["outputs"][save_lora]["lofa_lora"]
    lora_file = server.root / "models" / "loras" / lora_name
    assert lora_file.is_file() and "_0_steps_" in lora_name
    strength = graph[node_id(graph, "LoFAApplyLoRA")]["inputs"]["strength_model"]

    weights = base_weights(server, run_case)
    catalog = build_catalog({k: tuple(v.shape) for k, v in weights.items()})
    factors, leftovers = read_lora_state_dict(load_file(lora_file), catalog.by_path())
    assert not leftovers and len(factors) == len(catalog)
    patched = {strip_model_prefix(k): v for k, v in load_file(saved(server, f"{case}/lofa", "model")).items()}
    for key, w in weights.items():
        path = key[: -len(".weight")]
        if path in factors:
            delta = factors[path].delta()
            assert delta.abs().max() > 1e-4 * w.abs().max(), f"{key}: the test LoRA must change the weight"
            torch.testing.assert_close(patched[key].float(), w.float() + strength * delta, rtol=1e-5,
                                       atol=1e-6 * w.abs().max().item(), msg=key)
        elif key in patched:
            assert torch.equal(patched[key], w), f"untargeted weight {key} changed"

    run(server, with_probes(graph, f"{case}/stock", lora_loader=lora_name))
    ours = load_file(saved(server, f"{case}/lofa", "latent"))["latent_tensor"]
    stock = load_file(saved(server, f"{case}/stock", "latent"))["latent_tensor"]
    assert torch.equal(ours, stock), "LoFA Apply LoRA and the stock loader on the saved file must sample the same"


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


def test_template_browser_lists_the_workflows_with_thumbnails(server):
    """ComfyUI (2025+) serves a pack's example_workflows in its template browser."""
    try:
        templates = server.get("/api/workflow_templates")
    except OSError:
        pytest.skip("this ComfyUI has no template browser for custom nodes (2025+)")
    assert sorted(templates[runtime.PACK_NAME]) == sorted(ALL_WORKFLOWS)
    import urllib.request

    for name in ALL_WORKFLOWS:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{runtime.PACK_NAME}/{name}.jpg") as resp:
            assert resp.headers["Content-Type"] == "image/jpeg" and resp.read(3) == b"\xff\xd8\xff"


def test_broken_inputs_get_validation_errors_not_a_crash(server):
    tiny = {**SDXL, "LoFAModelLoader": {"lofa_name": "tiny_lofa.safetensors"}}
    missing = runtime.substitute(sdxl_api(), {**tiny, "LoFAModelLoader": {"lofa_name": "no_such.safetensors"}})
    status, body = server.post("/prompt", {"prompt": missing})
    assert status == 400 and "4" in body["node_errors"]
    assert "no_such.safetensors" in json.dumps(body["node_errors"]["4"])

    wrong_type = runtime.substitute(sdxl_api(), tiny)
    wrong_type["7"]["inputs"]["lora"] = ["13", 0]  # an IMAGE into a LORA_MODEL input
    del wrong_type["12"], wrong_type["14"]  # leave only the output that depends on the broken link
    status, body = server.post("/prompt", {"prompt": wrong_type})
    assert status == 400 and "7" in body["node_errors"]
    assert "LORA_MODEL" in json.dumps(body["node_errors"]["7"])

    bad_value = runtime.substitute(sdxl_api(), {**tiny, "LoFAPredictLoRA": {"batch_size": 0}})
    status, body = server.post("/prompt", {"prompt": bad_value})
    assert status == 400 and "6" in body["node_errors"]
    assert server.get("/object_info/LoFAApplyLoRA"), "the server must still answer after bad input"


def definition_sets(server, name: str) -> dict[str, dict]:
    """Node definitions each workflow must satisfy: the live ComfyUI it runs on here where it can run there, and
    the recorded ComfyUI v0.28.2 core nodes plus the live LoFA nodes."""
    live = server.get("/object_info")
    recorded = json.loads((runtime.REPO / "tests" / "data" / "object_info_comfyui.json").read_text())["nodes"]
    lofa = {k: v for k, v in live.items() if k in LOFA_NODES}
    sets = {"ComfyUI v0.28.2 (recorded)": {**recorded, **lofa}}
    if tiny_wan.native_available():
        sets["this ComfyUI (live)"] = live
    elif name in RUNS_ON_2024:
        sets["ComfyUI 2024 (embedded)"] = live
    return sets


def is_file_choice(input_name: str) -> bool:
    """Combo inputs listing files of the machine (models, input images, videos): any name may be right."""
    return input_name.endswith("_name") or input_name in ("image", "file")


def check_api_graph(api: dict, info: dict, label: str) -> None:
    """Every class exists, every required input is given, every given input is declared (inputs newer ComfyUI
    added, like CLIPVisionEncode's crop, are ignored by older versions), links carry the declared type."""
    for node_key, node in api.items():
        definition = info.get(node["class_type"])
        assert definition, f"{label}: node {node_key} uses unknown class {node['class_type']}"
        declared = {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}
        missing = set(definition["input"].get("required", {})) - set(node["inputs"])
        assert not missing, f"{label}: node {node_key} misses inputs {missing}"
        for input_name, value in node["inputs"].items():
            if input_name not in declared and "2024" in label and not isinstance(value, list):
                continue
            assert input_name in declared, f"{label}: {node['class_type']} has no input {input_name}"
            spec = declared[input_name]
            if isinstance(value, list):
                produced = info[api[value[0]]["class_type"]]["output"][value[1]]
                assert produced == spec[0], f"{label}: {node_key}.{input_name} gets {produced}, wants {spec[0]}"
            elif isinstance(spec[0], list) and spec[0] and not is_file_choice(input_name):
                assert value in spec[0], f"{label}: {node_key}.{input_name}={value!r} not in {spec[0]}"


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflows_match_node_definitions(server, name):
    api = api_graph(name)
    sets = definition_sets(server, name)
    for label, info in sets.items():
        check_api_graph(api, info, f"{name} on {label}")
    info = sets["ComfyUI v0.28.2 (recorded)"]
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
    assert set(ui_nodes) == set(api)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        target = ui_nodes[str(dst)]
        socket = target["inputs"][dst_slot]
        assert socket["link"] == link_id and api[str(dst)]["inputs"][socket["name"]] == [str(src), src_slot]
        assert kind == info[ui_nodes[str(src)]["type"]]["output"][src_slot]
    for key, node in ui_nodes.items():
        literal = [v for v in api[key]["inputs"].values() if not isinstance(v, list)]
        values = [v for v in node["widgets_values"] if v not in ("fixed", "randomize")]
        assert values == literal, f"{name}:{key} UI widgets {values} differ from API inputs {literal}"


def test_example_workflows_ship_in_both_formats_with_thumbnails():
    ui = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    api = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
    thumbnails = sorted(p.stem for p in WORKFLOWS.glob("*.jpg"))
    assert ui == api == thumbnails == sorted(ALL_WORKFLOWS)
    assert WORKFLOWS.name == "example_workflows", "the folder name ComfyUI's template browser prefers"
    for name in ALL_WORKFLOWS:
        path = WORKFLOWS / f"{name}.jpg"
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (480, 270)
        assert path.stat().st_size < 40_000


def test_shipped_workflows_are_the_generated_ones():
    """scripts/build_workflows.py is their single source: the API files are exactly what it generates."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_workflows", runtime.REPO / "scripts" / "build_workflows.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for name, (make, _, _) in build.WORKFLOWS.items():
        assert build.to_api(*make()) == api_graph(name), f"{name}: run python scripts/build_workflows.py"


def test_wan_workflows_use_the_authors_text_encoder_precision_and_negative_prompt():
    """LoFA reads the prompt's umT5 features: the bf16/fp16 encoder the authors used, not an fp8 one; and the
    authors' negative prompt (WAN's sample_neg_prompt)."""
    for name in ("lofa_wan21_t2v", "lofa_wan21_pose", "lofa_wan21_style"):
        graph = api_graph(name)
        encoder = graph[node_id(graph, "CLIPLoader")]["inputs"]["clip_name"]
        assert "fp8" not in encoder and "fp16" in encoder
        negative = graph[graph[node_id(graph, "KSampler")]["inputs"]["negative"][0]]["inputs"]["text"]
        assert negative.startswith("色调艳丽，过曝，静态，细节模糊不清") and negative.endswith("背景人很多，倒着走")
