"""The paper's numbers (Shin, Do, Son, ECCV 2024), transcribed as printed, in our units.

``PAPER_SINGLE_TASK``: the single-task references of its Δm; ``paper_rows``: its Tables
1-3 (ResNet-50, averages of three runs; "+ Ours" is the row above plus DGR);
``paper_method_name``: our method names as the paper's row names; ``PAPER_TABLE_4A``:
its sensitivity table (Δm against the vanilla network's own single-task runs, by number
of primary tasks and number of dummy sets).
"""

from __future__ import annotations

PAPER_SINGLE_TASK = {
    "nyuv2": {"seg/miou": 0.4337, "depth/abs_err": 0.5224, "normal/mean_angle": 22.40},
    "cityscapes": {"seg/miou": 0.5620, "part_seg/miou": 0.5274, "disp/abs_err": 0.84},
    "utkface": {"age/acc": 0.5233, "gender/acc": 0.8964, "ethnicity/acc": 0.7728},
}
"""The paper's single-task references (its "Single" rows), in our units and keys."""


# ---------------------------------------------------------------------------
# The paper's tables, transcribed as printed (ResNet-50, averages of three runs). Each row: the printed metrics in the table's column order,
# then the printed Δm in percent (None for Single). "+ Ours" is the row above plus DGR.

# Table 1: accuracy, as fractions.
_UTKFACE_COLUMNS = (("age/acc", 1.0), ("gender/acc", 1.0), ("ethnicity/acc", 1.0))
_UTKFACE = {
    "Single": (0.5233, 0.8964, 0.7728, None),
    "Vanilla": (0.5391, 0.9153, 0.7948, 2.66),
    "Vanilla + Ours": (0.5605, 0.9019, 0.7942, 3.50),
    "DWA": (0.5370, 0.9148, 0.7989, 2.68),
    "DWA + Ours": (0.5336, 0.9135, 0.8056, 2.71),
    "Uncertainty": (0.5385, 0.9137, 0.7961, 2.62),
    "Uncertainty + Ours": (0.5455, 0.9118, 0.7988, 3.11),
    "Auto-λ": (0.5405, 0.9171, 0.7965, 2.89),
    "Auto-λ + Ours": (0.5503, 0.9163, 0.8014, 3.69),
    "PCGrad": (0.5417, 0.9134, 0.7960, 2.80),
    "PCGrad + Ours": (0.5431, 0.8999, 0.7986, 2.50),
    "CAGrad": (0.5390, 0.9239, 0.7994, 3.17),
    "CAGrad + Ours": (0.5510, 0.9169, 0.8094, 4.11),
    "IMTL": (0.5250, 0.9173, 0.8039, 2.23),
    "IMTL + Ours": (0.5430, 0.9020, 0.8051, 2.86),
    "Nash-MTL": (0.5485, 0.9172, 0.8021, 3.64),
    "Nash-MTL + Ours": (0.5545, 0.9063, 0.8055, 3.77),
}

# Table 2: normal mean angle (deg), seg mIoU (%), depth abs err (x100). Split | MTAN.
_NYUV2_COLUMNS = (("normal/mean_angle", 1.0), ("seg/miou", 0.01), ("depth/abs_err", 0.01))
_NYUV2 = {
    "Single": ((22.40, 43.37, 52.24, None), (22.40, 43.37, 52.24, None)),
    "Vanilla": ((24.19, 46.02, 41.36, 6.32), (24.05, 46.05, 41.03, 6.55)),
    "Vanilla + Ours": ((23.98, 47.11, 40.11, 8.26), (24.04, 46.24, 39.98, 7.51)),
    "DWA": ((24.20, 45.84, 41.58, 6.02), (24.06, 46.47, 41.48, 6.71)),
    "DWA + Ours": ((24.18, 46.43, 41.08, 6.82), (24.10, 46.81, 41.37, 7.24)),
    "Uncertainty": ((24.24, 46.46, 41.04, 6.78), (23.97, 46.96, 41.02, 7.57)),
    "Uncertainty + Ours": ((24.34, 46.52, 40.80, 6.83), (23.89, 46.23, 40.00, 7.28)),
    "Auto-λ": ((23.60, 48.20, 39.83, 9.85), (23.43, 48.10, 39.21, 10.02)),
    "Auto-λ + Ours": ((23.60, 48.04, 39.45, 9.96), (23.32, 48.19, 39.03, 10.50)),
    "PCGrad": ((24.55, 45.41, 42.32, 4.70), (24.07, 46.71, 39.79, 5.41)),
    "PCGrad + Ours": ((24.03, 46.71, 41.20, 7.19), (23.95, 46.86, 39.73, 7.42)),
    "CAGrad": ((23.39, 46.79, 40.55, 8.61), (23.23, 47.48, 39.92, 9.38)),
    "CAGrad + Ours": ((23.28, 47.48, 39.81, 9.78), (22.98, 48.49, 38.94, 11.56)),
    "IMTL": ((22.45, 50.11, 38.69, 13.75), (22.53, 49.84, 38.43, 13.43)),
    "IMTL + Ours": ((22.37, 49.62, 37.70, 14.13), (22.39, 50.04, 38.18, 14.42)),
    "Nash-MTL": ((23.60, 48.20, 39.83, 9.85), (23.43, 48.10, 39.84, 10.02)),
    "Nash-MTL + Ours": ((22.54, 48.25, 39.53, 11.65), (22.66, 48.38, 39.59, 11.75)),
}

# Table 3: seg mIoU (%), part-seg mIoU (%), disparity abs err. Split | MTAN.
_CITYSCAPES_COLUMNS = (("seg/miou", 0.01), ("part_seg/miou", 0.01), ("disp/abs_err", 1.0))
_CITYSCAPES = {
    "Single": ((56.20, 52.74, 0.84, None), (56.20, 52.74, 0.84, None)),
    "Vanilla": ((56.29, 52.31, 0.75, 3.35), (56.64, 52.52, 0.74, 4.09)),
    "Vanilla + Ours": ((56.27, 52.45, 0.74, 3.83), (57.13, 51.88, 0.73, 4.37)),
    "DWA": ((55.63, 52.22, 0.72, 4.10), (55.88, 52.51, 0.72, 4.43)),
    "DWA + Ours": ((55.84, 52.39, 0.72, 4.33), (55.65, 52.54, 0.72, 4.31)),
    "Uncertainty": ((56.77, 54.59, 0.77, 4.29), (56.66, 55.03, 0.76, 4.89)),
    "Uncertainty + Ours": ((56.76, 55.46, 0.78, 4.43), (56.59, 55.10, 0.75, 5.29)),
    "Auto-λ": ((55.95, 52.94, 0.70, 5.53), (55.97, 52.67, 0.69, 5.77)),
    "Auto-λ + Ours": ((57.22, 53.55, 0.71, 6.28), (56.76, 53.29, 0.69, 6.63)),
    "PCGrad": ((55.40, 52.53, 0.72, 4.15), (55.53, 52.83, 0.72, 4.42)),
    "PCGrad + Ours": ((56.04, 52.53, 0.72, 4.53), (56.61, 52.75, 0.72, 5.01)),
    "CAGrad": ((56.55, 55.05, 0.71, 6.83), (56.36, 55.32, 0.72, 6.49)),
    "CAGrad + Ours": ((57.05, 55.16, 0.71, 7.19), (56.66, 56.07, 0.72, 7.14)),
    "IMTL": ((58.33, 55.43, 0.76, 6.14), (58.67, 55.77, 0.76, 6.55)),
    "IMTL + Ours": ((58.46, 55.33, 0.75, 6.55), (58.12, 55.73, 0.75, 6.60)),
    "Nash-MTL": ((57.65, 55.59, 0.75, 6.23), (57.64, 55.09, 0.74, 6.31)),
    "Nash-MTL + Ours": ((57.78, 55.04, 0.74, 6.36), (57.77, 55.60, 0.74, 6.71)),
}

# Table 4(c), Pascal-Context: seg mIoU (%), human parts mIoU (%), normal mean angle (deg),
# saliency IoU (%), edge odsF (%). Split ("Vanilla") | MTAN (printed as "MTAN"). The paper
# prints no single-task row, so Δm of a run needs --reference (single-task runs).
_PASCAL_COLUMNS = (
    ("seg/miou", 0.01),
    ("human_parts/miou", 0.01),
    ("normal/mean_angle", 1.0),
    ("saliency/miou", 0.01),
    ("edge/odsf", 0.01),
)
_PASCAL = {
    "Vanilla": ((63.8, 58.6, 14.9, 65.1, 69.2, -2.86), (63.7, 58.9, 14.8, 65.4, 69.6, -2.39)),
    "Vanilla + Ours": (
        (64.2, 58.7, 14.8, 65.2, 69.5, -2.42),
        (63.8, 59.0, 14.7, 65.5, 69.6, -2.19),
    ),
}

_SCENE_NETWORKS = ("split", "mtan")
_SCENE_TABLES = {
    "nyuv2": (_NYUV2, _NYUV2_COLUMNS),
    "cityscapes": (_CITYSCAPES, _CITYSCAPES_COLUMNS),
    "pascal": (_PASCAL, _PASCAL_COLUMNS),
}
TABLES = ("utkface", *_SCENE_TABLES, "imagenet")
"""The data sets that ``paper_rows`` has a table for."""


def _row(columns, printed) -> dict[str, float]:
    *values, delta = printed
    row = {key: round(value * scale, 10) for (key, scale), value in zip(columns, values)}
    row["delta_m"] = 0.0 if delta is None else round(delta / 100, 10)
    return row


def paper_rows(dataset: str, network: str | None = None) -> dict[str, dict[str, float]]:
    """The paper's rows for ``dataset``: ``{method: {metric key: value, "delta_m": Δm}}``
    in our units (mIoU and accuracy as fractions, NYUv2 depth abs err in metres, angles in
    degrees, Δm as a fraction; "Single" has Δm 0). Methods: "Single", then each of
    Vanilla, DWA, Uncertainty, Auto-λ, PCGrad, CAGrad, IMTL, Nash-MTL with and without
    " + Ours" (DGR); Pascal-Context (Table 4(c)) only Vanilla and Vanilla + Ours, with no
    "Single". ``network``: "split" or "mtan" for nyuv2 / cityscapes / pascal, None for
    utkface and imagenet (Table 4(a)'s last row: "Vanilla" and "Vanilla + Ours (K=k)" for
    k = 1, 2, 3 dummy sets, top-1 ``label/acc`` only, no Δm). A dataset the paper has no
    table for raises a one-line ValueError."""
    if dataset == "utkface":
        if network is not None:
            raise ValueError(
                f"paper_rows('utkface'): Table 1 has one network; pass network=None, not {network!r}"
            )
        return {method: _row(_UTKFACE_COLUMNS, printed) for method, printed in _UTKFACE.items()}
    if dataset in _SCENE_TABLES:
        if network not in _SCENE_NETWORKS:
            raise ValueError(
                f"paper_rows({dataset!r}): network must be one of {_SCENE_NETWORKS}, got {network!r}"
            )
        table, columns = _SCENE_TABLES[dataset]
        column = _SCENE_NETWORKS.index(network)
        return {method: _row(columns, printed[column]) for method, printed in table.items()}
    if dataset == "imagenet":
        if network is not None:
            raise ValueError(
                f"paper_rows('imagenet'): Table 4(a) has one network; pass network=None, not {network!r}"
            )
        return {name: {"label/acc": top1} for name, top1 in _imagenet_rows().items()}
    raise ValueError(
        f"paper_rows: the paper has no table for {dataset!r}; it has {', '.join(TABLES)}"
    )


_PAPER_NAMES = {
    "equal": "Vanilla",
    "vanilla": "Vanilla",
    "dwa": "DWA",
    "uncertainty": "Uncertainty",
    "autolambda": "Auto-λ",
    "autoλ": "Auto-λ",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "imtl": "IMTL",
    "nashmtl": "Nash-MTL",
}


def paper_method_name(weighting: str, dgr: bool) -> str:
    """The paper's row name for a weighting method (``"equal"`` -> ``"Vanilla"``,
    ``"auto_lambda"`` -> ``"Auto-λ"``, ...) with ``" + Ours"`` when DGR is on. A weighting
    the paper does not report keeps its own name (so it matches no ``paper_rows`` row)."""
    base = _PAPER_NAMES.get(weighting.lower().replace("_", "").replace("-", ""), weighting)
    return f"{base} + Ours" if dgr else base


PAPER_TABLE_4A = {
    # (dataset, primary tasks): Δm in percent for Vanilla, then DGR with the dummy-set
    # counts of the table's columns, 1, 2 and 3 (``PAPER_TABLE_4A_DUMMY``).
    ("nyuv2", 1): (0.00, 0.05, 0.07, -0.25),
    ("nyuv2", 2): (6.76, 6.84, 6.93, 6.73),
    ("nyuv2", 3): (6.32, 7.13, 8.05, 7.96),
    ("cityscapes", 1): (0.00, -0.04, 0.02, 0.03),
    ("cityscapes", 2): (3.24, 3.30, 3.33, 3.28),
    ("cityscapes", 3): (3.37, 3.72, 3.83, 3.66),
}
"""The paper's Table 4(a), as printed (ImageNet's top-1 row: ``PAPER_TABLE_4A_IMAGENET``)."""
PAPER_TABLE_4A_DUMMY = (0, 1, 2, 3)  # 0: Vanilla
PAPER_TABLE_4A_IMAGENET = (0.7613, 0.7630, 0.7650, 0.7598)  # top-1 accuracy
PAPER_IMAGENET_TOP1 = dict(zip(PAPER_TABLE_4A_DUMMY, PAPER_TABLE_4A_IMAGENET))
"""ImageNet top-1 (ResNet-50, as a fraction) by number of dummy sets, 0 the vanilla network."""


def _imagenet_rows() -> dict[str, float]:
    """Table 4(a)'s ImageNet row as ``paper_rows`` rows: "Vanilla" (no dummy set) and
    "Vanilla + Ours (K=k)" for k dummy sets; it prints top-1 only, no Δm."""
    return {
        "Vanilla" if k == 0 else f"Vanilla + Ours (K={k})": top1
        for k, top1 in PAPER_IMAGENET_TOP1.items()
    }
