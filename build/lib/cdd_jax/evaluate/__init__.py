"""Evaluation: image-quality metrics, the method-comparison harness, reports and figures."""

from cdd_jax.evaluate.figures import grid_size, image_grid, plot_quality_vs_nfe
from cdd_jax.evaluate.harness import (
    EvalResults,
    MethodSpec,
    bicubic_method,
    downsample_consistency,
    evaluate_methods,
    timing_device,
)
from cdd_jax.evaluate.metrics import (
    LPIPS,
    MetricSuite,
    area_downsample,
    available_metrics,
    psnr,
    ssim,
    unavailable_metrics,
)
from cdd_jax.evaluate.report import load_results, markdown_table, write_results

__all__ = [
    "LPIPS",
    "EvalResults",
    "MethodSpec",
    "MetricSuite",
    "area_downsample",
    "available_metrics",
    "bicubic_method",
    "downsample_consistency",
    "evaluate_methods",
    "grid_size",
    "image_grid",
    "load_results",
    "markdown_table",
    "plot_quality_vs_nfe",
    "psnr",
    "ssim",
    "timing_device",
    "unavailable_metrics",
    "write_results",
]
