"""Memory of one text-slider training step on Flux-dev, on paper: from the real architecture, built on
the meta device (no weights, no GPU).

    python benchmarks/flux_memory.py [--resolution 1024] [--rank 4] [--json out.json]

The diffusers FluxTransformer2DModel with FLUX.1-dev's configuration (its defaults plus guidance
embedding) is built on the meta device, a rank-r peft LoRA is put on the attention projections (the
reference's Flux script trains attention only), and one slider-on forward runs on meta tensors
under `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for the
backward. Counted once per storage, parameters left out, that is the activation memory of the step.
With gradient checkpointing (diffusers' own, one checkpoint per transformer block) the forward keeps
only the blocks' inputs, and the backward recomputes one block at a time: its saved tensors are
measured by running the largest block alone.

Peak of a step = base weights + the step's activations (+ one block's, recomputed, with checkpointing)
+ the LoRA's parameters, gradients and AdamW moments (fp32), plus the largest single intermediate
tensor (the feed-forward's hidden layer; attention is assumed memory-efficient, as PyTorch's flash /
mem-efficient SDPA kernels on a GPU: `FlashLikeAttention` stands in for them on the meta device, which
would otherwise keep the token × token matrix). The text encoders are not counted:
the trainer encodes every prompt first and moves them off the device (`offload_text_encoders`).
Base weights: bf16, or fp8 (float8_e4m3fn, as ComfyUI can load Flux, computing in bf16 one layer at a
time). Activations are bf16. What this leaves out: the allocator's fragmentation and the CUDA context
(typically 0.5–1 GB), so a measured peak on a device will be somewhat higher.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig

GIB = 1024**3
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class SavedTensors:
    """Bytes autograd saves for the backward, each storage once, parameters excluded."""

    def __init__(self, parameters):
        self.skip = {p.untyped_storage()._cdata for p in parameters}
        self.seen: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in self.skip:
            self.seen[storage._cdata] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def build(rank: int) -> FluxTransformer2DModel:
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=1.0, target_modules=ATTENTION, init_lora_weights=False))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def inputs(model, resolution: int, text_tokens: int = 512) -> dict:
    side = resolution // 16  # VAE ×8, then 2×2 patches packed into channels
    tokens = side * side
    meta = dict(device="meta", dtype=torch.bfloat16)
    ids = torch.zeros(tokens, 3, device="meta")
    return dict(hidden_states=torch.empty(1, tokens, model.config.in_channels, **meta),
                encoder_hidden_states=torch.empty(1, text_tokens, model.config.joint_attention_dim, **meta),
                pooled_projections=torch.empty(1, model.config.pooled_projection_dim, **meta),
                timestep=torch.empty(1, **meta), guidance=torch.empty(1, **meta),
                img_ids=ids, txt_ids=torch.zeros(text_tokens, 3, device="meta"))


class FlashLikeAttention(torch.autograd.Function):
    """Attention as the GPU's flash / memory-efficient kernels run it: for the backward they keep q, k,
    v, the output and one logsumexp per head and token, never the token × token matrix that the
    meta device's math fallback would keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return FlashLikeAttention.apply(query, key, value)


def saved_bytes(model, kwargs, run) -> int:
    probe = SavedTensors(model.parameters())
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = flash_like_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
            run(**kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return probe.bytes


def block_bytes(model, kwargs) -> int:
    """Saved tensors of the largest single transformer block (what a checkpointed backward recomputes)."""
    tokens, text = kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1]
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    meta = dict(device="meta", dtype=torch.bfloat16)
    temb = torch.empty(1, dim, **meta)
    head = model.config.attention_head_dim
    rotary = (torch.empty(tokens + text, head, device="meta"), torch.empty(tokens + text, head, device="meta"))
    double = model.transformer_blocks[0]
    single = model.single_transformer_blocks[0]
    sizes = [
        saved_bytes(double, dict(hidden_states=torch.empty(1, tokens, dim, **meta),
                                 encoder_hidden_states=torch.empty(1, text, dim, **meta), temb=temb,
                                 image_rotary_emb=rotary), double),
        saved_bytes(single, dict(hidden_states=torch.empty(1, tokens, dim, **meta),
                                 encoder_hidden_states=torch.empty(1, text, dim, **meta), temb=temb,
                                 image_rotary_emb=rotary), single)]
    return max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = build(args.rank)
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    kwargs = inputs(model, args.resolution)
    full = saved_bytes(model, kwargs, model)
    model.enable_gradient_checkpointing()
    checkpointed = saved_bytes(model, kwargs, model) + block_bytes(model, kwargs)
    tokens = kwargs["hidden_states"].shape[1] + kwargs["encoder_hidden_states"].shape[1]
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    largest = tokens * dim * 4 * 2  # the feed-forward's hidden layer (4× width), bf16
    lora_state = lora * 4 * 4  # fp32 parameters, gradients and two AdamW moments
    rows = []
    for weights, per_param in (("bf16", 2), ("fp8", 1)):
        for label, activations in (("no", full), ("yes", checkpointed)):
            total = params * per_param + activations + lora_state + largest
            rows.append({"base weights": weights, "gradient checkpointing": label,
                         "weights GiB": params * per_param / GIB, "activations GiB": activations / GIB,
                         "peak GiB": total / GIB})
    print(f"Flux-dev transformer: {params / 1e9:.2f} B parameters; rank-{args.rank} LoRA on attention: "
          f"{lora / 1e6:.1f} M; {args.resolution}² = {kwargs['hidden_states'].shape[1]} image + "
          f"{kwargs['encoder_hidden_states'].shape[1]} text tokens")
    print("| base weights | gradient checkpointing | weights GiB | activations GiB | peak GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['base weights']} | {r['gradient checkpointing']} | {r['weights GiB']:.1f} | "
              f"{r['activations GiB']:.1f} | {r['peak GiB']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"resolution": args.resolution, "rank": args.rank, "parameters": params,
                                         "lora_parameters": lora, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
