"""CEMA's hyperparameters for sweeps, as plain data (no Ray here): dotted CEMAConfig keys ->
``(distribution, *args)``; :mod:`tdmr_ray.tuning` turns them into Ray Tune domains."""

SEARCH_SPACE = {
    # E_max = frac * ln(C), reference 0.4; it also sets the E_max of the cloud loss weights
    # (cloud.e_max_frac None: one E_max, as the reference)
    "filter.e_max_frac": ("uniform", 0.3, 0.5),
    "filter.e_max_lambda": ("uniform", 0.6, 1.3),  # dynamic E_max scale; reference logs swept 0.6-1.3
    "filter.e_min_frac": ("uniform", 0.01, 0.06),  # E_min = frac * ln(C); reference logs swept 0.01-0.06
    "cloud.foundation_lr": ("loguniform", 5e-5, 1e-3),
    "cloud.edge_lr": ("loguniform", 5e-4, 1e-2),
    "cloud.replay_capacity": ("choice", [1000, 5000, 10000]),
}
