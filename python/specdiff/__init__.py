"""SpecDiff for PyTorch and diffusers, on the C++ SpecDiff library (docs/python.md).

The low-level binding (``specdiff._core``) is the C++ accelerator over CPU arrays and tensors without a copy;
``specdiff.diffusers`` enables the methods on a diffusers pipeline or transformer in one line::

    import specdiff.diffusers as sd
    sd.enable(pipe, sd.SpecDiffConfig(cache_rate=0.9))
"""
from ._core import (  # noqa: F401
    Accelerator,
    ForecastCalibration,
    LearnedTable,
    aligned_speculative_timesteps,
    forecast_accelerator,
    learned_forecast_file_name,
    learned_json,
    load_learned,
    sample_latents,
    specdiff_accelerator,
)

__version__ = "0.3.0"
