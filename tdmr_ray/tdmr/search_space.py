"""TDMR's hyperparameters for sweeps, as plain data: dotted TDMRJobConfig keys -> (distribution, *args)."""

SEARCH_SPACE = {
    "tdmr.teacher.prompt": ("choice", ["additive", "pad"]),
    "tdmr.teacher.pad_width": ("choice", [2, 4, 6]),  # prompt size of the "pad" prompt
    "tdmr.teacher.proxy_dim": ("choice", [64, 128, 256]),
    "tdmr.distill.schedule.kind": ("choice", ["linear", "cosine"]),
    "tdmr.distill.schedule.ramp_end": ("uniform", 0.4, 1.0),
    "tdmr.distill.temperature": ("choice", [2.0, 4.0, 8.0]),
}
