"""`train_and_evaluate(config, workdir)`: the stages of a job, wired together.

    stage "pretrain": unconditional teacher -> <workdir>/export (EMA params + model config)
    stage "sr":       teacher (shipped, given, or pretrained in <workdir>/teacher)
                      -> conditional distillation in <workdir>/distill (CoDi by default)
                      -> evaluation in <workdir>/eval (results.json, results.md, grid.png)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cdd_jax.data.config import validate_data_config
from cdd_jax.diffusion import get_schedule, sample
from cdd_jax.distill.config import DIFFUSION_WEIGHTINGS, validate_distill_config
from cdd_jax.distill.diffusion_loss import diffusion_loss
from cdd_jax.distill.ema import WARMUPS as EMA_WARMUPS
from cdd_jax.distill.objectives import compute_loss, needs_target, needs_teacher
from cdd_jax.distill.sampling import few_step_sample
from cdd_jax.models.conditional import ConditionalUNet, check_same_structure, init_from_teacher
from cdd_jax.models.unet import UNet, init_params, unet_kwargs
from cdd_jax.parallel.distributed import to_host
from cdd_jax.parallel.sharding import unbox
from cdd_jax.train import presets
from cdd_jax.train.checkpoint import export_params, load_params
from cdd_jax.train.loop import Job, train

PyTree = object


# ----------------------------------------------------------------------------------------------
# Checks that run before anything compiles.
# ----------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Unknown keys and out-of-range values are errors naming the key, before any compilation."""
    presets.check_unknown_keys(config, presets.reference_config(config.stage))
    unet_kwargs(config.model)
    validate_data_config(config.data)
    if config.train.nonfinite not in ("skip", "halt"):
        raise ValueError(
            f"train.nonfinite must be 'skip' or 'halt', got {config.train.nonfinite!r}")
    for key in ("num_steps", "log_every", "ckpt_every", "keep_checkpoints"):
        if int(config.train[key]) <= 0:
            raise ValueError(f"train.{key} must be positive, got {config.train[key]}")
    get_schedule(config.diffusion.schedule)

    def number(key: str, lo: float, hi: float = float("inf"), *, lo_open: bool = False,
               hi_open: bool = False, integer: bool = False) -> None:
        section, name = key.split(".")
        value = config[section][name]
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise TypeError(f"{key} must be {'an int' if integer else 'a number'}, got {value!r}")
        if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
            interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ValueError(f"{key} must be in {interval}, got {value!r}")

    def choice(key: str, valid: tuple) -> None:
        section, name = key.split(".")
        if config[section][name] not in valid:
            raise ValueError(f"{key} must be one of {valid}, got {config[section][name]!r}")

    for key in ("train.eval_every", "train.sample_every"):
        number(key, 0, integer=True)
    for key in ("train.sample_steps", "train.num_sample_images", "model.num_groups",
                "model.head_dim"):
        number(key, 1, integer=True)
    choice("diffusion.weighting", DIFFUSION_WEIGHTINGS)
    number("diffusion.snr_gamma", 0, lo_open=True)
    for key in ("optim.lr", "optim.new_lr", "optim.eps"):
        number(key, 0, lo_open=True)
    number("optim.warmup_steps", 0, integer=True)
    choice("optim.decay", ("cosine", "constant"))
    number("optim.final_lr_frac", 0, 1)
    for key in ("optim.b1", "optim.b2"):
        number(key, 0, 1, hi_open=True)
    for key in ("optim.weight_decay", "optim.grad_clip"):
        number(key, 0)
    number("ema.decay", 0, 1, hi_open=True)
    choice("ema.warmup", EMA_WARMUPS)
    for key in ("ema.power", "ema.inv_gamma"):
        number(key, 0, lo_open=True)
    sizes = [config.data.crop_size // 2**i for i in range(len(config.model.ch_mult))]
    unused = [r for r in config.model.attn_resolutions if r not in sizes]
    if unused:
        logging.warning("model.attn_resolutions %s never occur at data.crop_size %d (feature "
                        "map sizes %s): no attention there", unused, config.data.crop_size, sizes)
    if "num_cpu_devices" in config.mesh:
        number("mesh.num_cpu_devices", -1, integer=True)
    # Mesh and batch against the devices present: clear errors naming the numbers, before any
    # data is loaded or anything compiles (building a Mesh object compiles nothing).
    from cdd_jax.parallel.mesh import check_batch_divisible, make_mesh

    check_batch_divisible(config.data.batch_size, make_mesh(config.mesh), jax.process_count())
    depth = 2 ** (len(config.model.ch_mult) - 1)
    if config.data.crop_size % depth:
        raise ValueError(f"data.crop_size {config.data.crop_size} must be divisible by {depth} "
                         f"for model.ch_mult={tuple(config.model.ch_mult)}")
    if config.stage == "table1":
        from cdd_jax.train.table1 import validate_table1_config

        validate_table1_config(config)
    if config.stage in ("sr", "table1"):
        from cdd_jax.data.degradations import validate_degradation_config

        validate_degradation_config(config.degradation, config.data.crop_size)
        validate_distill_config(config.distill)
        if config.stage == "sr":
            from cdd_jax.distill.sampling import RENOISE

            renoise = tuple(config.evaluate.get("renoise", ()))
            if not renoise or len(set(renoise)) != len(renoise) or set(renoise) - set(RENOISE):
                raise ValueError(f"evaluate.renoise must be a non-empty tuple of distinct "
                                 f"values from {RENOISE}, got {renoise!r}")
        number("adapter.anchor_precision", 0)
        number("adapter.anchor_factor", 1, integer=True)
        if config.adapter.anchor_precision > 0 and (
                config.data.crop_size % config.adapter.anchor_factor
                or config.adapter.anchor_factor != config.degradation.scale):
            raise ValueError(
                f"adapter.anchor_factor {config.adapter.anchor_factor} must equal "
                f"degradation.scale {config.degradation.scale} and divide data.crop_size "
                f"{config.data.crop_size} when the low-frequency anchor is on")
        validate_config(config.teacher.pretrain)
        if not config.teacher.checkpoint and config.teacher.pretrain.data.crop_size != \
                config.data.crop_size:
            logging.warning("teacher pretrains at %d px, distillation runs at %d px",
                            config.teacher.pretrain.data.crop_size, config.data.crop_size)


def check_workdir(workdir: str, probe_bytes: int = 1 << 20) -> None:
    """The workdir must be creatable and writable (checked at start, not at the first save).

    Writes and syncs `probe_bytes` (1 MiB) so that a full disk or quota fails here, and warns
    when less than 1 GiB is free (checkpoints of large models need far more).
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(workdir).free
    except OSError as e:
        raise OSError(f"workdir {workdir!r} is not writable: {e}") from e
    if free < 1 << 30:
        logging.warning("workdir %r has only %.1f MiB free", workdir, free / 2**20)


# ----------------------------------------------------------------------------------------------
# Stage 1: unconditional pretraining.
# ----------------------------------------------------------------------------------------------


def _unet_apply(model: UNet):
    def apply_fn(params, z, t, cond, rng):
        del cond
        rngs = {"dropout": rng} if rng is not None else {}
        return model.apply({"params": params}, z, t, train=rng is not None, rngs=rngs)

    return apply_fn


def _to_uint8_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """[N, H, W, 3] in [-1, 1] -> one uint8 image grid."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = np.round(
            (np.clip(im, -1, 1) + 1) * 127.5).astype(np.uint8)
    return grid


def heldout_denoising_loss(apply_fn, schedule, images: np.ndarray, seed: int = 0):
    """A jitted fn(params) -> v-MSE on fixed held-out crops, fixed noise, t on a fixed grid."""
    images = jnp.asarray(images)
    n = images.shape[0]
    t = jnp.linspace(0.05, 0.95, n)
    eps = jax.random.normal(jax.random.key(seed), images.shape)

    @jax.jit
    def loss(params):
        alpha, sigma = schedule.alpha_sigma(t)
        a, s = alpha[:, None, None, None], sigma[:, None, None, None]
        v_hat = apply_fn(params, a * images + s * eps, t, None, None)
        return jnp.mean((v_hat - (a * eps - s * images)) ** 2)

    return loss


def pretrain_job(config: ml_collections.ConfigDict) -> tuple[Job, Callable]:
    """The unconditional pretraining Job and a jitted held-out loss fn(params) -> v-MSE."""
    from cdd_jax.data.pipeline import build_train_dataset, make_eval_set

    model = UNet.from_config(config.model)
    apply_fn = _unet_apply(model)
    schedule = get_schedule(config.diffusion.schedule)
    size = config.data.crop_size
    eval_images = make_eval_set(config.data, task="pretrain")["image"]
    heldout = heldout_denoising_loss(apply_fn, schedule, eval_images)

    def loss_fn(params, target, teacher, batch, rng):
        return diffusion_loss(apply_fn, params, batch, rng, schedule=schedule,
                              weighting=config.diffusion.weighting,
                              snr_gamma=config.diffusion.snr_gamma)

    n_img = config.train.num_sample_images
    z_T = jax.random.normal(jax.random.key(config.seed + 1), (n_img, size, size, 3))

    @jax.jit
    def draw(params):
        def model_fn(z, t):
            return apply_fn(params, z, jnp.broadcast_to(t, (z.shape[0],)), None, None)

        return sample(model_fn, z_T, schedule=schedule, num_steps=config.train.sample_steps)

    job = Job(
        name="pretrain",
        init_params=lambda rng: init_params(model, rng, size),
        loss_fn=loss_fn,
        mode="pretrain",
        ema=config.ema,
        eval_fn=lambda s: {"heldout_vloss_ema": float(heldout(s.ema_params)),
                           "heldout_vloss": float(heldout(s.params))},
        sample_fn=lambda s: _to_uint8_grid(jax.device_get(draw(s.ema_params))),
        make_dataset=lambda pi, pc: build_train_dataset(config.data, task="pretrain",
                                                        process_index=pi, process_count=pc),
    )
    return job, heldout


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> tuple[PyTree, dict]:
    """Trains the unconditional teacher; returns (EMA params, metadata) and exports them."""
    job, heldout = pretrain_job(config)
    size = config.data.crop_size
    state = train(job, config, workdir)
    params = to_host(state.ema_params)  # collective when FSDP spans several processes
    meta = {
        "model": config.model.to_dict(),
        "diffusion": config.diffusion.to_dict(),
        "crop_size": size,
        "steps": int(state.step),
        "heldout_vloss_ema": float(heldout(state.ema_params)),
    }
    export_params(os.path.join(workdir, "export"), params, meta)
    logging.info("exported teacher to %s: %s", os.path.join(workdir, "export"),
                 json.dumps(meta, sort_keys=True))
    return params, meta


# ----------------------------------------------------------------------------------------------
# Stage 2: conditional distillation; stage 3: evaluation.
# ----------------------------------------------------------------------------------------------


def get_teacher(config: ml_collections.ConfigDict, workdir: str) -> PyTree:
    """The teacher's params: from `teacher.checkpoint`, or pretrained (or reused) in workdir."""
    path = config.teacher.checkpoint
    if not path:
        tdir = os.path.join(workdir, "teacher")
        if os.path.isdir(os.path.join(tdir, "export", "params")):
            logging.info("reusing the teacher pretrained in %s", tdir)
            path = os.path.join(tdir, "export")
        else:
            logging.info("no teacher checkpoint given: pretraining one in %s", tdir)
            return pretrain(config.teacher.pretrain, tdir)[0]
    params, meta = load_params(path)
    if "model" in meta:
        saved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["model"].items()}
        wanted = {k: (tuple(v) if isinstance(v, list) else v)
                  for k, v in config.model.to_dict().items()}
        diff = {k: (saved.get(k), wanted.get(k)) for k in set(saved) | set(wanted)
                if k not in ("dropout", "remat", "dtype") and saved.get(k) != wanted.get(k)}
        if diff:
            raise ValueError(
                f"teacher checkpoint {path!r} does not match config.model: "
                + ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}"
                            for k, (a, b) in sorted(diff.items()))
            )
    return params


def _cond_apply(model: ConditionalUNet):
    def apply_fn(params, z, t, cond, rng):
        rngs = {"dropout": rng} if rng is not None else {}
        return model.apply({"params": params}, z, t, cond, train=rng is not None, rngs=rngs)

    return apply_fn


def distill_job(config: ml_collections.ConfigDict, teacher_params: PyTree, eval_set: dict, *,
                finetuned_params: PyTree = None, initial_params: PyTree = None
                ) -> tuple[Job, Callable, object]:
    """The distillation Job (objective `config.distill.objective`), its apply_fn and schedule.

    The student starts from `initial_params` (conditional params, e.g. the fine-tuned model for
    CM / GD) if given, else from the conditional network built from the teacher (zero gates);
    `teacher_params` may then be None.
    """
    from cdd_jax.data.degradations import SRPairTransform
    from cdd_jax.data.pipeline import build_train_dataset

    dcfg = config.distill
    model = ConditionalUNet.from_config(config.model, config.adapter, config.diffusion.schedule)
    apply_fn = _cond_apply(model)
    schedule = get_schedule(config.diffusion.schedule)
    size = config.data.crop_size
    cond0 = jnp.zeros((1, size, size, 3))

    def init_fn(rng):
        variables = model.init({"params": rng}, cond0, jnp.zeros((1,)), cond0)
        return variables["params"]

    fresh = unbox(jax.jit(init_fn)(jax.random.key(config.seed)))
    if initial_params is not None:
        check_same_structure(initial_params, fresh, "initial_params", "config.model/adapter")
        initial = initial_params
    else:
        check_same_structure(teacher_params, fresh["unet"], "teacher checkpoint", "config.model")
        initial = init_from_teacher(fresh, teacher_params)
    if needs_teacher(dcfg.objective) and finetuned_params is None:
        raise ValueError(f"objective {dcfg.objective!r} needs a fine-tuned conditional teacher")

    def loss_fn(params, target, teacher, batch, rng):
        return compute_loss(apply_fn, params, batch, rng, schedule=schedule, cfg=dcfg,
                            target_params=target, teacher_params=teacher)

    probe = {k: jnp.asarray(v[: config.evaluate.batch_size]) for k, v in eval_set.items()}

    @jax.jit
    def student_psnr(params):
        out = {}
        for k, renoise in [(1, "ddim")] + [(4, r) for r in config.evaluate.renoise]:
            x = few_step_sample(apply_fn, params, probe["cond"], jax.random.key(7),
                                schedule=schedule, num_steps=k, grid=config.evaluate.grid,
                                renoise=renoise)
            mse = jnp.mean((jnp.clip(x, -1, 1) - probe["image"]) ** 2, axis=(1, 2, 3)) / 4.0
            name = f"heldout_psnr_K{k}" + ("" if renoise == "ddim" else f"_{renoise}")
            out[name] = jnp.mean(-10 * jnp.log10(mse))
        return out

    sr = SRPairTransform(config.degradation, size)
    job = Job(
        name=dcfg.objective,
        init_params=init_fn,
        loss_fn=loss_fn,
        mode="pe_codi" if dcfg.objective == "pe_codi" else "codi",
        ema=dcfg.eval_ema,
        target_ema=dcfg.target_ema if needs_target(dcfg.objective) else None,
        initial_params=initial,
        teacher_params=finetuned_params,
        eval_fn=lambda s: {k: float(v) for k, v in student_psnr(s.ema_params).items()},
        make_dataset=lambda pi, pc: build_train_dataset(config.data, task="sr", sr_transform=sr,
                                                        process_index=pi, process_count=pc),
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


def _student_key(k: int, renoise: str, all_renoise) -> str:
    """Method key of the student at K steps: "student_K4", or "student_K4_fresh" for a
    re-noising other than the first configured one."""
    return f"student_K{k}" + ("" if renoise == all_renoise[0] else f"_{renoise}")


def evaluate_sr(config, workdir: str, apply_fn, params, schedule, eval_set: dict) -> list[dict]:
    """Stage 3: PSNR / SSIM / LPIPS of bicubic and the student at K steps; results and a grid."""
    from cdd_jax.evaluate.figures import image_grid
    from cdd_jax.evaluate.harness import MethodSpec, bicubic_method, evaluate_methods
    from cdd_jax.evaluate.metrics import MetricSuite
    from cdd_jax.evaluate.report import write_results

    ecfg = config.evaluate
    params = jax.device_put(params)
    methods = {"bicubic": bicubic_method()}
    for renoise in ecfg.renoise:
        for k in ecfg.student_steps:
            if k == 1 and renoise != ecfg.renoise[0]:
                continue  # One step never re-noises: the same samples as the first row's.
            fn = jax.jit(lambda cond, rng, k=k, r=renoise: few_step_sample(
                apply_fn, params, cond, rng, schedule=schedule, num_steps=k, grid=ecfg.grid,
                renoise=r))
            methods[_student_key(k, renoise, ecfg.renoise)] = MethodSpec(
                config.distill.objective, f"{renoise}-{ecfg.grid}", k,
                lambda cond, lq, rng, fn=fn: fn(cond, rng))
    results = evaluate_methods(methods, eval_set, MetricSuite(ecfg.metrics),
                               batch_size=ecfg.batch_size, rng_seed=config.seed)
    out = os.path.join(workdir, "eval")
    n = ecfg.num_grid_images
    columns = {"LQ input": eval_set["lq"][:n], "bicubic": eval_set["cond"][:n]}
    for key, spec in methods.items():
        if key != "bicubic":
            label = f"K={spec.steps}" + ("" if spec.steps == 1 else f" {spec.sampler.split('-')[0]}")
            columns[label] = results.predictions[key][:n]
    columns["ground truth"] = eval_set["image"][:n]
    if jax.process_index() == 0:
        write_results(list(results), out, "Super-resolution x4 on held-out crops",
                      notes=f"degradation preset: {config.degradation.preset}; "
                            f"{eval_set['image'].shape[0]} crops of "
                            f"{config.data.crop_size} px; timing device: {jax.devices()[0]}")
        image_grid(columns, os.path.join(out, "grid.png"))
    return list(results)


def run_sr(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    from cdd_jax.data.degradations import SRPairTransform
    from cdd_jax.data.pipeline import make_eval_set

    teacher = get_teacher(config, workdir)
    eval_set = make_eval_set(config.data, task="sr",
                             sr_transform=SRPairTransform(config.degradation,
                                                          config.data.crop_size))
    params, apply_fn, schedule = distill(config, os.path.join(workdir, "distill"), teacher,
                                         eval_set)
    return evaluate_sr(config, workdir, apply_fn, params, schedule, eval_set)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Runs `config.stage` in `workdir`; safe to call again to resume."""
    from cdd_jax.parallel.distributed import assert_same_config_across_processes
    from cdd_jax.parallel.mesh import configure_cpu_devices

    # First: JAX's backends must not have started (validate_config's mesh check starts them).
    configure_cpu_devices(config.mesh.get("num_cpu_devices", 0), config.data.batch_size)
    validate_config(config)
    check_workdir(workdir)
    assert_same_config_across_processes(config)
    jax.config.update("jax_threefry_partitionable", True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"config_{config.stage}.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    if config.stage == "pretrain":
        return pretrain(config, workdir)
    if config.stage == "sr":
        return run_sr(config, workdir)
    if config.stage == "table1":
        from cdd_jax.train.table1 import run_table1

        return run_table1(config, workdir)
    raise ValueError(f"unknown config.stage {config.stage!r}")


__all__ = ["train_and_evaluate", "pretrain", "distill", "evaluate_sr", "validate_config", "nn"]
