"""Generate the shipped workflows from one spec: UI format for dragging in, API format for headless runs, and a
thumbnail per workflow for ComfyUI's template browser.

Both formats come from the same graph, so they cannot drift apart. Widget order, sockets and link types come
from node definitions (ComfyUI's /object_info): core nodes from `tests/data/object_info_comfyui.json`
(recorded from ComfyUI v0.28.2), LoFA nodes from the pack itself. The thumbnail draws the graph (LoFA nodes in
orange) under the workflow's title.

Usage: python scripts/build_workflows.py
  (rewrites example_workflows/*.json, example_workflows/*.jpg and example_workflows/api/*.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "example_workflows"  # the folder name ComfyUI's template browser prefers
OBJECT_INFO = REPO / "tests" / "data" / "object_info_comfyui.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_INPUTS = {"seed", "noise_seed"}

NEGATIVE_SDXL = "blurry, low quality, distorted, watermark, text"
# The authors' negative prompt: WAN 2.1's `sample_neg_prompt`, the default of the DiffSynth Wan pipeline LoFA's
# inference uses.
NEGATIVE_WAN = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
                "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
                "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
                "杂乱的背景，三条腿，背景人很多，倒着走")

WAN_TEXT_ENCODER = "umt5_xxl_fp16.safetensors"  # the authors' LoFA prompt came from the bf16 umT5; fp8 alters it

SDXL_NOTE = """# LoFA on SDXL: a personalised LoRA from a prompt, no training

Models (put them here):
- models/checkpoints: an SDXL base checkpoint, e.g. sd_xl_base_1.0.safetensors
- models/lofa: a LoFA checkpoint trained for SDXL (python -m training ..., see the README)

The LoFA prompt describes what to personalise; LoFA Predict LoRA turns it into a LoRA in one forward pass,
LoFA Apply LoRA patches it into the model, LoFA Save LoRA writes it to models/loras (loadable later with
Load LoRA), and the response map shows which weights the LoRA changes most."""

WAN_NOTE = """# LoFA on WAN 2.1 T2V 1.3B with the authors' released model: a motion LoRA from a prompt, no training

Models (put them here):
- models/diffusion_models: wan2.1_t2v_1.3B_fp16.safetensors
- models/text_encoders: umt5_xxl_fp16.safetensors (not the fp8 one: LoFA reads the prompt's umT5 features, and
  the authors used the bf16 encoder; fp8 changes those values)
- models/vae: wan_2.1_vae.safetensors
- models/lofa: stage1_preview.pth AND stage2_preview.pth from huggingface.co/ymhao/LoFA_v0 (converted on first
  use; or convert once with python -m lofa_core.convert_official and pick the .safetensors)

The prompt drives the video and, through LoFA Predict LoRA, becomes the LoRA, as in the authors' pipeline
(same LoRA for both CFG passes; sampling as the authors: shift 5, 50 Euler steps, CFG 5, 81 frames, 832x480,
their negative prompt).
The preview model was trained on MotionX human-action prompts: describe a person's motion in detail.
The official model fits only WAN 2.1 T2V 1.3B. Needs a ComfyUI with WAN support (2025 or later)."""


def link(node_id: str, slot: int = 0) -> list:
    return [node_id, slot]


def sdxl_graph() -> tuple[dict, dict]:
    """API graph and UI layout (id -> (x, y, width, title)) for SDXL."""
    g = {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}),
        "2": ("CLIPTextEncode", {"text": "a photo of a person hiking in the mountains, golden hour",
                                 "clip": link("1", 1)}),
        "3": ("CLIPTextEncode", {"text": NEGATIVE_SDXL, "clip": link("1", 1)}),
        "4": ("LoFAModelLoader", {"lofa_name": "lofa_sdxl.safetensors", "dtype": "auto"}),
        "5": ("CLIPTextEncode", {"text": "a person with curly red hair and freckles, warm smile",
                                 "clip": link("1", 1)}),
        "6": ("LoFAPredictLoRA", {"model": link("1"), "lofa_model": link("4"), "conditioning": link("5"),
                                  "targets": "all", "rank": 0, "batch_size": 8, "base_model_check": "refuse"}),
        "7": ("LoFAApplyLoRA", {"model": link("1"), "lora": link("6"), "strength_model": 1.0}),
        "8": ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "9": ("KSampler", {"model": link("7"), "seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "euler",
                           "scheduler": "normal", "positive": link("2"), "negative": link("3"),
                           "latent_image": link("8"), "denoise": 1.0}),
        "10": ("VAEDecode", {"samples": link("9"), "vae": link("1", 2)}),
        "11": ("SaveImage", {"images": link("10"), "filename_prefix": "LoFA/sdxl"}),
        "12": ("LoFASaveLoRA", {"lora": link("6"), "filename_prefix": "LoFA/sdxl", "key_style": "auto",
                                "dtype": "float16"}),
        "13": ("LoFAResponsePreview", {"response": link("6", 1), "cell_size": 40}),
        "14": ("SaveImage", {"images": link("13"), "filename_prefix": "LoFA/sdxl_response"}),
    }
    layout = {
        "1": (0, 160, 320, "Load SDXL checkpoint"), "2": (360, 0, 400, "Prompt"),
        "3": (360, 220, 400, "Negative prompt"), "4": (0, 420, 320, None), "5": (360, 440, 400, "LoFA prompt"),
        "6": (800, 380, 320, None), "7": (1160, 220, 300, None), "8": (800, 620, 300, None),
        "9": (1500, 100, 320, None), "10": (1860, 100, 220, None), "11": (2120, 100, 400, "Image"),
        "12": (1160, 440, 320, None), "13": (1160, 660, 320, None), "14": (1520, 660, 400, "Response map"),
    }
    return g, layout


def wan_graph() -> tuple[dict, dict]:
    g = {
        "1": ("UNETLoader", {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}),
        "2": ("CLIPLoader", {"clip_name": WAN_TEXT_ENCODER, "type": "wan",
                             "device": "default"}),
        "3": ("VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}),
        "4": ("ModelSamplingSD3", {"model": link("1"), "shift": 5.0}),
        "5": ("CLIPTextEncode", {"text": "A man performs a jumping jack: he jumps, spreads his arms and legs "
                                         "wide, then returns to standing. Full body, plain studio background.",
                                 "clip": link("2")}),
        "6": ("CLIPTextEncode", {"text": NEGATIVE_WAN, "clip": link("2")}),
        "7": ("LoFAModelLoader", {"lofa_name": "stage2_preview.pth", "dtype": "auto"}),
        "8": ("LoFAPredictLoRA", {"model": link("4"), "lofa_model": link("7"), "conditioning": link("5"),
                                  "targets": "all", "rank": 0, "batch_size": 8, "base_model_check": "refuse"}),
        "9": ("LoFAApplyLoRA", {"model": link("4"), "lora": link("8"), "strength_model": 1.0}),
        "10": ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 81, "batch_size": 1}),
        "11": ("KSampler", {"model": link("9"), "seed": 42, "steps": 50, "cfg": 5.0, "sampler_name": "euler",
                            "scheduler": "simple", "positive": link("5"), "negative": link("6"),
                            "latent_image": link("10"), "denoise": 1.0}),
        "12": ("VAEDecode", {"samples": link("11"), "vae": link("3")}),
        "13": ("SaveAnimatedWEBP", {"images": link("12"), "filename_prefix": "LoFA/wan", "fps": 16.0,
                                    "lossless": False, "quality": 90, "method": "default"}),
        "14": ("LoFASaveLoRA", {"lora": link("8"), "filename_prefix": "LoFA/wan", "key_style": "auto",
                                "dtype": "float16"}),
        "15": ("LoFAResponsePreview", {"response": link("8", 1), "cell_size": 40}),
        "16": ("SaveImage", {"images": link("15"), "filename_prefix": "LoFA/wan_response"}),
    }
    layout = {
        "1": (0, 0, 340, "Load WAN 2.1 T2V"), "2": (0, 160, 340, "Load umT5 text encoder"),
        "3": (0, 340, 340, None), "4": (380, 0, 280, None), "5": (380, 160, 420, "Prompt (also the LoFA prompt)"),
        "6": (380, 420, 420, "Negative prompt"), "7": (0, 480, 340, None), "8": (840, 300, 320, None),
        "9": (1200, 100, 300, None), "10": (840, 560, 320, None), "11": (1540, 100, 320, None),
        "12": (1900, 100, 220, None), "13": (2160, 100, 420, "Video"), "14": (1200, 320, 320, None),
        "15": (1200, 560, 320, None), "16": (1560, 560, 400, "Response map"),
    }
    return g, layout


WAN_MODELS = """- models/diffusion_models: wan2.1_t2v_1.3B_fp16.safetensors
- models/text_encoders: umt5_xxl_fp16.safetensors (not fp8: it changes the prompt features LoFA reads)
- models/vae: wan_2.1_vae.safetensors"""

POSE_NOTE = f"""# LoFA pose-guided human action video (WAN 2.1 T2V): a motion LoRA from a pose sequence

Models (put them here):
{WAN_MODELS}
- models/lofa: a pose-conditioned LoFA checkpoint for WAN 2.1 T2V 1.3B (python -m training with pose conditions)
- input/: the pose video (rendered 2D skeletons on black, e.g. from a pose-estimator node or DWPose output)

Load Video + Get Video Components give the frames; LoFA Pose Condition resamples them in time and letterboxes
them to the checkpoint's frame size; the text prompt still describes the scene. Needs ComfyUI 2025 or later."""

STYLE_NOTE = f"""# LoFA text-to-video stylisation (WAN 2.1 T2V): a style LoRA from one image

Models (put them here):
{WAN_MODELS}
- models/clip_vision: clip_vision_vit_l.safetensors (the CLIP ViT-L/14 vision model the checkpoint was trained with)
- models/lofa: a style-image LoFA checkpoint for WAN 2.1 T2V 1.3B (python -m training with image conditions)
- input/: the style image

CLIP Vision Encode turns the style image into features; LoFA Image Condition hands them to LoFA Predict LoRA,
which checks they are the feature and width the checkpoint expects. Needs ComfyUI 2025 or later."""

IDENTITY_NOTE = """# LoFA identity-personalised image generation (SDXL): a LoRA of a face from one photo

Models (put them here):
- models/checkpoints: an SDXL base checkpoint, e.g. sd_xl_base_1.0.safetensors
- models/clip_vision: clip_vision_vit_l.safetensors (CLIP ViT-L/14 vision, as the checkpoint was trained with)
- models/lofa: an identity LoFA checkpoint for SDXL (python -m training with image conditions)
- input/: a clear, frontal face photo

The prompt then places that person in any scene."""


def image_prompt_nodes(file: str, *, image: str, loader: str, encode: str, condition: str) -> dict:
    """Load Image -> CLIP Vision Encode (ViT-L, center crop) -> LoFA Image Condition, under the given node ids."""
    return {image: ("LoadImage", {"image": file}),
            loader: ("CLIPVisionLoader", {"clip_name": "clip_vision_vit_l.safetensors"}),
            encode: ("CLIPVisionEncode", {"clip_vision": link(loader), "image": link(image), "crop": "center"}),
            condition: ("LoFAImageCondition", {"clip_vision_output": link(encode)})}


def wan_condition_graph(kind: str) -> tuple[dict, dict]:
    """WAN 2.1 T2V with a pose or style-image prompt for LoFA (the text prompt still drives the video)."""
    g, layout = wan_graph()
    g["7"][1]["lofa_name"] = f"lofa_wan21_t2v_1.3B_{kind}.safetensors"
    del g["8"][1]["conditioning"]
    g["8"][1]["condition"] = link("19")
    g["5"][1]["text"] = ("A dancer in a white studio performs the moves, full body, steady camera." if kind == "pose"
                         else "A lighthouse on a cliff at sunset, waves crashing, cinematic.")
    if kind == "pose":
        g |= {"17": ("LoadVideo", {"file": "pose.mp4"}),
              "18": ("GetVideoComponents", {"video": link("17")}),
              "19": ("LoFAPoseCondition", {"frames": link("18")})}
        layout |= {"17": (0, 700, 340, "Pose video"), "18": (380, 700, 300, None), "19": (380, 860, 300, None)}
    else:
        g |= image_prompt_nodes("style.png", image="17", loader="20", encode="21", condition="19")
        layout |= {"17": (0, 700, 340, "Style image"), "20": (0, 1040, 340, None), "21": (380, 700, 300, None),
                   "19": (380, 860, 300, None)}
    return g, layout


def sdxl_identity_graph() -> tuple[dict, dict]:
    g, layout = sdxl_graph()
    g["4"][1]["lofa_name"] = "lofa_sdxl_identity.safetensors"
    del g["5"]
    del layout["5"]
    del g["6"][1]["conditioning"]
    g["6"][1]["condition"] = link("17")
    g["2"][1]["text"] = "a portrait photo of the person as an astronaut, studio light, 85mm"
    g |= image_prompt_nodes("face.png", image="15", loader="16", encode="18", condition="17")
    layout |= {"15": (0, 640, 320, "Face photo"), "16": (0, 1000, 320, None), "18": (360, 640, 300, None),
               "17": (360, 800, 300, None)}
    return g, layout


WORKFLOWS = {  # name: (graph, note, thumbnail title)
    "lofa_sdxl": (sdxl_graph, SDXL_NOTE, "LoFA: SDXL LoRA from a text prompt"),
    "lofa_wan21_t2v": (wan_graph, WAN_NOTE, "LoFA: WAN 2.1 motion LoRA from text"),
    "lofa_wan21_pose": (lambda: wan_condition_graph("pose"), POSE_NOTE, "LoFA: WAN 2.1 motion LoRA from poses"),
    "lofa_wan21_style": (lambda: wan_condition_graph("style"), STYLE_NOTE, "LoFA: WAN 2.1 style LoRA from an image"),
    "lofa_sdxl_identity": (sdxl_identity_graph, IDENTITY_NOTE, "LoFA: SDXL identity LoRA from a face"),
}


def to_api(graph: dict, layout: dict) -> dict:
    api = {}
    for node_id, (class_type, inputs) in graph.items():
        title = layout[node_id][3] or class_type
        api[node_id] = {"class_type": class_type, "inputs": dict(inputs), "_meta": {"title": title}}
    return api


def input_order(definition: dict) -> list[tuple[str, list]]:
    spec = definition["input"]
    order = definition.get("input_order") or {s: list(spec.get(s, {})) for s in ("required", "optional")}
    return [(name, spec[section][name]) for section in ("required", "optional") for name in order.get(section, [])]


def input_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def is_seed(name: str, spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 else {}
    return name in SEED_INPUTS or bool(opts.get("control_after_generate"))


def to_ui(graph: dict, layout: dict, note: str, info: dict) -> dict:
    """UI (frontend) format: nodes with sockets and positional widget values, plus typed links."""
    nodes, links, link_id = [], [], 0
    ui_nodes = {}
    for order, (node_id, (class_type, inputs)) in enumerate(graph.items()):
        definition = info[class_type]
        x, y, width, title = layout[node_id]
        sockets, widgets = [], []
        for name, spec in input_order(definition):
            kind = input_type(spec)
            value = inputs.get(name)
            if kind in WIDGET_TYPES and not isinstance(value, list):
                widgets.append(value if value is not None else (spec[1] or {}).get("default"))
                if kind == "INT" and is_seed(name, spec):
                    widgets.append("fixed")
            elif kind not in WIDGET_TYPES:
                sockets.append({"name": name, "type": kind, "link": None})
        outputs = [{"name": (definition.get("output_name") or definition["output"])[i], "type": t, "links": [],
                    "slot_index": i} for i, t in enumerate(definition["output"])]
        node = {"id": int(node_id), "type": class_type, "pos": [x, y], "size": [width, 60 + 26 * (
            len(sockets) + len(widgets) + len(outputs))], "flags": {}, "order": order, "mode": 0,
            "inputs": sockets, "outputs": outputs, "properties": {"Node name for S&R": class_type},
            "widgets_values": widgets}
        if title:
            node["title"] = title
        ui_nodes[node_id] = node
        nodes.append(node)
    for node_id, (_, inputs) in graph.items():
        for name, value in inputs.items():
            if not isinstance(value, list):
                continue
            src, slot = value
            link_id += 1
            target = ui_nodes[node_id]
            socket_index = next(i for i, s in enumerate(target["inputs"]) if s["name"] == name)
            target["inputs"][socket_index]["link"] = link_id
            out = ui_nodes[src]["outputs"][slot]
            out["links"].append(link_id)
            links.append([link_id, int(src), slot, int(node_id), socket_index, out["type"]])
    note_id = max(int(k) for k in graph) + 1
    nodes.append({"id": note_id, "type": "Note", "pos": [0, -320], "size": [760, 280], "flags": {},
                  "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
                  "widgets_values": [note], "title": "Read me"})
    return {"last_node_id": note_id, "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [40, 360]}}, "version": 0.4}


def node_definition(cls) -> dict:
    """What ComfyUI's GET /object_info reports for a V1 node class (the fields workflows depend on)."""
    return {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)), "category": getattr(cls, "CATEGORY", "")}


def lofa_definitions() -> dict:
    """Definitions of the LoFA nodes, read from the pack loaded into the embedded ComfyUI."""
    sys.path.insert(0, str(REPO))
    from demo import runtime

    root = runtime.runtime_root()
    runtime.import_comfy(root)
    import nodes

    pack = runtime.load_pack(nodes)
    return {name: node_definition(cls) for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


def load_object_info() -> dict:
    info = json.loads(OBJECT_INFO.read_text())["nodes"]
    info.update(lofa_definitions())
    return info


THUMBNAIL_SIZE = (480, 270)
TITLE_HEIGHT = 44
LOFA_COLOR, CORE_COLOR, LINK_COLOR, BACKGROUND = (232, 160, 58), (74, 92, 112), (150, 160, 170), (30, 32, 36)


def thumbnail(ui: dict, title: str):
    """The workflow's graph, scaled into a small JPEG-sized picture under its title (LoFA nodes in orange)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = THUMBNAIL_SIZE
    image = Image.new("RGB", THUMBNAIL_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes = {n["id"]: (n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1], n["type"])
             for n in ui["nodes"] if n["type"] != "Note"}
    left, top = min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values())
    right, bottom = max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values())
    margin = 10
    scale = min((width - 2 * margin) / (right - left), (height - TITLE_HEIGHT - margin) / (bottom - top))

    def at(x: float, y: float) -> tuple[float, float]:
        return margin + (x - left) * scale, TITLE_HEIGHT + (y - top) * scale

    for _, src, _, dst, _, _ in ui["links"]:
        (x0, y0), (x1, y1) = at(boxes[src][2], (boxes[src][1] + boxes[src][3]) / 2), at(boxes[dst][0], (
            boxes[dst][1] + boxes[dst][3]) / 2)
        draw.line([(x0, y0), (x1, y1)], fill=LINK_COLOR, width=1)
    for x0, y0, x1, y1, kind in boxes.values():
        color = LOFA_COLOR if kind.startswith("LoFA") else CORE_COLOR
        draw.rounded_rectangle([at(x0, y0), at(x1, y1)], radius=3, fill=color, outline=(220, 220, 220))
    draw.text((margin, 8), title, fill=(240, 240, 240), font=ImageFont.load_default(size=17))
    return image


def write_thumbnail(ui: dict, title: str, path: Path) -> None:
    thumbnail(ui, title).save(path, "JPEG", quality=80, optimize=True)


def build() -> list[Path]:
    info = load_object_info()
    written = []
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    for name, (make, note, title) in WORKFLOWS.items():
        graph, layout = make()
        ui = to_ui(graph, layout, note, info)
        for path, data in ((OUT / "api" / f"{name}.json", to_api(graph, layout)), (OUT / f"{name}.json", ui)):
            path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
            written.append(path)
        write_thumbnail(ui, title, OUT / f"{name}.jpg")
        written.append(OUT / f"{name}.jpg")
    return written


if __name__ == "__main__":
    for p in build():
        print(p.relative_to(REPO))
