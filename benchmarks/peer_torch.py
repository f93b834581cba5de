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
    uses (ResBlock-attention-ResBlock). The unused cross-attention input is a (B, 1, 8) tensor of
    zeros that no layer reads.
  SD ("sd" kind, the latent job of `configs/sr.py:sd`): the teacher folder's own U-Net
    (`UNet2DConditionModel.from_pretrained`, the weights cdd_jax loads) and
    `ControlNetModel.from_unet` of it, cross-attending to the folder's stored prompt embedding
    [1, 77, D] (broadcast to the batch; frozen, counted as cdd_jax counts its `text/embeds`). The
    clean images are encoded once with the folder's VAE (`AutoencoderKL`, posterior mean x
    scaling factor, as cdd_jax's `LatentSpace`): neither side encodes in the timed step. The
    network predicts epsilon on SD's discrete schedule read at continuous t (cdd_jax's
    `scaled_linear`); timesteps t x 1000.
  Both CoDi peers: the condition embedder is set to cdd_jax's (`cond_embedder_convs`: 3x3 convs
    at full resolution, the last log2(latent factor) with stride 2 down to the latent resolution,
    then conv_out; diffusers' own adds a same-width conv before each stride-2 one), and a zero-init
    3x3 "input gate" conv adds the embedded condition to the backbone's conv_in output, as
    cdd_jax's control encoder does (control.input_gate). ControlNet's zero 1x1 convs are cdd_jax's
    "conv1x1" gates.
Training steps (the same work as cdd_jax.train.step): loss, backward, global-norm clipping at 1,
AdamW (foreach), evaluation EMA and, for CoDi, target EMA updates with torch._foreach_lerp_.
The CoDi step runs the online network with gradients and the target network under no_grad, at
(alpha, sigma) of the grid times from cdd_jax's own schedule.
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
from benchmarks.contenders import KINDS, SD_VARIANTS, VARIANTS, make_config, real_batch  # noqa: E402


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


def cond_embedder_convs(hidden, out_ch: int, in_ch: int = 3,
                        num_downsample: int = 0) -> list[tuple[int, int, int]]:
    """(in, out, stride) of each 3x3 conv of cdd_jax's condition embedder
    (`cdd_jax.models.control.CondEmbedder`): the `hidden` widths, the last `num_downsample` of
    them with stride 2, then conv_out to `out_ch` (stride 1); SiLU after each but the last."""
    hidden = [int(h) for h in hidden]
    if num_downsample > len(hidden):
        raise ValueError(f"{len(hidden)} hidden convs cannot downsample {num_downsample} times")
    ins = [int(in_ch), *hidden]
    strides = [1] * (len(hidden) - num_downsample) + [2] * num_downsample + [1]
    return list(zip(ins, [*hidden, int(out_ch)], strides, strict=True))


class ControlledUNet:
    """Backbone + ControlNet + input gate: `forward(z, t, cond) -> prediction` (NCHW), the
    backbone cross-attending to `context` [1, T, D] broadcast to the batch. Build with `pixel`
    or `from_folder`."""

    def __init__(self, unet, control, control_cfg, context, num_downsample: int = 0,
                 device=None):
        from torch import nn

        self.unet, self.control = unet, control
        width = unet.config.block_out_channels[0]
        # cdd_jax's condition embedder in place of ControlNet's (module doc).
        convs = [nn.Conv2d(a, b, 3, stride=st, padding=1) for a, b, st in cond_embedder_convs(
            control_cfg.cond_embed_ch, width, control_cfg.cond_channels, num_downsample)]
        emb = control.controlnet_cond_embedding
        emb.conv_in, emb.blocks, emb.conv_out = convs[0], nn.ModuleList(convs[1:-1]), convs[-1]
        if control_cfg.cond_embed_zero_init:
            nn.init.zeros_(emb.conv_out.weight)
            nn.init.zeros_(emb.conv_out.bias)
        self.input_gate = None
        if control_cfg.input_gate:
            self.input_gate = nn.Conv2d(width, width, 3, padding=1)
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
        self._ctx = context.to(device)

    @classmethod
    def pixel(cls, model_cfg, control_cfg, size: int, device=None) -> ControlledUNet:
        """The cdd_jax pixel U-Net's shapes (module doc): self-attention blocks, UNet2DModel's
        mid block, a cross-attention input of zeros that no layer reads."""
        import torch
        from diffusers import ControlNetModel, UNet2DConditionModel

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
        unet = UNet2DConditionModel(**kw, mid_block_type="UNetMidBlock2D", cross_attention_dim=8)
        control = ControlNetModel(**enc_kw, mid_block_type="UNetMidBlock2D",
                                  cross_attention_dim=8, conditioning_embedding_out_channels=(16,))
        c_mid = kw["block_out_channels"][-1]
        unet.mid_block = _mid_block(c_mid, model_cfg)
        control.mid_block = _mid_block(c_mid, model_cfg)
        return cls(unet, control, control_cfg, torch.zeros(1, 1, 8), 0, device)

    @classmethod
    def from_folder(cls, folder: str, control_cfg, latent_factor: int,
                    device=None) -> ControlledUNet:
        """An SD-style teacher folder's U-Net, `ControlNetModel.from_unet` of it (the encoder
        copied) and the folder's stored prompt embedding."""
        import torch
        from diffusers import ControlNetModel, UNet2DConditionModel

        from cdd_jax.convert.sd import load_prompt_embeds

        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        control = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(control_cfg.cond_embed_ch))
        embeds = torch.from_numpy(load_prompt_embeds(folder))
        return cls(unet, control, control_cfg, embeds, int(latent_factor).bit_length() - 1,
                   device)

    def parameters(self):
        return self.modules.parameters()

    def forward(self, z, t, cond):
        ctx = self._ctx.expand(z.shape[0], *self._ctx.shape[1:])
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


def _schedule_grid(name: str, n: int) -> list[list[float]]:
    """[alpha, sigma] of cdd_jax's schedule `name` at t = k / n, k = 0..n, computed in a child
    process: a JAX backend started in the peer's process may slow PyTorch's CPU threads (seen
    once on the loaded 2-core machine, not settled), so the peer never starts one."""
    import json
    import subprocess

    code = ("import json, sys, numpy as np; from cdd_jax.diffusion import get_schedule; "
            "n = int(sys.argv[2]); "
            "a, s = get_schedule(sys.argv[1]).alpha_sigma(np.arange(n + 1) / n); "
            "print(json.dumps([np.asarray(a).tolist(), np.asarray(s).tolist()]))")
    out = subprocess.run([sys.executable, "-c", code, name, str(n)], capture_output=True,
                         text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _vae_latents(folder: str, images):
    """Images (NCHW in [-1, 1]) -> the folder VAE's latents: posterior mean x scaling factor."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(images.device)
    with torch.no_grad():
        return vae.encode(images).latent_dist.mode() * vae.config.scaling_factor


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
        update: bool = True,
    ):
        """`update=False`: the loss and its backward alone (no clipping, AdamW or EMA)."""
        import torch

        self.kind = kind
        self.update = update
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
        # cdd_jax counts its frozen prompt embedding (`text/embeds`) among the parameters.
        self.num_params = sum(p.numel() for p in params) + getattr(self, "num_frozen", 0)
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
            "update": update,
            "batch_size": self.n,
            "crop_size": size,
            "num_frozen_params": getattr(self, "num_frozen", 0),
            "sample_shape": list(self.x.shape),
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
            self._build_codi(config, batch)
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

    def _build_codi(self, config, batch: dict) -> None:
        """The condition, the online and target networks, the CoDi settings; for "sd" the clean
        images become the folder VAE's latents (once, here: not part of the timed step)."""
        import numpy as np
        import torch

        d = config.distill
        implemented = dict(objective="codi", predictor="prev", boundary="real_noise", d_eps="l2",
                           d_x="l2", eps_weighting="none", per_example_t=False)
        if wrong := {k: d[k] for k, v in implemented.items() if d[k] != v}:
            raise ValueError(f"the peer implements CoDi with {implemented}, not {wrong}")
        self.prediction_type = config.diffusion.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"the peer reads epsilon or v, not {self.prediction_type!r}")
        self.lambda_x = float(d.lambda_x)
        self.grid_n = int(d.num_grid_steps)
        grid = _schedule_grid(config.diffusion.schedule, self.grid_n)
        self.grid_alpha, self.grid_sigma = (torch.tensor(a, device=self.device) for a in grid)
        self.time_scale = float(config.model.num_train_timesteps)
        self.cond = torch.from_numpy(np.ascontiguousarray(batch["cond"].transpose(0, 3, 1, 2)))
        self.cond = self.cond.to(self.device)
        if self.kind == "sd":
            folder, factor = config.teacher.checkpoint, config.model.latent_factor
            self.x = _vae_latents(folder, self.x)

            def make():
                return ControlledUNet.from_folder(folder, config.control, factor, self.device)
        else:
            def make():
                return ControlledUNet.pixel(config.model, config.control,
                                            config.data.crop_size, self.device)
        self.net = make()
        # A second instance (its hooks close over itself), holding a copy of the weights.
        self.target = make()
        self.target.modules.load_state_dict(self.net.modules.state_dict())
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.num_frozen = self.net._ctx.numel() if self.kind == "sd" else 0

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

    def _denoise(self, z, out, a, s):
        """(x_hat, eps_hat) from the network output in its prediction type."""
        if self.prediction_type == "epsilon":
            return (z - s * out) / a, out
        return a * z - s * out, s * z + a * out

    def _loss_codi(self):
        import torch

        k = int(torch.randint(1, self.grid_n + 1, ()))
        t = torch.full((self.n,), k / self.grid_n, device=self.device)
        s = torch.full((self.n,), (k - 1) / self.grid_n, device=self.device)
        a_t, s_t = self.grid_alpha[k], self.grid_sigma[k]
        a_s, s_s = self.grid_alpha[k - 1], self.grid_sigma[k - 1]
        eps = torch.randn_like(self.x)
        z_t = a_t * self.x + s_t * eps
        with self._autocast():
            out = self.net(z_t, t * self.time_scale, self.cond).float()
        x_hat, eps_hat = self._denoise(z_t, out, a_t, s_t)
        z_s = (a_s * x_hat + s_s * eps).detach()  # PREv: the real noise
        with torch.no_grad():
            with self._autocast():
                out_minus = self.target(z_s, s * self.time_scale, self.cond).float()
            eps_minus = self._denoise(z_s, out_minus, a_s, s_s)[1]
            if k == 1:
                eps_minus = eps
        return (torch.mean((eps_hat - eps_minus) ** 2)
                + self.lambda_x * torch.mean((self.x - x_hat) ** 2))

    def step(self) -> None:
        import torch

        loss = self._loss_pretrain() if self.kind == "pretrain" else self._loss_codi()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if not self.update:
            return
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - self.ema_decay)
            if self.kind != "pretrain":
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
    p.add_argument("--kind", default="codi", choices=KINDS)
    p.add_argument("--variant", default="default", choices=VARIANTS + SD_VARIANTS)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    bench = PeerTrainStep(args.kind, args.variant)
    print({k: v for k, v in bench.info.items()})
    res = bench.run(args.steps)
    print("steps wall (s):", [round(x, 3) for x in res["step"]])
    print("steps cpu (s):", [round(x, 3) for x in res["step_cpu"]])


if __name__ == "__main__":
    main()
