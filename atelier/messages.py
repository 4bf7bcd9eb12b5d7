"""Message types and names shared by workflows, activities, the worker and the API.

Pure dataclasses and constants only: this module is imported inside the workflow
sandbox, so it must stay deterministic (no I/O, no clocks, no randomness).
Every field has a default so old histories keep decoding when one is added.

No `from __future__ import annotations` here: the SDK's payload converter calls
`typing.get_type_hints` on a dataclass every time it decodes one, and string annotations make
each call evaluate them anew (GenerationRequest: 176 us with them, 36 us without).
"""

from dataclasses import dataclass, field
from enum import Enum

DEFAULT_TASK_QUEUE = "atelier-generation"
WORKFLOW_TYPE = "GenerationWorkflow"

# Custom search attributes (registered on the server at start; see README).
SA_USER_ID = "UserId"
SA_KIND = "GenerationKind"
SA_STATUS = "GenerationStatus"
SEARCH_ATTRIBUTES = {SA_USER_ID: "Keyword", SA_KIND: "Keyword", SA_STATUS: "Keyword"}

# Keys a user's free-form parameters may never carry (they would overwrite the request's own).
RESERVED_PARAMETER_KEYS = frozenset({"images", "prompt", "model"})


class Kind(str, Enum):
    PHOTOGRAPHY = "photography"
    FITTING = "fitting"


class Status(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self not in (Status.QUEUED, Status.RUNNING)


class Stage(str, Enum):
    QUEUED = "queued"
    CHARGING = "charging"
    SELECTING_MODEL = "selecting_model"
    DOWNLOADING = "downloading"
    GENERATING = "generating"
    WAITING_FOR_MODEL = "waiting_for_model"
    SAVING = "saving"
    NOTIFYING = "notifying"
    REFUNDING = "refunding"
    DONE = "done"


class ErrorCode(str, Enum):
    """Named reasons a generation did not complete; they are also ApplicationError types."""

    INVALID_REQUEST = "InvalidRequest"
    INSUFFICIENT_CREDITS = "InsufficientCredits"
    UNKNOWN_USER = "UnknownUser"
    BAD_IMAGE = "BadImage"
    URL_REFUSED = "UrlRefused"
    DOWNLOAD_FAILED = "DownloadFailed"
    CONTENT_BLOCKED = "ContentBlocked"
    PROVIDER_REJECTED = "ProviderRejected"
    PROVIDER_UNAVAILABLE = "ProviderUnavailable"
    NO_MODEL_AVAILABLE = "NoModelAvailable"
    PROVIDER_BUSY = "ProviderBusy"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    EXPIRED_BEFORE_START = "ExpiredBeforeStart"
    ALREADY_REFUNDED = "AlreadyRefunded"
    CANCELED = "Canceled"
    INTERNAL = "Internal"


class Priority(str, Enum):
    """A generation's lane for model slots: higher lanes get slots first; `low` ages upward."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# Webhook events a request may ask for; each delivery is its own signed message.
WEBHOOK_EVENTS = ("started", "progress", "completed")


@dataclass
class ImageInput:
    """One input image: a URL to fetch, or the id of a file uploaded through the API."""

    url: str | None = None
    file_id: str | None = None


@dataclass
class StoredImage:
    """A reference to an image in the blob store. Never the bytes."""

    key: str = ""
    content_type: str = ""
    width: int = 0
    height: int = 0
    size: int = 0


@dataclass
class Timeouts:
    """Activity timeouts in seconds; the starter fills them from settings."""

    short_start_to_close_s: float = 10.0
    download_start_to_close_s: float = 60.0
    download_heartbeat_s: float = 20.0
    ai_start_to_close_s: float = 300.0
    ai_heartbeat_s: float = 30.0
    ai_schedule_to_start_s: float = 600.0
    ai_max_attempts: int = 3
    notify_schedule_to_close_s: float = 6 * 3600.0
    deadline_s: float = 3600.0


@dataclass
class ValidationLimits:
    """Limits the workflow checks a request against. They travel in the request, so changing a
    default only affects generations started after the change (see docs/deployment.md)."""

    max_prompt_chars: int = 4000
    max_style_chars: int = 200
    max_parameters: int = 20
    max_parameter_key_chars: int = 64
    max_parameter_value_chars: int = 500
    max_url_chars: int = 2048
    photography_images: tuple[int, int] = (1, 4)
    fitting_images: tuple[int, int] = (2, 5)
    # Refuse reserved parameter keys whatever their case and surrounding whitespace (" Prompt").
    # False in old histories: they were only compared in lower case.
    reserved_keys_normalized: bool = False


@dataclass
class GenerationRequest:
    task_id: str = ""
    user_id: str = ""
    kind: str = Kind.PHOTOGRAPHY.value
    images: list[ImageInput] = field(default_factory=list)
    prompt: str = ""
    style: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    webhook_url: str | None = None
    cost: int = 0
    # Empty means: the workflow's own task queue.
    ai_task_queue: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)
    created_at: str = ""
    webhook_events: list[str] = field(default_factory=lambda: ["completed"])
    priority: str = Priority.NORMAL.value
    # The validation limits in force when the generation was submitted, recorded in its input so a
    # running workflow keeps them across a deploy that changes them. None: the limits of old histories.
    limits: ValidationLimits | None = None


@dataclass
class AttemptRecord:
    """One AI call attempt, as the workflow saw it."""

    model: str = ""
    provider: str = ""
    started_at: str = ""
    ended_at: str | None = None
    # running | succeeded | failed | busy (the provider said 429) | timed_out | canceled
    outcome: str = "running"
    error_code: str | None = None
    error: str | None = None


@dataclass
class GenerationResult:
    task_id: str = ""
    status: str = Status.COMPLETED.value
    kind: str = ""
    work_id: str | None = None
    images: list[StoredImage] = field(default_factory=list)
    model: str | None = None
    error_code: str | None = None
    error: str | None = None
    credits_charged: int = 0
    credits_refunded: int = 0
    attempts: list[AttemptRecord] = field(default_factory=list)
    # The stage the generation failed in, and whether submitting it again could help.
    error_stage: str | None = None
    retryable: bool | None = None
    # The sequence number of the change that ended the generation (the progress stream's last id).
    seq: int = 0


@dataclass
class Progress:
    """What the `progress` query answers while the workflow runs."""

    task_id: str = ""
    kind: str = ""
    status: str = Status.QUEUED.value
    stage: str = Stage.QUEUED.value
    percent: int = 0
    model: str | None = None
    attempt: int = 0
    last_error: str | None = None
    error_code: str | None = None
    credits_charged: int = 0
    credits_refunded: int = 0
    work_id: str | None = None
    images: list[StoredImage] = field(default_factory=list)
    # Increases at every visible change: the id of the progress stream's events.
    seq: int = 0
    # While waiting for a model slot: 1 = next; None when not waiting or unknown.
    queue_position: int | None = None
    eta_s: float | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    error_stage: str | None = None
    retryable: bool | None = None


@dataclass
class ProgressEvent:
    """One visible change of a generation, for the progress stream (`events` query)."""

    seq: int = 0
    at: str = ""
    status: str = Status.QUEUED.value
    stage: str = Stage.QUEUED.value
    percent: int = 0
    model: str | None = None
    attempt: int = 0
    queue_position: int | None = None
    eta_s: float | None = None
    error_code: str | None = None


@dataclass
class EventsRequest:
    after_seq: int = 0


@dataclass
class EventsPage:
    """The events after `after_seq` (oldest first) and the current progress."""

    events: list[ProgressEvent] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)


@dataclass
class QueueUpdate:
    """Sent to a waiting generation by the model's admission workflow."""

    model: str = ""
    position: int | None = None
    eta_s: float | None = None


# ---- activity inputs and outputs -------------------------------------------------------


@dataclass
class ChargeRequest:
    task_id: str = ""
    user_id: str = ""
    amount: int = 0
    reason: str = ""


@dataclass
class ChargeResult:
    charged: int = 0
    balance: int = 0
    replayed: bool = False


@dataclass
class RefundRequest:
    task_id: str = ""
    user_id: str = ""
    reason: str = ""


@dataclass
class RefundResult:
    refunded: int = 0
    balance: int = 0
    replayed: bool = False


@dataclass
class SelectModelRequest:
    kind: str = ""
    exclude: list[str] = field(default_factory=list)


@dataclass
class ModelChoice:
    model: str = ""
    provider: str = ""
    priority: int = 0
    # The model's declared quota (None: not declared), and whether its calls go through the
    # model's admission workflow (false for the local compositor with no quota declared).
    max_concurrent: int | None = None
    per_minute: int | None = None
    admission: bool = False


@dataclass
class DownloadRequest:
    task_id: str = ""
    user_id: str = ""
    images: list[ImageInput] = field(default_factory=list)


@dataclass
class DownloadResult:
    images: list[StoredImage] = field(default_factory=list)


@dataclass
class AiRequest:
    task_id: str = ""
    # The generation's owner: its outputs are held for them until saved or released (retention).
    user_id: str = ""
    kind: str = ""
    model: str = ""
    provider: str = ""
    prompt: str = ""
    style: str = ""
    images: list[StoredImage] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    # The admission slot this attempt holds (empty: none). The activity gives it back itself the
    # moment the provider answers, before storing the outputs and without a workflow task.
    slot_ticket: str = ""
    admission_workflow_id: str = ""


@dataclass
class AiOutput:
    images: list[StoredImage] = field(default_factory=list)
    model: str = ""
    provider: str = ""
    text: str = ""
    # True when the activity released its admission slot itself (the workflow need not).
    slot_released: bool = False


@dataclass
class SaveWorkRequest:
    task_id: str = ""
    user_id: str = ""
    kind: str = ""
    model: str = ""
    prompt: str = ""
    images: list[StoredImage] = field(default_factory=list)


@dataclass
class SavedWork:
    work_id: str = ""
    replayed: bool = False


@dataclass
class NotifyRequest:
    """Deliver the final generation object to a webhook; the activity renders and signs it."""

    task_id: str = ""
    user_id: str = ""
    url: str = ""
    created_at: str = ""
    completed_at: str = ""
    result: GenerationResult = field(default_factory=GenerationResult)
    retry_for_s: float = 6 * 3600.0
    # completed (the final object, above) | started | progress (the change in `change`)
    event: str = "completed"
    change: ProgressEvent | None = None


@dataclass
class RetentionRequest:
    """One run of the retention clean-up: how many generations (and uploads) one activity call looks at."""

    batch: int = 200


@dataclass
class RetentionResult:
    generations_released: int = 0
    uploads_deleted: int = 0
    blobs_deleted: int = 0
    # This batch was full and released something: there may be more to do now.
    more: bool = False


@dataclass
class NotifyResult:
    status_code: int = 0
    attempts: int = 0


# ---- model admission (workflows/admission.py) -------------------------------------------

ADMISSION_WORKFLOW_TYPE = "ModelAdmissionWorkflow"


def admission_task_queue(task_queue: str = DEFAULT_TASK_QUEUE) -> str:
    """The task queue the admission workflows of a deployment run on: their own, so that a slot's
    hand-over never waits behind a burst of generation tasks on the main queue."""
    return f"{task_queue}-admission"


def admission_workflow_id(model: str, task_queue: str = DEFAULT_TASK_QUEUE) -> str:
    """One admission workflow per model (and per deployment: a task queue of its own, as
    tests have, gets its own)."""
    if task_queue == DEFAULT_TASK_QUEUE:
        return f"admission-{model}"
    return f"admission-{model}@{task_queue}"


@dataclass
class SlotRequest:
    """A generation asks the model's admission workflow for one call slot."""

    # Unique per AI call attempt ("<task_id>:<n>"): a repeated request is recognised.
    ticket: str = ""
    # The generation workflow the grant is signalled to.
    task_id: str = ""
    user_id: str = ""
    priority: str = Priority.NORMAL.value
    model: str = ""
    # When the generation first asked (workflow time, epoch seconds): a re-request after a
    # 429 keeps its place in line.
    enqueued_at: float = 0.0
    # The model's declared quota, from the catalogue (None: not declared).
    max_concurrent: int | None = None
    per_minute: int | None = None
    # A slot not released within this is taken back (its holder is presumed gone).
    lease_s: float = 3600.0


@dataclass
class SlotGrant:
    ticket: str = ""
    model: str = ""


@dataclass
class SlotRelease:
    ticket: str = ""
    # ok | busy (the provider answered 429) | failed | withdrawn (gave up waiting)
    outcome: str = "ok"
    duration_s: float | None = None


@dataclass
class LineAnswer:
    """What the admission workflow answers a generation joining its line (the `join_line`
    update): the slot at once when one is free, else where the generation stands."""

    granted: bool = False
    position: int | None = None
    eta_s: float | None = None


@dataclass
class SlotTicket:
    """What request_slot answers: where the request went and, when the admission workflow
    answered at once, whether the slot is already this generation's. Results recorded before
    the answer existed read as not granted: those generations wait for the grant signal."""

    workflow_id: str = ""
    granted: bool = False
    position: int | None = None
    eta_s: float | None = None


@dataclass
class SlotHolder:
    ticket: str = ""
    task_id: str = ""
    user_id: str = ""
    granted_at: float = 0.0
    lease_until: float = 0.0
    # The grant's sequence number: a 429 on a slot granted before the last decrease is not news.
    serial: int = 0


@dataclass
class AdmissionState:
    """Everything a model's admission workflow knows; carried across continue-as-new."""

    model: str = ""
    max_concurrent: int | None = None
    per_minute: int | None = None
    # What 429s taught (None: the declared limit, or the undeclared start).
    learned_limit: float | None = None
    decreased_at_serial: int = 0
    # The outcomes of the last calls (1: the provider answered 429, 0: it served): a decrease
    # needs a share of 429s, not one 429 (a provider also answers 429 now and then at random).
    recent_busy: list[int] = field(default_factory=list)
    # The most calls in flight since the last decrease: a crowd of 429s halves this.
    peak_in_flight: int = 0
    waiting: list[SlotRequest] = field(default_factory=list)
    holders: list[SlotHolder] = field(default_factory=list)
    recent_starts: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)
    serial: int = 0
    # A waiting entry moves up one lane per this many seconds (0: never).
    aging_s: float = 120.0
    # How often holders are checked for a closed generation workflow.
    check_every_s: float = 30.0
    # Continue-as-new past this many history events, or when the server suggests it (0: only
    # then). Kept small: a history replayed after an eviction must replay quickly.
    max_history_events: int = 4000
    # Counters for metrics and tests.
    granted: int = 0
    # Of those, granted in the join_line answer itself (no grant signal).
    granted_at_once: int = 0
    busy: int = 0
    reclaimed: int = 0
    runs: int = 1


@dataclass
class AdmissionStatus:
    """What the admission workflow's `status` query answers."""

    model: str = ""
    in_flight: int = 0
    waiting: int = 0
    limit: int = 0
    max_concurrent: int | None = None
    per_minute: int | None = None
    learned_limit: float | None = None
    started_last_minute: int = 0
    mean_call_s: float | None = None
    granted: int = 0
    granted_at_once: int = 0
    busy: int = 0
    reclaimed: int = 0
    runs: int = 1


@dataclass
class HolderCheck:
    task_ids: list[str] = field(default_factory=list)


@dataclass
class HolderCheckResult:
    # The generations among those asked about that are no longer running.
    closed: list[str] = field(default_factory=list)
