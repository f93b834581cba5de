"""The PyTorch peer: the cdd_jax U-Net shapes in diffusers, trained by the same steps.

Runs on the CPU, or on CUDA when torch sees a GPU (TF32 allowed as XLA's default precision allows
it, cuDNN autotuning, a synchronisation after each timed step; bf16 through autocast). Needs the
optional `peers` extra (`pip install -e '.[peers]'`: torch==2.13.0, the CPU wheel, and diffusers
0.42; on a GPU machine, its own CUDA torch). Imported by `train_step.py` and `sampling.py`; run
alone it prints the shape match (parameter counts, layer FLOPs) and a few step times:

    python benchmarks/peer_torch.py [--kind=codi] [--variant=default]

Shape mapping from a cdd_jax `model` config (crop size S, levels i = 0..L-1 at S / 2**i px):
  pretraining: `UNet2DModel`, block_out_channels = ch * ch_mult, layers_per_block =
    num_res_blocks, "AttnDownBlock2D" / "AttnUpBlock2D" at the levels whose size is in
    attn_resolutions, otherwise "DownBlock2D" / "UpBlock2D"; the mid block is ResBlock-attention-
    ResBlock; norm_num_groups = num_groups; attention_head_dim = head_dim; time embedding 4 ch.
  CoDi: `UNet2DModel` cannot take ControlNet residuals, so the backbone is a
    `UNet2DConditionModel` with the same (self-attention only) blocks, plus a `ControlNetModel` of
    the same encoder. diffusers' mid-block options for these classes are cross-attention or a
    single ResBlock, so both mid blocks are replaced by the `UNetMidBlock2D` that `UNet2DModel`
    uses (ResBlock-attention-ResBlock). The condition embedder is set to cdd_jax's (3x3 convs
    3->16->32 at full resolution, zero-init 3x3 conv out; diffusers' default downsamples 8x for
    latents), and a zero-init 3x3 "input gate" conv adds the embedded condition to the backbone's
    conv_in output, as cdd_jax's control encoder does (control.input_gate). The unused
    cross-attention input is a (B, 1, 8) tensor of zeros that no layer reads.
Training steps (the same work as cdd_jax.train.step): loss, backward, global-norm clipping at 1,
AdamW (foreach), evaluation EMA and, for CoDi, target EMA updates with torch._foreach_lerp_.
The CoDi step runs the online network with gradients and the target network under no_grad.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Bench, time_calls  # noqa: E402
from benchmarks.contenders import VARIANTS, make_config, real_batch  # noqa: E402


def _levels(model_cfg, size: int) -> list[tuple[int, int, bool]]:
    """(channels, resolution, attention?) per level."""
    return [
        (model_cfg.ch * m, size // 2**i, size // 2**i in tuple(model_cfg.attn_resolutions))
        for i, m in enumerate(model_cfg.ch_mult)
    ]


def unet_kwargs(model_cfg, size: int) -> dict[str, Any]:
    """diffusers UNet2DModel / UNet2DConditionModel keyword arguments for a cdd_jax model config."""
    levels = _levels(model_cfg, size)
    groups = int(model_cfg.num_groups)
    for c, _, _ in levels:
        if c % groups:
            raise ValueError(f"diffusers needs channels ({c}) divisible by num_groups ({groups})")
    return dict(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(c for c, _, _ in levels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for _, _, a in levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for _, _, a in reversed(levels)),
        layers_per_block=int(model_cfg.num_res_blocks),
        norm_num_groups=groups,
        attention_head_dim=_head_dim(model_cfg),
    )


def _head_dim(model_cfg) -> int:
    """cdd_jax uses max(1, C // head_dim) heads, i.e. one head of C channels when C < head_dim."""
    narrowest = model_cfg.ch * min(model_cfg.ch_mult)
    return min(int(model_cfg.head_dim), narrowest)


def build_unet2d(model_cfg, size: int):
    """The pretraining peer: diffusers UNet2DModel with the cdd_jax U-Net's shapes."""
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_kwargs(model_cfg, size), add_attention=True)


def _mid_block(channels: int, model_cfg):
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    return UNetMidBlock2D(
        in_channels=channels,
        temb_channels=4 * model_cfg.ch,
        attention_head_dim=_head_dim(model_cfg),
        resnet_groups=int(model_cfg.num_groups),
        add_attention=True,
    )


class ControlledUNet:
    """Backbone + ControlNet + input gate: `forward(z, t, cond) -> v_hat` (NCHW)."""

    def __init__(self, model_cfg, control_cfg, size: int, device=None):
        import torch
        from diffusers import ControlNetModel, UNet2DConditionModel
        from torch import nn

        kw = unet_kwargs(model_cfg, size)
        enc_kw = {
            k: kw[k]
            for k in (
                "in_channels",
                "block_out_channels",
                "down_block_types",
                "layers_per_block",
                "norm_num_groups",
                "attention_head_dim",
            )
        }
        self.unet = UNet2DConditionModel(
            **kw, mid_block_type="UNetMidBlock2D", cross_attention_dim=8
        )
        self.control = ControlNetModel(
            **enc_kw,
            mid_block_type="UNetMidBlock2D",
            cross_attention_dim=8,
            conditioning_embedding_out_channels=(16,),
        )
        c_mid = kw["block_out_channels"][-1]
        self.unet.mid_block = _mid_block(c_mid, model_cfg)
        self.control.mid_block = _mid_block(c_mid, model_cfg)
        # cdd_jax's condition embedder: 3 -> hidden... at full resolution (no 2x downsampling).
        hidden = tuple(int(h) for h in control_cfg.cond_embed_ch)
        emb = self.control.controlnet_cond_embedding
        emb.conv_in = nn.Conv2d(3, hidden[0], 3, padding=1)
        emb.blocks = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=1) for a, b in zip(hidden[:-1], hidden[1:], strict=True)
        )
        emb.conv_out = nn.Conv2d(hidden[-1], model_cfg.ch, 3, padding=1)
        nn.init.zeros_(emb.conv_out.weight)
        nn.init.zeros_(emb.conv_out.bias)
        self.input_gate = None
        if control_cfg.input_gate:
            self.input_gate = nn.Conv2d(model_cfg.ch, model_cfg.ch, 3, padding=1)
            nn.init.zeros_(self.input_gate.weight)
            nn.init.zeros_(self.input_gate.bias)
            self._c_emb = None
            emb.register_forward_hook(lambda m, i, o: setattr(self, "_c_emb", o))
            self.unet.conv_in.register_forward_hook(
                lambda m, i, o: o + self.input_gate(self._c_emb)
            )
        self.modules = nn.ModuleList(
            [self.unet, self.control] + ([self.input_gate] if self.input_gate is not None else [])
        )
        if device is not None:
            self.modules.to(device)
        self._ctx = torch.zeros(1, 1, 8, device=device)

    def parameters(self):
        return self.modules.parameters()

    def forward(self, z, t, cond):
        ctx = self._ctx.expand(z.shape[0], 1, 8)
        down, mid = self.control(z, t, ctx, cond, return_dict=False)
        return self.unet(
            z,
            t,
            ctx,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    __call__ = forward


def _alpha_sigma(t):
    import torch

    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def _b(x):
    return x[:, None, None, None]


class PeerTrainStep(Bench):
    """One PyTorch training step of the pretraining or the CoDi objective (see module doc)."""

    def __init__(
        self,
        kind: str,
        variant: str = "default",
        warmup: int = 3,
        threads: int = 0,
        dtype: str = "float32",
        batch_size: int | None = None,
        crop_size: int | None = None,
    ):
        import torch

        self.kind = kind
        self._use_device(threads, dtype)
        config = make_config(kind, variant, batch_size, crop_size)
        size = config.data.crop_size
        params, groups = self._build_nets(config, real_batch(config, kind))
        self.params = params
        self.ema = [p.detach().clone() for p in params]
        o = config.optim
        self.opt = torch.optim.AdamW(
            groups, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay, foreach=True
        )
        self.clip = float(o.grad_clip)
        self.num_params = sum(p.numel() for p in params)
        t0 = time.perf_counter()
        self.step()
        first = time.perf_counter() - t0
        warm = self.timed_steps(warmup)[0]
        self.info = {
            "kind": kind,
            "variant": variant,
            "num_params": self.num_params,
            "first_step_s": first,
            "warmup_s": warm,
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "device": str(torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"),
            "dtype": dtype,
            "batch_size": self.n,
            "crop_size": size,
            "layer_flops_per_step": self.count_flops(),
        }

    def _use_device(self, threads: int, dtype: str) -> None:
        """Threads, seed, device and the autocast context of `dtype`."""
        import contextlib

        import torch

        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        # On a GPU: CUDA, with TF32 allowed for f32 matmuls as XLA's default precision allows it
        # (PyTorch allows it for cuDNN convolutions already); bf16 through autocast, as cdd_jax's
        # model.dtype = "bfloat16" computes in bf16 with float32 parameters.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self._autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if dtype == "bfloat16"
            else contextlib.nullcontext
        )

    def _build_nets(self, config, batch: dict) -> tuple[list, list[dict]]:
        """The batch on the device, the network(s) of `self.kind`, their trained parameters and
        optimiser groups."""
        import numpy as np
        import torch

        size = config.data.crop_size
        self.x = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
        self.x = self.x.to(self.device)
        self.n = self.x.shape[0]
        if self.kind == "pretrain":
            self.net = build_unet2d(config.model, size).to(self.device)
            params = list(self.net.parameters())
            self.forward = lambda z, t: self.net(z, t, return_dict=False)[0]
            groups = [{"params": params, "lr": config.optim.lr}]
            self.ema_decay = config.ema.decay
        else:
            self.cond = torch.from_numpy(np.ascontiguousarray(batch["cond"].transpose(0, 3, 1, 2)))
            self.cond = self.cond.to(self.device)
            self.net = ControlledUNet(config.model, config.control, size, self.device)
            # A second instance (its hooks close over itself), holding a copy of the weights.
            self.target = ControlledUNet(config.model, config.control, size, self.device)
            self.target.modules.load_state_dict(self.net.modules.state_dict())
            for p in self.target.parameters():
                p.requires_grad_(False)
            self.grid_n = int(config.distill.num_grid_steps)
            backbone = list(self.net.unet.parameters())
            new = [p for m in self.net.modules[1:] for p in m.parameters()]
            params = backbone + new
            groups = [
                {"params": backbone, "lr": config.optim.lr},
                {"params": new, "lr": config.optim.new_lr},
            ]
            self.ema_decay = config.distill.eval_ema.decay
            self.target_decay = config.distill.target_ema.decay
            self.target_params = list(self.target.parameters())
        return params, groups

    # ---- the steps --------------------------------------------------------------------------

    def _loss_pretrain(self):
        import torch

        t = torch.rand(self.n, device=self.device)
        a, s = _alpha_sigma(t)
        eps = torch.randn_like(self.x)
        z = _b(a) * self.x + _b(s) * eps
        with self._autocast():
            v = self.forward(z, t * 1000.0).float()
        return torch.mean((v - (_b(a) * eps - _b(s) * self.x)) ** 2)

    def _loss_codi(self):
        import torch

        k = int(torch.randint(1, self.grid_n + 1, ()))
        t = torch.full((self.n,), k / self.grid_n, device=self.device)
        s = torch.full((self.n,), (k - 1) / self.grid_n, device=self.device)
        a_t, s_t = _alpha_sigma(t)
        a_s, s_s = _alpha_sigma(s)
        eps = torch.randn_like(self.x)
        z_t = _b(a_t) * self.x + _b(s_t) * eps
        with self._autocast():
            v = self.net(z_t, t * 1000.0, self.cond).float()
        x_hat = _b(a_t) * z_t - _b(s_t) * v
        eps_hat = _b(s_t) * z_t + _b(a_t) * v
        z_s = (_b(a_s) * x_hat + _b(s_s) * eps).detach()  # PREv: the real noise
        with torch.no_grad():
            with self._autocast():
                v_minus = self.target(z_s, s * 1000.0, self.cond).float()
            eps_minus = _b(s_s) * z_s + _b(a_s) * v_minus
            if k == 1:
                eps_minus = eps
        return torch.mean((eps_hat - eps_minus) ** 2) + torch.mean((self.x - x_hat) ** 2)

    def step(self) -> None:
        import torch

        loss = self._loss_pretrain() if self.kind == "pretrain" else self._loss_codi()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - self.ema_decay)
            if self.kind == "codi":
                torch._foreach_lerp_(
                    self.target_params, [p.detach() for p in self.params], 1 - self.target_decay
                )

    def timed_steps(self, n: int) -> tuple[list[float], list[float]]:
        """(wall, cpu) seconds of `n` steps (eager PyTorch on the CPU returns when the step is
        done; on a GPU each step is followed by a device synchronisation)."""
        import torch

        if self.device.type == "cuda":
            return time_calls(lambda: (self.step(), torch.cuda.synchronize()), n)
        return time_calls(self.step, n)

    def run(self, n: int) -> dict[str, list[float]]:
        wall, cpu = self.timed_steps(n)
        return {"step": wall, "step_cpu": cpu}

    def count_flops(self) -> float:
        """Convolution / matmul / attention FLOPs of one step (torch's FlopCounterMode)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.step()
        return float(counter.get_total_flops())


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="codi", choices=("pretrain", "codi"))
    p.add_argument("--variant", default="default", choices=VARIANTS)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    bench = PeerTrainStep(args.kind, args.variant)
    print({k: v for k, v in bench.info.items()})
    res = bench.run(args.steps)
    print("steps wall (s):", [round(x, 3) for x in res["step"]])
    print("steps cpu (s):", [round(x, 3) for x in res["step_cpu"]])


if __name__ == "__main__":
    main()
