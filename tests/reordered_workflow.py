"""A copy of GenerationWorkflow with one step moved (download before charge), used to prove
that the replay test catches a nondeterministic change. Its own module: the workflow sandbox
re-imports the module a workflow is defined in, so it must import nothing but workflow code."""

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from atelier.messages import GenerationRequest, GenerationResult
    from workflows.generation import GenerationWorkflow


@workflow.defn(name="GenerationWorkflow")
class ReorderedGenerationWorkflow(GenerationWorkflow):
    @workflow.run
    async def run(self, req: GenerationRequest) -> GenerationResult:
        return await super().run(req)

    async def _steps(self, req):
        await self._download(req)
        await super()._steps(req)
