import os
import sys

# Tests import their shared helpers (tiny_model.py, scripts.py) from this folder.
sys.path.insert(0, os.path.dirname(__file__))

# Tests that call the CLI in-process keep XLA's persistent cache off: hermetic runs.
os.environ.setdefault("ARSSR_JAX_CACHE", "off")

# Training runs convert their volumes into the volume cache (arssr_jax.data.cache): the
# tests' default cache is a temporary folder, not ~/.cache (subprocesses inherit it).
if "ARSSR_JAX_VOLUME_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _volume_cache = tempfile.mkdtemp(prefix="arssr-test-volume-cache-")
    os.environ["ARSSR_JAX_VOLUME_CACHE"] = _volume_cache
    atexit.register(shutil.rmtree, _volume_cache, True)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """The shared small RDN (tests/tiny_model.py) as a (module, params) pair."""
    from tiny_model import tiny_model

    return tiny_model()


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """The same model saved as a model directory."""
    from arssr_jax.weights import save_model
    from tiny_model import TINY

    return str(save_model(tmp_path_factory.mktemp("m") / "tiny", TINY, tiny[1]))


# The slow tier (each over ~8 s on 2 cores: multi-process and multi-device runs, training
# and resume, the notebook, the reference comparisons at full size). `pytest -m "not slow"`
# is the fast tier for the edit-test loop; CI and the README's command run everything.
SLOW = {
    "test_adapt.py::test_adaptation_improves_the_scans_held_out_pairs_deterministically",
    "test_adapt.py::test_a_step_that_cannot_help_keeps_the_start_model",
    "test_adapt.py::test_time_budget_stops_early",
    "test_adapt.py::test_isotropic_adaptation_runs",
    "test_adapt.py::test_adaptation_in_the_pipeline_decodes_with_the_adapted_model_and_the_slice_profile",
    "test_adapt.py::test_cli_adapts_saves_a_model_that_loads_and_refuses_bad_values_in_one_line",
    "test_models.py::test_small_configurations_run_and_compose",
    "test_models.py::test_each_encoder_knows_its_receptive_radius",
    "test_notebook.py::test_notebook_executes_without_errors",
    "test_consistency.py::test_upsample_applies_the_models_step_and_an_override",
    "test_reference_weights.py::test_outputs_match_the_reference",
    "test_cluster.py::test_two_slurm_tasks_form_one_run",
    "test_parallel.py::test_two_processes_match_one_process",
    "test_parallel.py::test_four_devices_match_one_device",
    "test_checkpoints.py::test_resume_equals_straight_run",
    "test_checkpoints.py::test_interrupt_saves_the_steps_since_the_last_checkpoint",
    "test_inference.py::test_bfloat16_compute_stays_within_one_percent_of_float32",
    "test_inference.py::test_tiled_encoding_equals_untiled",
    "test_inference.py::test_like_decodes_directly_on_an_oblique_grid",
    "test_inference.py::test_upsample_equals_the_reference_mirror",
    "test_batch.py::test_many_inputs_one_model_and_one_compile_per_shape",
    "test_baselines.py::test_baseline_config_errors",
    "test_training.py::test_loss_falls_on_real_data_and_workdir_is_a_model",
    "test_device_benchmark.py::test_smoke_run_fills_every_field",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = f"{item.path.name}::{item.originalname}"
        if name in SLOW:
            item.add_marker(pytest.mark.slow)
