"""The sampling defaults, one set shared by ``PerturbDiffModule.sample`` and ``PerturbDiff.predict_population``."""

#: Reverse steps of the strided samplers (``"ddim"``, ``"ddpm"``) when ``n_steps=None``: one jump from pure noise
#: to the clean estimate. The denoiser, trained with the set energy term, returns a diverse sample there; more steps
#: add that diversity on top of the state's own (benchmarks/HISTORY.md, "Few-step sampling"; 50
#: until 0.1.0).
DEFAULT_N_STEPS = 1

#: Default classifier-free guidance weight (released: 1.0, the value for ``PAPER_CONFIG``). Measured on the benchmark
#: tasks with the small defaults: 0.5 gives better mean shifts than 1.0 with seeds 0 / 1 (Kang pearson_delta
#: 0.882 / 0.864 vs 0.876 / 0.860, Norman 0.675 / 0.636 vs 0.648 / 0.610) at a similar or lower E-distance.
DEFAULT_GUIDANCE_SCALE = 0.5
