"""The conditional network: the pretrained U-Net (either family of `cdd_jax.models.backbone`)
plus the control encoder, a duplicated and gated copy of its encoder.

Paper eq. 10: h'_l = h_l(z_t) + mu_l * h^c_l(z_t, c), with mu_l = 0 at initialisation, so the
conditional network computes exactly the unconditional teacher until the gates open.

Parameter tree (top level):
    unet/     the teacher's parameters (frozen in PE-CoDi)
    control/  the encoder half of the teacher, under the teacher's own names (copied from it, see
              `init_from_teacher`): time_embed, encoder, middle ("cdd" family) or
              time_embedding, conv_in, down_blocks_*, mid_block ("unet2d")
              cond_embed                     (small conv stack for the condition, zero-init output)
              gate_skip_{i}, gate_middle     (scalar mu per level, or zero-init 1x1 convs)
              input_gate                     (optional zero-init conv: condition -> main input)
    text/     ("unet2d_condition" only) `embeds` [1, T, D]: the fixed prompt embedding the U-Net
              cross-attends to (for SR the empty prompt's), stored with the teacher; frozen

Latent space ("unet2d_condition" on an autoencoder's latents): z_t has the latent resolution and
the condition image the full one, `latent_factor` times larger; the condition embedder ends with
log2(latent_factor) stride-2 convolutions, so it maps the full-resolution condition to the latent
resolution (as ControlNet's conditioning embedder does).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cdd_jax import config_checks as checks
from cdd_jax.diffusion import get_schedule
from cdd_jax.models.backbone import (
    Backbone,
    backbone_from_config,
    base_width,
    encoder_features,
    timestep_scale,
)
from cdd_jax.models.layers import Conv

Dtype = Any


def control_config() -> ml_collections.ConfigDict:
    """The `control` section: the duplicated, gated encoder and its condition embedder."""
    c = ml_collections.ConfigDict()
    c.gate = "conv1x1"  # "scalar": one mu per level (paper eq. 10); "conv1x1": ControlNet-style.
    c.cond_embed_ch = (16, 32)  # Widths of the condition embedder's hidden convs.
    c.cond_channels = 3  # Channels of the condition image (the upsampled low-res input).
    # Where a latent teacher's condition enters: "pixel" (the paper's: the full-resolution image,
    # the embedder's stride-2 convs bring it to the latent size) or "latent" (encoded with the
    # teacher's VAE like the clean image, the embedder at the latent size, no downsampling).
    c.cond_space = "pixel"
    c.input_gate = True  # Also add a zero-init conv of the embedded condition to the main input.
    # Zero-initialise the embedder's last conv (ControlNet does). False (default): the gates alone
    # keep the network equal to the teacher at init, and every gate receives a condition-dependent
    # gradient from step 1, so the control path opens faster.
    c.cond_embed_zero_init = False
    # Low-frequency anchor (a documented deviation from the paper, off by default): the network's
    # signal prediction x_hat takes its low frequencies partly from the condition,
    #     x_hat' = x_hat + gamma_t (lowpass(cond) - lowpass(x_hat)),
    #     gamma_t = p sigma_t^2 / (p sigma_t^2 + alpha_t^2),
    # the weight a Gaussian fusion gives an observation of precision p against z_t / alpha_t; so
    # the condition rules at high noise and z_t at low noise. lowpass = area-downsampling by
    # `anchor_factor` then bicubic upsampling. 0 = off (the network is exactly the paper's).
    c.anchor_precision = 0.0
    c.anchor_factor = 4  # Downsampling factor of the low-pass (the super-resolution factor).
    return c


GATES = ("scalar", "conv1x1")
COND_SPACES = ("pixel", "latent")


def validate_control_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError/TypeError naming the first bad `control` field."""
    checks.check_keys(cfg, control_config(), "control.")
    checks.choice(cfg, "gate", GATES, prefix="control.")
    checks.choice(cfg, "cond_space", COND_SPACES, prefix="control.")
    checks.positive_ints(cfg, "cond_embed_ch", prefix="control.")
    checks.number(cfg, "cond_channels", 1, integer=True, prefix="control.")
    for key in ("input_gate", "cond_embed_zero_init"):
        checks.boolean(cfg, key, prefix="control.")
    checks.number(cfg, "anchor_precision", 0, prefix="control.")
    checks.number(cfg, "anchor_factor", 1, integer=True, prefix="control.")


def lowpass(x: jax.Array, factor: int) -> jax.Array:
    """Area-downsamples NHWC images by `factor`, then upsamples them back (bicubic)."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"lowpass: image size {h}x{w} is not divisible by factor {factor}")
    small = x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return jax.image.resize(small, x.shape, method="cubic")


def anchor_low_frequencies(v_hat, z_t, t, cond, *, schedule, precision: float, factor: int):
    """The low-frequency anchor on a v-prediction (see `control_config`); returns v_hat'.

    With x_hat = alpha z - sigma v and x_hat' as in `control_config`, the v that gives x_hat'
    from the same z_t is v' = v - (x_hat' - x_hat) / sigma = v - gamma (lp(c) - lp(x_hat)) / sigma,
    where gamma / sigma = p sigma / (p sigma^2 + alpha^2) stays bounded as sigma -> 0.
    """
    alpha, sigma = schedule.alpha_sigma(t)
    alpha = alpha.reshape(-1, 1, 1, 1)
    sigma = sigma.reshape(-1, 1, 1, 1)
    v_hat = v_hat.astype(jnp.float32)
    x_hat = alpha * z_t - sigma * v_hat
    scale = precision * sigma / (precision * sigma**2 + alpha**2)
    return v_hat - scale * (lowpass(cond.astype(jnp.float32), factor) - lowpass(x_hat, factor))


class ScalarGate(nn.Module):
    """h -> mu * h with a scalar mu initialised to zero (the paper's gate)."""

    @nn.compact
    def __call__(self, h):
        mu = self.param("mu", nn.with_logical_partitioning(nn.initializers.zeros, ()), ())
        return mu.astype(h.dtype) * h


class CondEmbedder(nn.Module):
    """Small conv stack mapping the condition image to the encoder's input width; its last
    `num_downsample` hidden convs have stride 2 (full resolution -> latent resolution)."""

    out_ch: int
    hidden: tuple[int, ...] = (16, 32)
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    num_downsample: int = 0

    @nn.compact
    def __call__(self, c):
        if self.num_downsample > len(self.hidden):
            raise ValueError(f"the condition embedder needs at least {self.num_downsample} "
                             f"hidden convs to downsample by {2 ** self.num_downsample}, has "
                             f"{len(self.hidden)} (control.cond_embed_ch)")
        h = c.astype(self.dtype)
        first_strided = len(self.hidden) - self.num_downsample
        for i, width in enumerate(self.hidden):
            stride = 2 if i >= first_strided else 1
            h = nn.silu(Conv(width, strides=stride, dtype=self.dtype, name=f"conv_{i}")(h))
        return Conv(self.out_ch, zero_init=self.zero_init, dtype=self.dtype, name="conv_out")(h)


class ControlEncoder(nn.Module):
    """The duplicated encoder: sees z_t and the condition, returns gated residuals."""

    unet: Backbone
    gate: str = "conv1x1"
    cond_embed_ch: tuple[int, ...] = (16, 32)
    input_gate: bool = True
    cond_embed_zero_init: bool = False
    num_downsample: int = 0  # log2 of the condition's size over z_t's (latent space)

    def _gate(self, h, name):
        if self.gate == "scalar":
            return ScalarGate(name=name)(h)
        return Conv(h.shape[-1], kernel_size=1, zero_init=True, dtype=self.unet.dtype, name=name)(h)

    @nn.compact
    def __call__(self, z_t, t, cond, train: bool, context=None):
        """`t`: the backbone's own time input; `context`: prompt embeddings (or None)."""
        u = self.unet
        width = base_width(u)
        c_emb = CondEmbedder(width, self.cond_embed_ch, self.cond_embed_zero_init, u.dtype,
                             self.num_downsample, name="cond_embed")(cond)
        skips, mid = encoder_features(u, z_t, t, train=train, input_residual=c_emb,
                                      context=context)
        skip_res = [self._gate(h, f"gate_skip_{i}") for i, h in enumerate(skips)]
        mid_res = self._gate(mid, "gate_middle")
        input_res = None
        if self.input_gate:
            input_res = Conv(width, zero_init=True, dtype=u.dtype, name="input_gate")(c_emb)
        return skip_res, mid_res, input_res


class PromptEmbedding(nn.Module):
    """The fixed prompt embedding [1, T, D] (parameter `embeds`, copied from the teacher's
    stored one and frozen), broadcast to the batch."""

    tokens: int
    width: int

    @nn.compact
    def __call__(self, batch: int) -> jax.Array:
        e = self.param("embeds", nn.initializers.zeros, (1, self.tokens, self.width))
        return jnp.broadcast_to(e, (batch, self.tokens, self.width))


def per_example_context(prompt_embeds, batch: int, width: int, dtype) -> jax.Array:
    """Per-example prompt embeddings [B, T', D] checked against the network: B the batch and D
    the U-Net's cross-attention width (`model.prompt_embed_dim`); any number of tokens T'."""
    shape = tuple(prompt_embeds.shape)
    if len(shape) != 3 or shape[0] != batch or shape[2] != width:
        raise ValueError(f"per-example prompt embeddings must have shape [batch={batch}, tokens, "
                         f"width={width}] (the teacher U-Net's cross-attention width, "
                         f"model.prompt_embed_dim); got {shape}")
    return jnp.asarray(prompt_embeds, dtype)


class ConditionalUNet(nn.Module):
    """`apply({'params': p}, z_t, t, cond, train=False) -> the network output` (in the
    teacher's parameterisation)."""

    unet: Backbone
    gate: str = "conv1x1"
    cond_embed_ch: tuple[int, ...] = (16, 32)
    input_gate: bool = True
    cond_embed_zero_init: bool = False
    anchor_precision: float = 0.0
    anchor_factor: int = 4
    schedule: str = "cosine"  # Noise schedule name; only read by the low-frequency anchor.
    timestep_scale: float = 1.0  # Backbone time input per unit of t (`backbone.timestep_scale`).
    latent_factor: int = 1  # Condition size over z_t's size (the autoencoder's downsampling;
    # 1 for a condition encoded into the latent space, control.cond_space="latent").
    prompt_tokens: int = 0  # > 0: a "unet2d_condition" backbone reading a fixed prompt embedding.

    @classmethod
    def from_config(cls, model_cfg, control_cfg, schedule: str = "cosine", *,
                    image_size: int, latent_factor: int = 1,
                    prompt_tokens: int = 0) -> ConditionalUNet:
        """`schedule`: the diffusion schedule's name (config.diffusion.schedule); `image_size`:
        the training crop size (fixes a "unet2d" backbone's block types); `latent_factor`: the
        condition's size over z_t's; `prompt_tokens`: tokens of the fixed prompt embedding."""
        validate_control_config(control_cfg)
        unet = backbone_from_config(model_cfg, image_size // latent_factor)
        if control_cfg.cond_space == "latent":
            if latent_factor == 1 and model_cfg.family != "unet2d_condition":
                raise ValueError("control.cond_space='latent' encodes the condition with a "
                                 "latent teacher's VAE; this teacher works in pixel space")
            latent_factor = 1  # The condition arrives at z_t's size.
        if (model_cfg.family == "unet2d_condition") != (prompt_tokens > 0):
            raise ValueError("a unet2d_condition backbone needs a prompt embedding "
                             "(prompt_tokens > 0) and the other families take none")
        return cls(
            unet=unet,
            latent_factor=int(latent_factor),
            prompt_tokens=int(prompt_tokens),
            timestep_scale=timestep_scale(model_cfg),
            gate=control_cfg.gate,
            cond_embed_ch=tuple(control_cfg.cond_embed_ch),
            input_gate=bool(control_cfg.input_gate),
            cond_embed_zero_init=bool(control_cfg.cond_embed_zero_init),
            anchor_precision=float(control_cfg.anchor_precision),
            anchor_factor=int(control_cfg.anchor_factor),
            schedule=str(schedule),
        )

    @nn.compact
    def __call__(self, z_t, t, cond, train: bool = False, prompt_embeds=None):
        """`prompt_embeds`: optional per-example prompt embeddings [B, T', D] that replace the
        stored fixed embedding (a text-conditioned network only; D its cross-attention width)."""
        f = self.latent_factor
        want = (z_t.shape[0], z_t.shape[1] * f, z_t.shape[2] * f)
        if cond is None or cond.ndim != 4 or tuple(cond.shape[:3]) != want:
            raise ValueError(
                f"the condition must be an NHWC image of batch and spatial size {want} (z_t "
                f"{tuple(z_t.shape)}, latent factor {f}); got "
                f"{None if cond is None else tuple(cond.shape)}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z_t.shape[0],))
        t_net = t if self.timestep_scale == 1.0 else t * self.timestep_scale
        context, text = None, {}
        if self.prompt_tokens:
            width = self.unet.config["cross_attention_dim"]
            context = PromptEmbedding(self.prompt_tokens, width, name="text")(z_t.shape[0])
            if prompt_embeds is not None:
                context = per_example_context(prompt_embeds, z_t.shape[0], width, context.dtype)
            text = {"encoder_hidden_states": context}
        elif prompt_embeds is not None:
            raise ValueError("prompt embeddings were given, but this network takes no text "
                             "(only a model.family='unet2d_condition' teacher reads them)")
        control = ControlEncoder(self.unet.clone(parent=None), self.gate, self.cond_embed_ch,
                                 self.input_gate, self.cond_embed_zero_init,
                                 int(f).bit_length() - 1, name="control")
        skip_res, mid_res, input_res = control(z_t, t_net, cond, train, context)
        v_hat = self.unet(z_t, t_net, train=train, skip_residuals=skip_res,
                          middle_residual=mid_res, input_residual=input_res, **text)
        if self.anchor_precision > 0:
            v_hat = anchor_low_frequencies(v_hat, z_t, t, cond,
                                           schedule=get_schedule(self.schedule),
                                           precision=self.anchor_precision,
                                           factor=self.anchor_factor)
        return v_hat


def init_from_teacher(cond_params: dict, teacher_params: dict,
                      prompt_embeds: jax.Array | None = None) -> dict:
    """Conditional parameters with the backbone AND the duplicated encoder copied from the teacher
    (and, for a text-conditioned teacher, its stored prompt embedding [1, T, D]).

    Raises ValueError naming the first mismatching path when the teacher's architecture does not
    match the configured U-Net.
    """
    cond_params = dict(cond_params)
    if ("text" in cond_params) != (prompt_embeds is not None):
        raise ValueError("a text-conditioned network needs the teacher's prompt embedding, and "
                         "only it takes one")
    if prompt_embeds is not None:
        want = cond_params["text"]["embeds"].shape
        if tuple(prompt_embeds.shape) != tuple(want):
            raise ValueError(f"the teacher's prompt embedding has shape "
                             f"{tuple(prompt_embeds.shape)}, the network expects {tuple(want)}")
        cond_params["text"] = {"embeds": jnp.asarray(prompt_embeds, jnp.float32)}
    check_same_structure(teacher_params, cond_params["unet"], "teacher", "model.unet")
    cond_params["unet"] = teacher_params
    control = dict(cond_params["control"])
    for part in sorted(set(control) & set(teacher_params)):  # the duplicated encoder half
        check_same_structure(teacher_params[part], control[part], f"teacher/{part}",
                             f"control/{part}")
        control[part] = teacher_params[part]
    cond_params["control"] = control
    return cond_params


def check_same_structure(a: dict, b: dict, name_a: str, name_b: str) -> None:
    """ValueError naming the first path whose presence or shape differs between two trees."""
    fa = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(a)}
    fb = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(b)}
    for k in sorted(set(fa) | set(fb)):
        if k not in fa or k not in fb:
            where = name_a if k not in fa else name_b
            raise ValueError(
                f"architecture mismatch: parameter {k} is missing from {where} "
                f"({name_a}: {len(fa)} tensors, {name_b}: {len(fb)} tensors); check model.* in "
                "the config against the teacher checkpoint"
            )
        if jnp.shape(fa[k]) != jnp.shape(fb[k]):
            raise ValueError(
                f"architecture mismatch at {k}: {name_a} has shape {jnp.shape(fa[k])}, "
                f"{name_b} has {jnp.shape(fb[k])}; check model.* in the config"
            )
