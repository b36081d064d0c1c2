"""The `moe-service` command."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """Every command's subparser, from its module (each imports what it runs only when it runs)."""
    from moe_service.cli import bench, generate, offline, ops, serve

    p = argparse.ArgumentParser(prog="moe-service", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    offline.add_info_parser(sub)  # info
    generate.add_parsers(sub)  # generate
    offline.add_parsers(sub)  # experts, calibrate, simulate, train
    bench.add_parsers(sub)  # bench
    ops.add_parsers(sub)  # placement, rebalance, stats
    serve.add_parsers(sub)  # serve, demo
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.fn(ns)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from moe_service.serving.local import ClusterAuthError

        if not isinstance(e, ClusterAuthError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
