"""GDFQ's hyperparameters for sweeps, as plain data: dotted GDFQJobConfig keys -> (distribution, *args)."""

SEARCH_SPACE = {
    "w_bits": ("choice", [4, 6, 8]),
    "a_bits": ("choice", [4, 6, 8]),
    "gdfq.lr_q": ("loguniform", 1e-5, 1e-3),  # reference 1e-4
    "gdfq.lr_g": ("loguniform", 1e-4, 1e-2),  # reference 1e-3
    "gdfq.bns_weight": ("loguniform", 0.01, 1.0),  # reference 0.1
    "gdfq.temperature": ("choice", [1.0, 4.0, 20.0]),  # reference 20
}
