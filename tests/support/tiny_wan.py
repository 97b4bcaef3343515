"""The tiny WAN 2.1 T2V (`training.tiny_models`) in ComfyUI, for tests: seen through ComfyUI's key names.

The 2024 ComfyUI runtime has no WAN class, so `ComfyWanView` arranges the *same* module objects of a
diffusers WAN model under ComfyUI's names (`diffusion_model.blocks.0.self_attn.q` is the diffusers
`blocks.0.attn1.to_q` Linear itself, not a copy). ComfyUI's ModelPatcher then patches exactly the weights the
diffusers forward pass uses. On a current ComfyUI (which has WAN) `build_native` loads the same weights into
ComfyUI's own WAN model.
"""

from __future__ import annotations

import torch
from torch import nn

from training.tiny_models import TINY_WAN, build_tiny_wan, tiny_wan_state_dict


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

    model = build_tiny_wan(seed) if model is None else model
    return comfy.model_patcher.ModelPatcher(TinyWanBase(model), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device()), model


def native_available() -> bool:
    import comfy.sd
    import comfy.supported_models

    return hasattr(comfy.supported_models, "WAN21_T2V") and hasattr(comfy.sd, "load_diffusion_model_state_dict")


def build_native(seed: int = 0):
    """(ComfyUI's own WAN 2.1 ModelPatcher loaded with a tiny diffusers model's weights, that model)."""
    import comfy.sd

    model = build_tiny_wan(seed)
    patcher = comfy.sd.load_diffusion_model_state_dict(tiny_wan_state_dict(model),
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
