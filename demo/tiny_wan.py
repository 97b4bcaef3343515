"""A tiny WAN 2.1 T2V for tests: diffusers' `WanTransformer3DModel`, seen through ComfyUI's key names.

The 2024 ComfyUI runtime has no WAN class, so `ComfyWanView` arranges the *same* module objects of a
diffusers WAN model under ComfyUI's names (`diffusion_model.blocks.0.self_attn.q` is the diffusers
`blocks.0.attn1.to_q` Linear itself, not a copy). ComfyUI's ModelPatcher then patches exactly the weights the
diffusers forward pass uses. On a current ComfyUI (which has WAN) `build_native` loads the same weights into
ComfyUI's own WAN model.
"""

from __future__ import annotations

import torch
from torch import nn

from lofa_core.families.wan import diffusers_to_comfy_key

TINY_WAN = dict(dim=128, heads=1, ffn_dim=256, num_layers=2, in_channels=16, text_dim=4096, freq_dim=256)


def build_diffusers(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    cfg = {**TINY_WAN, **overrides}
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg["heads"], attention_head_dim=cfg["dim"] // cfg["heads"],
        in_channels=cfg["in_channels"], out_channels=cfg["in_channels"], text_dim=cfg["text_dim"],
        freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
                p.copy_(1 + 0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def comfy_state_dict(model) -> dict[str, torch.Tensor]:
    """The diffusers model's weights under ComfyUI/original WAN key names."""
    return {diffusers_to_comfy_key(k): v for k, v in model.state_dict().items()}


class _Slots(nn.Module):
    """A module whose children are given by name (numeric names like "0" included)."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class ComfyWanView(nn.Module):
    """ComfyUI's WAN 2.1 module tree over a diffusers model's modules (shared objects, no copies)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.diffusers = [model]  # a plain list: not a submodule, so it adds no second set of keys
        ce = model.condition_embedder
        self.patch_embedding = model.patch_embedding
        self.text_embedding = _Slots(**{"0": ce.text_embedder.linear_1, "2": ce.text_embedder.linear_2})
        self.time_embedding = _Slots(**{"0": ce.time_embedder.linear_1, "2": ce.time_embedder.linear_2})
        self.time_projection = _Slots(**{"1": ce.time_proj})
        self.blocks = nn.ModuleList(self._block(b) for b in model.blocks)
        self.head = _Slots(head=model.proj_out)
        self.head.register_parameter("modulation", model.scale_shift_table)

    @staticmethod
    def _block(b) -> nn.Module:
        def attn(a) -> nn.Module:
            return _Slots(q=a.to_q, k=a.to_k, v=a.to_v, o=a.to_out[0], norm_q=a.norm_q, norm_k=a.norm_k)

        view = _Slots(self_attn=attn(b.attn1), cross_attn=attn(b.attn2), norm3=b.norm2,
                      ffn=_Slots(**{"0": b.ffn.net[0].proj, "2": b.ffn.net[2]}))
        view.register_parameter("modulation", b.scale_shift_table)
        return view


class TinyWanBase(nn.Module):
    """Stands where ComfyUI's BaseModel stands: the diffusion model lives under `diffusion_model`."""

    def __init__(self, model) -> None:
        super().__init__()
        self.diffusion_model = ComfyWanView(model)


def build_view_patcher(seed: int = 0, model=None):
    """(ModelPatcher over the ComfyUI-named view, the diffusers model it shares weights with); `model` defaults
    to a fresh tiny WAN."""
    import comfy.model_management as mm
    import comfy.model_patcher

    model = build_diffusers(seed) if model is None else model
    return comfy.model_patcher.ModelPatcher(TinyWanBase(model), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device()), model


def native_available() -> bool:
    import comfy.sd
    import comfy.supported_models

    return hasattr(comfy.supported_models, "WAN21_T2V") and hasattr(comfy.sd, "load_diffusion_model_state_dict")


def build_native(seed: int = 0):
    """(ComfyUI's own WAN 2.1 ModelPatcher loaded with a tiny diffusers model's weights, that model)."""
    import comfy.sd

    model = build_diffusers(seed)
    patcher = comfy.sd.load_diffusion_model_state_dict(comfy_state_dict(model),
                                                       model_options={"dtype": torch.float32})
    return patcher, model


def diffusers_forward(model, seed: int = 0) -> torch.Tensor:
    """One denoiser call of the diffusers model on fixed random inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, TINY_WAN["in_channels"], 1, 4, 4, generator=gen)
    context = torch.randn(1, 8, TINY_WAN["text_dim"], generator=gen)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=context,
                     return_dict=False)[0]
