"""The plan flags that extract, compensate and eval share: which plan, and how its channels are ordered."""

from __future__ import annotations

import argparse

from ..cli_options import settings_from_args


def add_plan_flags(p) -> None:
    p.add_argument(
        "--weight-reorder",
        "--weight_reorder",
        dest="weight_reorder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reorder before slicing (reference-format plans need it if they were searched with it; "
        "our plans record it)",
    )
    p.add_argument(
        "--activation-order",
        action="store_true",
        help="order the channels by their activations on the calibration sets, as a search with "
        "--channel-importance activations did, for a plan that does not store that order (the reference "
        "format, docs/quality.json); give the search's calibration flags (the defaults give the defaults' order)",
    )


def plan_request(args, *, activation_order: bool):
    """The plan flags as a request, checked with the text --activation-order will read."""
    from ..run.planned_model import PlanRequest
    from ..search.calibration import CalibrationSettings

    calibration = settings_from_args(CalibrationSettings, args) if activation_order else None
    request = PlanRequest(args.plan, weight_reorder=args.weight_reorder, activation_order=calibration)
    request.check(texts=True)
    return request
