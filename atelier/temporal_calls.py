"""Small Temporal client calls shared by the API side and the activities (which must not import
the starter)."""

from __future__ import annotations

from temporalio.client import WorkflowExecutionDescription, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode


async def describe_if_exists(handle: WorkflowHandle) -> WorkflowExecutionDescription | None:
    """The workflow's description, or None if there is no such workflow (NOT_FOUND, or
    INVALID_ARGUMENT: an id the server cannot even look up)."""
    try:
        return await handle.describe()
    except RPCError as err:
        if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            return None
        raise
