"""`gateway gameday`: see the product work in two minutes (the playbooks, end to end)."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def run(args: argparse.Namespace) -> int:
    """Play the scenarios; print timelines and incident notes; non-zero if an outcome was missed."""
    from gateway.cli.drills import run as play

    logging.getLogger("gateway").setLevel(logging.WARNING)
    outcomes = play(args.scenarios, rate=args.rate, click_boost=args.click_boost, seed=args.seed)
    failed = 0
    for outcome in outcomes:
        scenario = outcome.scenario
        verdict = "PASS" if outcome.passed else "FAIL"
        print(f"\n=== ({scenario.name}) {scenario.title}: expected {scenario.expect} -> {verdict}")
        for line in outcome.timeline:
            print(f"  {line}")
        if args.notes:
            for note in outcome.notes:
                print()
                print(note)
        failed += not outcome.passed
    print(f"\ngame day: {len(outcomes) - failed} of {len(outcomes)} scenarios went as the playbooks say")
    return 1 if failed else 0


def register(commands: Any) -> None:
    """Add `gateway gameday`."""
    gameday = commands.add_parser(
        "gameday", help="play the release playbooks end to end on a simulated clock (a gateway on free ports)"
    )
    gameday.add_argument(
        "--scenarios",
        default="abcdef",
        help="which: a CTR drop, b null-rate, c errors, d clean ramp, e feature shift, f revenue drop with CTR flat",
    )
    gameday.add_argument("--rate", type=int, default=40, help="simulated requests per simulated second")
    gameday.add_argument("--click-boost", type=float, default=4.0, help="click probability = boost x served score")
    gameday.add_argument("--seed", type=int, default=7, help="random seed: the same seed plays the same day")
    gameday.add_argument("--no-notes", dest="notes", action="store_false", help="skip the incident notes")
    gameday.set_defaults(handler=run)
