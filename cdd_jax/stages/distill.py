"""Stage 2: the conditional network (teacher U-Net + control encoder) trained with
`distill.objective` on degraded/clean pairs made on the fly (or on given aligned pairs,
`data.source` "paired_folders" / "tfds_paired").

Latent teachers (`model.family = "unet2d_condition"`): the clean image is encoded with the
teacher's VAE before each step (`Job.prepare_batch`; the VAE stays out of the train state), so
the objective, d_x included, lives in the latent space; the condition stays a full-resolution
image; samples are decoded through the VAE before any metric."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cdd_jax.convert.sd import load_prompt_embeds, load_vae
from cdd_jax.data.captions import check_caption_shapes
from cdd_jax.data.pipeline import build_train_dataset, make_sr_transform
from cdd_jax.diffusion import Schedule, get_schedule
from cdd_jax.distill.codi import condition_image
from cdd_jax.distill.objectives import compute_loss, objective_spec
from cdd_jax.distill.sampling import few_step_sample
from cdd_jax.models.apply import ApplyFn, conditional_apply_fn
from cdd_jax.models.control import ConditionalUNet, check_same_structure, init_from_teacher
from cdd_jax.models.latent import LatentSpace
from cdd_jax.parallel.distributed import to_host
from cdd_jax.parallel.sharding import unbox
from cdd_jax.train.job import Job
from cdd_jax.train.loop import train

PyTree = Any


def conditional_model(config: ml_collections.ConfigDict) -> tuple[ConditionalUNet, ApplyFn]:
    """The conditional network of `config` and its apply_fn."""
    m = config.model
    model = ConditionalUNet.from_config(m, config.control, config.diffusion.schedule,
                                        image_size=config.data.crop_size,
                                        latent_factor=m.get("latent_factor", 1),
                                        prompt_tokens=m.get("prompt_tokens", 0))
    return model, conditional_apply_fn(model)


def _latent_condition(config: ml_collections.ConfigDict, space: LatentSpace | None) -> bool:
    """Whether the condition is VAE-encoded (a latent teacher with control.cond_space=latent)."""
    return space is not None and config.control.cond_space == "latent"


def student_sampler(config: ml_collections.ConfigDict, apply_fn: ApplyFn, schedule: Schedule,
                    space: LatentSpace | None = None, vae_params: PyTree = None):
    """sample(params, cond, rng, num_steps, renoise) -> images: few-step sampling of the
    student in its own space (pixels, or latents decoded through `space` with `vae_params`)."""

    latent_cond = _latent_condition(config, space)

    def sample(params, cond, rng, num_steps: int, renoise: str):
        shape = None if space is None else space.shape(condition_image(cond).shape)
        if latent_cond:  # the condition image encoded as in training (prepare_batch)
            image = space.encode({"vae": vae_params}, condition_image(cond))
            cond = {**cond, "image": image} if isinstance(cond, Mapping) else image
        x = few_step_sample(apply_fn, params, cond, rng, schedule=schedule, num_steps=num_steps,
                            grid=config.evaluate.grid, renoise=renoise, shape=shape,
                            prediction_type=config.diffusion.prediction_type)
        return x if space is None else space.decode({"vae": vae_params}, x)

    return sample


def latent_space(config: ml_collections.ConfigDict) -> tuple[LatentSpace, PyTree, PyTree]:
    """(LatentSpace, VAE params, prompt embedding) of a latent teacher, else (None, None, None)."""
    if config.model.family != "unet2d_condition":
        return None, None, None
    vae, vae_params = load_vae(config.teacher.checkpoint)
    return LatentSpace(vae), vae_params, load_prompt_embeds(config.teacher.checkpoint)


def _heldout_psnr(config, sampler, eval_set: dict):
    """A jitted fn(params) -> PSNR of the student at K = 1 and K = 4 on the first evaluation
    batch (a cheap progress probe logged during training)."""
    probe = {k: jnp.asarray(v[: config.evaluate.batch_size]) for k, v in eval_set.items()}

    @jax.jit
    def student_psnr(params):
        out = {}
        for k, renoise in [(1, "ddim")] + [(4, r) for r in config.evaluate.renoise]:
            cond = probe["cond"]
            if "prompt_embeds" in probe:  # a captioned dataset: each crop's own prompt
                cond = {"image": cond, "prompt_embeds": probe["prompt_embeds"]}
            x = sampler(params, cond, jax.random.key(7), k, renoise)
            mse = jnp.mean((jnp.clip(x, -1, 1) - probe["image"]) ** 2, axis=(1, 2, 3)) / 4.0
            name = f"heldout_psnr_K{k}" + ("" if renoise == "ddim" else f"_{renoise}")
            out[name] = jnp.mean(-10 * jnp.log10(mse))
        return out

    return student_psnr


def distill_job(config: ml_collections.ConfigDict, teacher_params: PyTree, eval_set: dict, *,
                finetuned_params: PyTree = None, initial_params: PyTree = None
                ) -> tuple[Job, ApplyFn, Schedule]:
    """The distillation Job (objective `config.distill.objective`), its apply_fn and schedule.

    The student starts from `initial_params` (conditional params, e.g. the fine-tuned model for
    CM / GD) if given, else from the conditional network built from the unconditional teacher
    (copied backbone and encoder, zero gates); `teacher_params` may then be None.
    `finetuned_params`: the frozen fine-tuned model that CM / GD distil.
    """
    dcfg = config.distill
    spec = objective_spec(dcfg.objective)
    model, apply_fn = conditional_model(config)
    schedule = get_schedule(config.diffusion.schedule)
    space, vae_params, prompt_embeds = latent_space(config)
    if config.data.prompts == "captions":
        check_caption_shapes(config.data, prompt_embeds.shape[1:])
    size = config.data.crop_size
    cond0 = jnp.zeros((1, size, size, 3))
    z0 = cond0 if space is None else jnp.zeros(space.shape(cond0.shape))
    latent_cond = _latent_condition(config, space)
    if latent_cond:
        cond0 = z0

    def init_fn(rng):
        return model.init({"params": rng}, z0, jnp.zeros((1,)), cond0)["params"]

    fresh = unbox(jax.jit(init_fn)(jax.random.key(config.seed)))
    if initial_params is not None:
        check_same_structure(initial_params, fresh, "initial_params", "config.model/control")
        initial = initial_params
    else:
        check_same_structure(teacher_params, fresh["unet"], "teacher checkpoint", "config.model")
        initial = init_from_teacher(fresh, teacher_params, prompt_embeds)
    if spec.uses_finetuned and finetuned_params is None:
        raise ValueError(f"objective {dcfg.objective!r} needs a fine-tuned conditional model")

    pixel_d_x = space is not None and dcfg.d_x_space == "pixel"
    decode = None
    if pixel_d_x:  # the VAE is a step argument (Job.frozen_inputs), read as batch["frozen"]
        def decode(batch, latents):
            return space.decode(batch["frozen"], latents)

    def loss_fn(params, target_params, finetuned, batch, rng):
        return compute_loss(apply_fn, params, batch, rng, schedule=schedule, cfg=dcfg,
                            target_params=target_params, finetuned_params=finetuned,
                            prediction_type=config.diffusion.prediction_type, decode=decode)

    sampler = student_sampler(config, apply_fn, schedule, space, vae_params)
    student_psnr = _heldout_psnr(config, sampler, eval_set)
    sr = make_sr_transform(config.data, config.degradation)
    job = Job(
        name=dcfg.objective,
        init_params=init_fn,
        loss_fn=loss_fn,
        ema=dcfg.eval_ema,
        target_ema=dcfg.target_ema if spec.uses_target else None,
        freeze_backbone=spec.freeze_backbone,
        initial_params=initial,
        finetuned_params=finetuned_params,
        eval_fn=lambda s: {k: float(v) for k, v in student_psnr(s.ema_params).items()},
        make_dataset=lambda pi, pc: build_train_dataset(config.data, task="sr", sr_transform=sr,
                                                        process_index=pi, process_count=pc),
        prepare_batch=None if space is None else space.encoder(vae_params, pixel_d_x,
                                                                encode_cond=latent_cond),
        frozen_inputs={"vae": vae_params} if pixel_d_x else None,
    )
    return job, apply_fn, schedule


def distill(config: ml_collections.ConfigDict, workdir: str, teacher_params: PyTree,
            eval_set: dict, *, finetuned_params: PyTree = None, initial_params: PyTree = None):
    """Stage 2: trains the conditional network; returns (EMA params, apply_fn, schedule)."""
    job, apply_fn, schedule = distill_job(config, teacher_params, eval_set,
                                          finetuned_params=finetuned_params,
                                          initial_params=initial_params)
    state = train(job, config, workdir)
    return to_host(state.ema_params), apply_fn, schedule  # collective under multi-host FSDP
