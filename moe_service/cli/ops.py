"""Operator commands against a running service's controller: placement, rebalance, stats (cli/views.py)."""

from __future__ import annotations

import argparse
import json
import os


def cmd_placement(ns: argparse.Namespace) -> int:
    from moe_service.cli.views import fetch, format_hottest, format_placement

    s = fetch(ns.controller, "/stats", timeout=10)
    print(json.dumps(s, indent=2) if ns.json else f"{format_placement(s)}\n\n{format_hottest(s)}")
    return 0


def cmd_rebalance(ns: argparse.Namespace) -> int:
    from moe_service.cli.views import fetch, format_rebalance

    r = fetch(ns.controller, "/rebalance" + ("?dry_run=1" if ns.dry_run else ""), method="POST",
              api_key=ns.api_key or os.environ.get("MOE_SERVICE_ADMIN_API_KEY") or os.environ.get("MOE_SERVICE_API_KEY"))
    print(json.dumps(r, indent=2) if ns.json else format_rebalance(r))
    return 0


def cmd_stats(ns: argparse.Namespace) -> int:
    from moe_service.cli.views import stats_screen

    stats_screen(ns.controller, ns.interval, ns.iterations)
    return 0


def add_parsers(sub) -> None:
    for name, fn, help_text in (
        ("placement", cmd_placement, "the current placement, per-worker load and the hottest experts"),
        ("rebalance", cmd_rebalance, "re-plan the placement from the load window and apply it (or --dry-run)"),
        ("stats", cmd_stats, "a live terminal view of per-worker load and the hottest experts"),
    ):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--controller", "--address", dest="controller", default="127.0.0.1:9095",
                        help="the controller's HTTP address (printed by `moe-service serve`)")
        sp.add_argument("--json", action="store_true")
        if name == "rebalance":
            sp.add_argument("--dry-run", action="store_true", help="print the plan and its balancedness only")
            sp.add_argument("--api-key", default=None, help="the admin key (default: $MOE_SERVICE_ADMIN_API_KEY, "
                            "else $MOE_SERVICE_API_KEY)")
        if name == "stats":
            sp.add_argument("--interval", type=float, default=2.0)
            sp.add_argument("--iterations", type=int, default=None, help="frames to draw (default: until Ctrl-C)")
        sp.set_defaults(fn=fn)
