"""GenerationWorkflow reading the wall clock (a non-deterministic call workflow code must never
make), used to prove the sandbox catches one that the unsandboxed runner (ATELIER_WORKFLOW_SANDBOX
=false) lets through. Its own module: the sandbox re-imports the module a workflow is defined in."""

from datetime import datetime

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from atelier.messages import GenerationRequest, GenerationResult
    from workflows.generation import GenerationWorkflow


@workflow.defn(name="GenerationWorkflow")
class ClockReadingGenerationWorkflow(GenerationWorkflow):
    @workflow.run
    async def run(self, req: GenerationRequest) -> GenerationResult:
        workflow.logger.debug("started at %s", datetime.now())  # the mistake the sandbox exists for
        return await super().run(req)
