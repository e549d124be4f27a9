"""predict_population(sampler="ddim_truncated", start_time=..., x0_bound=...), PerturbDiff(input_scale="auto"),
the step monitor on a real module, and the defaults left exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import TINY_TRAIN, make_dense_kang, predict_kwargs, tiny
from scipy import sparse

from perturbdiff_scvi.diffusion import RangeMonitor, space_timesteps
from perturbdiff_scvi.model import OutputOptions, SamplerOptions

FAST = {"contexts": "c0", "batches": "b0", "n_cells": 16}
TRUNC = {"sampler_options": SamplerOptions(sampler="ddim_truncated", start_time=6)}


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


# ------------------------------------------------------------------------------ defaults unchanged
def _legacy_sample(module, x_ctrl, pert, ctx, batch, *, n_steps, guidance_scale, generator):
    """The sampling loop as it was before ddim_truncated / x0_bound / step_callback (strided DDIM)."""
    net, diffusion, scale = module.ema, module.diffusion, module.input_scale
    x_ctrl = x_ctrl / scale
    keep = torch.zeros(x_ctrl.shape[0], dtype=torch.bool)
    timesteps = space_timesteps(diffusion.n_timesteps, n_steps)
    x_t = torch.randn(tuple(x_ctrl.shape), generator=generator)
    self_cond = torch.zeros_like(x_t)
    for i, t in enumerate(timesteps.tolist()):
        t_prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        tb = torch.full((x_t.shape[0],), t, dtype=torch.long)
        c = net(x_t, tb, x_ctrl, pert, ctx, batch, self_cond, keep)
        u = net(x_t, tb, x_ctrl, pert, ctx, batch, self_cond, keep | True)
        x0 = (1 + guidance_scale) * c - guidance_scale * u
        x0 = torch.where(x0 < 1e-4, torch.zeros_like(x0), x0)
        if t_prev >= 0:
            eps = diffusion.eps_from_x0(x_t, tb, x0)
            abar_prev = float(diffusion._alphas_cumprod64[t_prev])
            x_t = abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps
        else:
            x_t = x0
        self_cond = x0
    return x_t * scale


@pytest.mark.parametrize("options", [{}, {"n_steps": 50, "guidance_scale": 1.0}])
def test_module_sample_equals_the_previous_loop(shared_model, options):
    # {}: the defaults, shared with predict_population (DEFAULT_N_STEPS = 1, DEFAULT_GUIDANCE_SCALE = 0.5);
    # the second: the module's defaults until 0.2.0
    module = shared_model.module
    x_ctrl = torch.rand(2, module.set_size, 30, generator=torch.Generator().manual_seed(5))
    codes = torch.tensor([1, 0])
    new = module.sample(x_ctrl, codes, codes, codes, generator=torch.Generator().manual_seed(9), **options)
    with torch.inference_mode():
        old = _legacy_sample(
            module,
            x_ctrl,
            codes,
            codes,
            codes,
            n_steps=options.get("n_steps", 1),
            guidance_scale=options.get("guidance_scale", 0.5),
            generator=torch.Generator().manual_seed(9),
        )
    assert torch.equal(new, old)


def test_predict_defaults_equal_the_explicit_previous_options(shared_model):
    kw = {**FAST, "n_cells": 8}
    default = shared_model.predict_population("A", seed=0, **kw)
    explicit = shared_model.predict_population(
        "A",
        seed=0,
        n_steps=1,
        guidance_scale=0.5,
        **kw,
        sampler_options=SamplerOptions(sampler="ddim", start_time=None),
        output_options=OutputOptions(x0_bound="auto"),
    )
    np.testing.assert_array_equal(default.X, explicit.X)
    uns = default.uns["perturbdiff"]
    assert uns["sampler"] == "ddim" and uns["n_steps"] == 1
    assert uns["start_time"] == "None" and uns["x0_bound"] == "auto"
    assert shared_model.module.input_scale == 1.0  # default input_scale


# ------------------------------------------------------------------------------ ddim_truncated
def test_truncated_runs_is_seeded_and_recorded(shared_model):
    a = shared_model.predict_population("A", seed=0, **TRUNC, **FAST)
    b = shared_model.predict_population("A", seed=0, **TRUNC, **FAST)
    c = shared_model.predict_population("A", seed=1, **TRUNC, **FAST)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.allclose(a.X, c.X)
    assert a.shape == (16, 30) and (np.asarray(a.X) >= 0).all()
    uns = a.uns["perturbdiff"]
    assert uns["sampler"] == "ddim_truncated" and uns["start_time"] == 6 and uns["n_steps"] == 6
    strided = shared_model.predict_population("A", seed=0, n_steps=6, **FAST)
    assert not np.allclose(a.X, strided.X)  # a different sampler, not the strided DDIM under another name


def test_truncated_default_start_time_is_the_released_100(shared_model):
    pred = shared_model.predict_population(
        "A", seed=0, n_cells=8, contexts="c0", batches="b0", sampler_options=SamplerOptions(sampler="ddim_truncated")
    )
    assert pred.uns["perturbdiff"]["start_time"] == 100 == pred.uns["perturbdiff"]["n_steps"]  # TINY: T = 100


def test_truncated_guidance_zero_differs_from_guided(shared_model):
    g0 = shared_model.predict_population("A", seed=0, guidance_scale=0.0, **TRUNC, **FAST)
    g1 = shared_model.predict_population("A", seed=0, guidance_scale=1.0, **TRUNC, **FAST)
    again = shared_model.predict_population("A", seed=0, guidance_scale=1.0, **TRUNC, **FAST)
    assert not np.allclose(g0.X, g1.X)
    np.testing.assert_array_equal(g1.X, again.X)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_time": 0}, r"start_time must be an integer between 1 and n_timesteps=100; got 0\."),
        ({"start_time": 101}, r"start_time must be an integer between 1 and n_timesteps=100; got 101\."),
        ({"start_time": 2.5}, r"start_time must be an integer between 1 and n_timesteps=100; got 2\.5\."),
        ({"start_time": "100"}, r"start_time must be an integer"),
        ({"start_time": 10, "n_steps": 10}, r"n_steps=10 does not apply to sampler='ddim_truncated'"),
        ({"sampler": "ddim", "start_time": 10}, r"start_time=10 only applies to sampler='ddim_truncated'"),
        ({"sampler": "ddpm", "start_time": 10}, r"start_time=10 only applies to sampler='ddim_truncated'"),
    ],
)
def test_start_time_errors(shared_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        shared_model.predict_population("A", **predict_kwargs(**{"sampler": "ddim_truncated", **kwargs, **FAST}))


def test_whole_float_start_time_is_an_integer(shared_model):
    a = shared_model.predict_population(
        "A", seed=0, **FAST, sampler_options=SamplerOptions(sampler="ddim_truncated", start_time=4.0)
    )
    b = shared_model.predict_population(
        "A", seed=0, **FAST, sampler_options=SamplerOptions(sampler="ddim_truncated", start_time=4)
    )
    np.testing.assert_array_equal(a.X, b.X)
    assert type(a.uns["perturbdiff"]["start_time"]) is int


# ------------------------------------------------------------------------------ x0_bound
def test_numeric_bound_caps_and_is_recorded(shared_model):
    kw = {**FAST, "n_steps": 10}
    free = shared_model.predict_population("A", seed=0, **kw)
    cap = float(np.quantile(np.asarray(free.X), 0.9))
    capped = shared_model.predict_population("A", seed=0, **kw, output_options=OutputOptions(x0_bound=cap))
    assert np.asarray(free.X).max() > cap >= np.asarray(capped.X).max()
    assert capped.uns["perturbdiff"]["x0_bound"] == pytest.approx(cap)
    assert not np.allclose(free.X, capped.X)
    huge = shared_model.predict_population("A", seed=0, **kw, output_options=OutputOptions(x0_bound=1e6))
    np.testing.assert_array_equal(huge.X, free.X)  # a cap that never binds changes nothing


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "max", True, [1.0]])
def test_bad_x0_bound_is_a_clear_error(shared_model, bad):
    with pytest.raises(ValueError, match="x0_bound must be"):
        shared_model.predict_population("A", **FAST, output_options=OutputOptions(x0_bound=bad))


@pytest.fixture(scope="module")
def dense_model(scvi_module):
    """A barely trained model (3 steps) on dense, high-valued data (values up to ~8.8), input_scale='auto'."""
    from perturbdiff_scvi import PerturbDiff

    adata = make_dense_kang()
    PerturbDiff.setup_anndata(adata, perturbation_key="condition", control_value="control", context_key="cell_type")
    torch.manual_seed(0)
    model = PerturbDiff(adata, **tiny(input_scale="auto"))
    model.train(**{**TINY_TRAIN, "max_steps": 3})
    return model, adata


def test_auto_bound_keeps_dense_predictions_within_1p5_x_the_training_max(dense_model):
    model, adata = dense_model
    gene_max = _dense(adata.X).max(0).astype(np.float64)
    assert gene_max.max() > 8  # the high-valued regime this guards
    bound = 1.5 * gene_max * (1 + 1e-6)  # float32 rounding of the cap
    kwargs = {"contexts": "CD4T", "n_cells": 8, "guidance_scale": 1.0, "seed": 0}
    for sampler_kw in ({"n_steps": 5}, {"sampler": "ddim_truncated", "start_time": 5}):
        pred = model.predict_population("stimulated", **predict_kwargs(**sampler_kw, **kwargs, x0_bound="auto"))
        x = np.asarray(pred.X)
        assert (x >= 0).all() and (x <= bound).all()
        assert pred.uns["perturbdiff"]["x0_bound"] == "auto"
        corrected = model.predict_population(
            "stimulated", **predict_kwargs(**sampler_kw, **kwargs, x0_bound="auto", bias_correction=True)
        )
        assert (np.asarray(corrected.X) <= bound).all()
    # The same with a denoiser whose output head is pushed far above the data: the cap, not luck, holds it.
    net = model.module.ema.final.linear
    saved = net.bias.detach().clone()
    try:
        with torch.no_grad():
            net.bias.add_(20.0)
        wild = np.asarray(
            model.predict_population("stimulated", n_steps=3, **kwargs, output_options=OutputOptions(x0_bound=None)).X
        )
        tamed = np.asarray(model.predict_population("stimulated", n_steps=3, **kwargs).X)  # the default "auto"
    finally:
        with torch.no_grad():
            net.bias.copy_(saved)
    assert (wild > 1.5 * gene_max).mean() > 0.5
    assert (tamed <= bound).all() and (tamed >= 0).all()


def test_auto_statistics_are_computed_from_the_training_matrix_once_per_registry(dense_model, monkeypatch):
    """x0_bound="auto" / zero_threshold="auto" compute their statistic of the registered matrix on the first call
    only, kept by the model's registry view, and the values are the training matrix's own (per-gene maximum,
    realistic zero threshold)."""
    import perturbdiff_scvi.metrics as metrics
    from perturbdiff_scvi.metrics import realistic_zero_threshold
    from perturbdiff_scvi.model import OutputOptions, _ranges

    model, adata = dense_model
    registry = model.registry_view
    for name in ("gene_max", "zero_threshold"):
        registry.__dict__.pop(name, None)  # drop what an earlier test of this module computed
    calls = []
    gene_max, zero_threshold = _ranges.gene_max, metrics.realistic_zero_threshold
    monkeypatch.setattr(_ranges, "gene_max", lambda m: calls.append("gene_max") or gene_max(m))
    monkeypatch.setattr(metrics, "realistic_zero_threshold", lambda m: calls.append("zero") or zero_threshold(m))
    options = OutputOptions(x0_bound="auto", zero_threshold="auto")
    kwargs = {"contexts": "CD4T", "n_cells": 8, "n_steps": 2, "seed": 0, "output_options": options}
    first = model.predict_population("stimulated", **kwargs)
    assert sorted(calls) == ["gene_max", "zero"]
    second = model.predict_population("stimulated", **kwargs)
    assert sorted(calls) == ["gene_max", "zero"]  # not computed again
    np.testing.assert_array_equal(np.asarray(first.X), np.asarray(second.X))
    assert model.registry_view is registry
    np.testing.assert_allclose(registry.gene_max, _dense(adata.X).max(0), rtol=1e-6)
    assert registry.zero_threshold == realistic_zero_threshold(adata.X)


# ------------------------------------------------------------------------------ input_scale="auto"
def test_auto_input_scale_resolves_to_the_nonzero_rms(dense_model, setup_adata):
    from perturbdiff_scvi import PerturbDiff

    model, adata = dense_model
    x = _dense(adata.X).astype(np.float64)
    expected = np.sqrt(np.mean(x[x != 0] ** 2))
    assert type(model.module.input_scale) is float
    assert model.module.input_scale == pytest.approx(expected, rel=1e-9)
    assert 3 < model.module.input_scale < 5  # dense, high values: expressed entries ~1 in diffusion space
    assert model.init_params_["non_kwargs"]["options"]["input_scale"] == model.module.input_scale  # saved as the float
    sparse_low = PerturbDiff(setup_adata, **tiny(input_scale="auto")).module.input_scale
    y = _dense(setup_adata.X).astype(np.float64)
    assert sparse_low == pytest.approx(np.sqrt(np.mean(y[y != 0] ** 2)), rel=1e-9)
    assert PerturbDiff(setup_adata, **tiny(input_scale=2.5)).module.input_scale == 2.5  # floats as before


def test_auto_input_scale_round_trips_through_save_and_load(setup_adata, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **tiny(input_scale="auto"))
    model.train(**{**TINY_TRAIN, "max_steps": 2})
    scale = model.module.input_scale
    assert isinstance(scale, float) and scale != 1.0
    model.save(tmp_path / "m")
    # Loading with other data must not recompute the scale: it is stored as the resolved float.
    other = setup_adata.copy()
    other.X = other.X * 0.5
    loaded = PerturbDiff.load(tmp_path / "m", adata=other)
    assert loaded.module.input_scale == scale
    loaded = PerturbDiff.load(tmp_path / "m", adata=setup_adata)
    kw = {"seed": 0, "n_steps": 3, **FAST}
    np.testing.assert_array_equal(loaded.predict_population("A", **kw).X, model.predict_population("A", **kw).X)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("max", r"input_scale must be a number > 0 or 'auto'; got 'max'\."),
        ("AUTO", r"input_scale must be a number > 0 or 'auto'; got 'AUTO'\."),
        (0, r"input_scale must be > 0"),
        (-1.0, r"input_scale must be a finite number >= 0"),
        (float("nan"), r"input_scale must be a finite number"),
        (None, r"input_scale must be a finite number"),
    ],
)
def test_bad_input_scale_is_a_clear_error(setup_adata, bad, match):
    from perturbdiff_scvi import PerturbDiff

    with pytest.raises(ValueError, match=match):
        PerturbDiff(setup_adata, **tiny(input_scale=bad))


def test_auto_input_scale_on_all_zero_data_is_a_clear_error(scvi_module):
    from _helpers import make_perturbation_adata

    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata(n_cells=60)
    adata.X = sparse.csr_matrix(adata.X.shape, dtype=np.float32)
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl")
    with pytest.raises(ValueError, match="input_scale='auto' needs non-zero training expression"):
        PerturbDiff(adata, **tiny(input_scale="auto"))


# ------------------------------------------------------------------------------ trajectory monitor
def test_range_monitor_on_module_sample_sees_expression_units(dense_model):
    model, adata = dense_model
    module = model.module
    x = _dense(adata.X)
    gene_max = x.max(0)
    x_ctrl = torch.from_numpy(x[: 2 * module.set_size]).reshape(2, module.set_size, -1)
    codes = torch.zeros(2, dtype=torch.long)
    monitor = RangeMonitor(gene_max)
    out = module.sample(
        x_ctrl, codes, codes, codes, n_steps=4, step_callback=monitor, generator=torch.Generator().manual_seed(0)
    )
    table = monitor.table()
    assert table["t"].tolist() == space_timesteps(module.diffusion.n_timesteps, 4).tolist()
    assert table["x0_max"].iloc[-1] == pytest.approx(float(out.max()))  # last estimate = output (expression units)
    assert table["x0_share_above"].iloc[-1] == pytest.approx(float((out > torch.from_numpy(gene_max)).float().mean()))
    assert (
        ((table[["x_t_share_above", "x0_share_above"]] >= 0) & (table[["x_t_share_above", "x0_share_above"]] <= 1))
        .all()
        .all()
    )
    # the released sampler and a cap: every recorded estimate stays under the cap
    capped = RangeMonitor(gene_max)
    module.sample(
        x_ctrl,
        codes,
        codes,
        codes,
        sampler="ddim_truncated",
        start_time=5,
        step_callback=capped,
        x0_max=torch.from_numpy(1.5 * gene_max),
        generator=torch.Generator().manual_seed(0),
    )
    assert capped.table()["t"].tolist() == [4, 3, 2, 1, 0]
    assert (capped.table()["x0_max"] <= 1.5 * gene_max.max() * (1 + 1e-6)).all()
