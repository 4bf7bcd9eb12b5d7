"""Run the project's worker with a proposed change applied in memory, to measure the change
before anyone makes it. Benchmarks only: nothing here is imported by the product.

    python -m bench.patched --patch local-activities worker

Patches (each mirrors a diff proposed in docs/benchmarks.md):

* local-activities: GenerationWorkflow's quick database steps (charge_credits,
  select_model, save_work, refund_credits) run as local activities: same timeouts, retry
  policies and summaries, but no task dispatch, no server round trip and three history
  events fewer each; the workflow continues in the same workflow task. The success path
  only: the real change also widens the `except` around the charge (a local activity's
  failure comes unwrapped), which an in-memory swap cannot do; benchmarks never reject.
* heartbeat-twice-per-window: heartbeats sent every 22 s instead of every 0.8 of the timeout.
* autoscaling-pollers: the workers poll with the SDK's autoscaling pollers (PollerBehaviorAutoscaling),
  as they did before the sixth pass, instead of a fixed ATELIER_TASK_QUEUE_POLLS polls per queue.
* no-patch-marker, no-search-attribute-upserts, no-deadline-timer: diagnostics, not proposals.
  Each removes one thing a generation's history has that the floor of its shape lacks (the
  patch marker with its TemporalChangeVersion upsert; the GenerationStatus upserts; the
  deadline timer, started and then canceled), to measure what it costs the server. Run them
  outside the sandbox (the no-deadline-timer patch replaces a method of the workflow class,
  which a sandboxed instance re-imports).
* no-admission: diagnostic. Remote models' calls skip the admission line (docs/quotas.md): no
  slot request, grant or release signal per call.
* join-by-signal: the slot request is the request_slot signal, every grant a signal back, as
  before the join_line update (the activity's fallback taken every time).
"""

from __future__ import annotations

import argparse
import sys

LOCAL_ACTIVITY_NAMES = frozenset({"charge_credits", "select_model", "save_work", "refund_credits"})
# Options of execute_activity_method that local activities do not take.
_NOT_LOCAL = ("task_queue", "heartbeat_timeout", "versioning_intent", "priority")


def local_activities() -> None:
    from temporalio import workflow

    original = workflow.execute_activity_method

    def execute_activity_method(activity, *args, **kwargs):
        if getattr(activity, "__name__", "") in LOCAL_ACTIVITY_NAMES:
            for option in _NOT_LOCAL:
                kwargs.pop(option, None)
            return workflow.execute_local_activity_method(activity, *args, **kwargs)
        return original(activity, *args, **kwargs)

    workflow.execute_activity_method = execute_activity_method


def heartbeat_twice_per_window() -> None:
    """The workers send an activity's heartbeats every 22 s, not every 0.8 of its timeout (44 s
    for the AI call's 55 s): two reach the server per window, so one lost or late does not time
    the call out. Measures the remedy for the false heartbeat timeouts of docs/benchmarks.md
    (issue 13, fifth pass), at the cost of twice the heartbeat writes while calls wait."""
    import functools
    from datetime import timedelta

    import worker

    worker.Worker = functools.partial(worker.Worker, max_heartbeat_throttle_interval=timedelta(seconds=22))


def autoscaling_pollers() -> None:
    """The workers poll with the SDK's autoscaling pollers, as before the sixth pass: measures the
    lost dispatches of docs/benchmarks.md (issue 13, fifth and sixth passes), tasks the server
    handed to a poll whose shortened (11 s) deadline ran out."""
    from temporalio.worker import PollerBehaviorAutoscaling

    import worker

    worker.PollerBehaviorSimpleMaximum = lambda maximum: PollerBehaviorAutoscaling()


def no_patch_marker() -> None:
    """Every workflow.patched() answers True without recording a marker (new workflows only)."""
    from temporalio import workflow

    workflow.patched = lambda patch_id: True


def no_search_attribute_upserts() -> None:
    """Workflows upsert no search attribute (the GenerationStatus list filter stops working)."""
    from temporalio import workflow

    workflow.upsert_search_attributes = lambda *args, **kwargs: None


def no_deadline_timer() -> None:
    """The generation runs its steps without its deadline timer."""
    from workflows.generation import GenerationWorkflow

    GenerationWorkflow._steps_within_deadline = lambda self, req: self._steps(req)


def no_admission() -> None:
    """select_model answers admission=False: calls go straight to the provider."""
    import activities.models
    from atelier.messages import ModelChoice

    activities.models.ModelChoice = lambda **fields: ModelChoice(**{**fields, "admission": False})


def join_by_signal() -> None:
    """request_slot sends the signal at once, as before the join_line update."""
    from activities.admission import AdmissionActivities

    async def refuse(self, workflow_id, req):
        raise RuntimeError("join_line off (bench variant join-by-signal)")

    AdmissionActivities._join = refuse


def sequential_pre_call() -> None:
    """New generations run charge, download and model choice one after another, as before the
    generation-2026-12 bundle (the pre-call-steps-in-parallel patch answers False)."""
    from workflows import generation

    shipped = generation.GenerationWorkflow._patched

    def patched(self, patch_id: str) -> bool:
        return False if patch_id == generation.PATCH_PRE_CALL_IN_PARALLEL else shipped(self, patch_id)

    generation.GenerationWorkflow._patched = patched


PATCHES = {"local-activities": local_activities, "heartbeat-twice-per-window": heartbeat_twice_per_window,
           "autoscaling-pollers": autoscaling_pollers, "no-patch-marker": no_patch_marker,
           "no-search-attribute-upserts": no_search_attribute_upserts, "no-deadline-timer": no_deadline_timer,
           "no-admission": no_admission, "join-by-signal": join_by_signal,
           "sequential-pre-call": sequential_pre_call}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.patched", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", action="append", default=[], choices=sorted(PATCHES))
    parser.add_argument("program", choices=["worker"])
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    for name in args.patch:
        PATCHES[name]()
    import worker

    sys.argv = ["worker.py", *args.rest]
    worker.main()


if __name__ == "__main__":
    main()
