"""The node's typed services (ovss_interfaces): ``~/set_vocabulary`` and ``~/segment``.

``~/set_vocabulary`` (SetVocabulary) stands for one ``set_parameters_atomically`` request on
``classes``, ``templates`` and ``background_words`` (``service_requests.vocabulary_parameters``)
and goes through the node's own parameter path (``transactions``): the same validation and
reasons, all of it or nothing, and ``ros2 param get`` shows what the service set; a parameter
change racing it is merged or queued like any other, so one whole state is in force after both.
The answer comes once the change is in force (put in force by the worker between two frames,
after the change encoder prepared it) or has failed: the callback is a coroutine awaiting an
rclpy Future that the worker completes, in a callback group of its own (a waiting coroutine
holds its group), so the executor thread serves frames, parameters and the other services
meanwhile.

``~/segment`` (Segment) segments one image for the request's words with the method and settings
in force, never touching the streaming vocabulary (``core.word_segmentation``). The request is
checked on the executor thread (one image, words parsed and their prompts within the text
model's limits), then queued. Its slow part (the image decoded, the words' texts encoded, the
method copy built: up to minutes on a CPU with many words and templates) runs beside the frames
on a thread of its own with the change encoder's bounds (``core/side_encoding``: one intra-op
thread and nice +10 on a CPU, the low-priority stream on CUDA), one request at a time, in the
order they came. Prepared, a request goes to the worker, which runs its forward pass alone
after one turn's frames: a camera frame waits for at most one request's forward pass (one
frame's worth of work), never for its encoding, however many are queued. The image is bounded
like a camera frame (``max_input_pixels``, from its declared size before decoding). At most
MAX_QUEUED requests wait (beside the one being prepared); more are refused. Its counters are on
/diagnostics (``<node>: segment service``) once a request came.

Neither service raises: whatever a request holds, it gets an answer (``success`` false and a
reason), and an unexpected error is counted like any callback's (``request_guard``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile
from rclpy.task import Future

from ovss_interfaces.srv import Segment, SetVocabulary
from ovss_ros.core import Stopped, parse_classes
from ovss_ros.ros import parameters
from ovss_ros.ros.change_encoder import ENCODER_STOP_TIMEOUT_S
from ovss_ros.ros.label_info import label_info
from ovss_ros.ros.log_text import describe, one_line
from ovss_ros.ros.request_guard import RECENT_S, refusal
from ovss_ros.ros.running import stop_event
from ovss_ros.ros.segment_jobs import (
    UNCONFIGURED,
    SegmentCounters,
    SegmentJob,
    failed_answer,
    prepare_job,
    segment_response,
)
from ovss_ros.ros.service_requests import (
    RequestError,
    segment_image,
    vocabulary_parameters,
)

if TYPE_CHECKING:
    from rclpy.node import Node

MAX_QUEUED = 2  # ~/segment requests waiting beside the one being prepared; more: refused
# Requests (and answers) DDS keeps per service until the executor takes them: a burst of up to
# this many requests sent at once is answered whole (refused as busy beyond MAX_QUEUED); with
# rclpy's default (10) the rest were dropped unanswered and uncounted.
REQUEST_QUEUE_DEPTH = 100
SETTLED_KEPT = 64  # settled changes remembered for answers registered late
STOPPING = "the node is stopping: the request was not handled"
STOPPED_BEFORE = (
    "the node was cleaned up or shut down before the change was in force: the parameters hold "
    "it, and the next configure loads it"
)


class VocabularyServices:
    """Serves ``~/set_vocabulary`` and ``~/segment`` for an ovss node (``SegmentationNodeMixin``).

    The node calls ``between_frames`` (wrapping its change hook, for the worker),
    ``run_segment_job`` (the worker's hook after the frames), ``settled`` (worker: a change was
    put in force or failed) and ``close`` (executor: the worker is stopping). ``wake``: makes
    the worker take a turn soon (the frame buffer's wake).
    """

    def __init__(self, node: Node, wake: Callable[[], None]) -> None:
        self._node = node
        self._wake = wake
        self._lock = threading.Condition()  # also wakes the preparing thread
        self._waiters: list[tuple[int, Future]] = []  # (acceptance, future of (failure, names))
        self._settled: deque[tuple[int, str | None, list[str]]] = deque(maxlen=SETTLED_KEPT)
        self._jobs: deque[SegmentJob] = deque()  # accepted, waiting for their preparation
        self._preparing: SegmentJob | None = None  # the one being prepared
        self._ready: deque[SegmentJob] = deque()  # prepared, waiting for the worker
        self._preparer: threading.Thread | None = None
        self.counters = SegmentCounters()
        # A group of their own: a request awaiting the worker holds its callback group until
        # answered, and the node's default group (mutually exclusive) serves the frames, the
        # timers, the guard conditions and the other services. Reentrant: several requests may
        # wait at once (the executor's one thread runs their callbacks in turn).
        group = ReentrantCallbackGroup()
        for srv_type, name, handler in (
            (SetVocabulary, "~/set_vocabulary", self._set_vocabulary),
            (Segment, "~/segment", self._segment),
        ):
            node.create_service(
                srv_type,
                name,
                self._guarded(handler, srv_type, name),
                qos_profile=QoSProfile(depth=REQUEST_QUEUE_DEPTH),
                callback_group=group,
            )

    # Executor thread.

    def _guarded(
        self,
        handler: Callable[[Any, Any], Coroutine[Any, Any, Any]],
        srv_type: Any,
        name: str,
    ) -> Callable[[Any, Any], Coroutine[Any, Any, Any]]:
        """``handler`` answering instead of raising (``request_guard.guarded``, for a coroutine;
        marked so that ``guard_services`` leaves it as it is)."""
        faults = self._node.callback_faults

        async def call(request: Any, response: Any) -> Any:
            try:
                return await handler(request, response)
            except Exception as error:
                faults.record(f"service {name}", error)
                return refusal(srv_type, request, f"the request could not be handled: {error}")

        call.__wrapped__ = handler  # type: ignore[attr-defined]
        return call

    async def _set_vocabulary(
        self, request: SetVocabulary.Request, response: SetVocabulary.Response
    ) -> SetVocabulary.Response:
        node = self._node
        try:
            changes = vocabulary_parameters(request)
        except RequestError as error:
            return self._vocabulary_answer(response, str(error))
        if node.segmenter is None:
            return self._vocabulary_answer(response, UNCONFIGURED)
        wanted = [
            Parameter(name, parameters.SPECS[name].type, value) for name, value in changes.items()
        ]
        result = node.set_parameters_atomically(wanted)
        if not result.successful:
            return self._vocabulary_answer(response, result.reason)
        failure, names = await self._in_force(node.transactions.acceptances)
        return self._vocabulary_answer(response, failure, names)

    def _vocabulary_answer(
        self, response: Any, failure: str | None, names: list[str] | None = None
    ) -> SetVocabulary.Response:
        """``success`` unless ``failure``; label_info: ``names``, or the vocabulary in force."""
        response.success = failure is None
        response.reason = one_line(failure or "")
        segmenter = self._node.segmenter
        if names is None:
            names = [entry.name for entry in segmenter.classes] if segmenter is not None else []
        threshold = segmenter.config.score_threshold if segmenter is not None else 0.0
        header = response.label_info.header
        header.stamp = self._node.get_clock().now().to_msg()
        response.label_info = label_info(header, names, threshold)
        return response

    def _in_force(self, acceptance: int) -> Future:
        """A Future of (failure or None, class names in force) for the change accepted as
        ``acceptance``: done once the worker has put it in force or it failed."""
        future = Future(executor=self._node.executor)
        with self._lock:
            done = next((s for s in self._settled if s[0] >= acceptance), None)
            if done is None:
                self._waiters.append((acceptance, future))
        if done is not None:
            future.set_result(done[1:])
        return future

    async def _segment(self, request: Segment.Request, response: Segment.Response) -> Any:
        counters = self.counters
        counters.received += 1
        job, reason = self._segment_job(request)
        if job is None:
            counters.refused += 1
            return refusal(Segment, request, reason)
        self._wake()
        answer = await job.future
        if answer.success:
            counters.succeeded += 1
        elif answer.reason == STOPPING:
            counters.refused += 1
        return answer

    def _segment_job(self, request: Segment.Request) -> tuple[SegmentJob | None, str]:
        """The request checked and queued for the worker, or (None, why it is refused)."""
        node = self._node
        try:
            _, image = segment_image(request)
            classes = parse_classes(list(request.words))
            segmenter = node.segmenter
            if segmenter is None:
                return None, UNCONFIGURED
            if not node._running():
                return None, f"not segmenting: {node._engine_state().not_enabled_reason}"
            from ovss_ros.core.word_segmentation import check_words  # torch: loaded already

            check_words(segmenter, classes)
        except (RequestError, ValueError) as error:
            return None, str(error)
        job = SegmentJob(image, classes, Future(executor=node.executor), image.header)
        with self._lock:
            waiting = len(self._jobs) + len(self._ready)
            if waiting >= MAX_QUEUED:
                return None, (
                    f"busy: {waiting} ~/segment requests wait already (at most "
                    f"{MAX_QUEUED}); try again once one is answered"
                )
            self._jobs.append(job)
            self._start_preparer()
            self._lock.notify_all()
        return job, ""

    def close(self) -> None:
        """The worker is stopping (the stop event is set): every waiting request gets its answer
        now, and the preparing thread ends (waited for, like the change encoder)."""
        with self._lock:
            waiters, self._waiters = self._waiters, []
            jobs = [*self._ready, *self._jobs, *filter(None, [self._preparing])]
            self._jobs, self._ready, self._preparing = deque(), deque(), None
            self._lock.notify_all()
        for _, future in waiters:
            future.set_result((STOPPED_BEFORE, None))
        for job in jobs:
            job.future.set_result(refusal(Segment, Segment.Request(), STOPPING))
        preparer, self._preparer = self._preparer, None  # one still ending takes no request
        if preparer is not None:  # ends at once: the encoding checks the stop event
            preparer.join(ENCODER_STOP_TIMEOUT_S)

    def statuses(self) -> list[DiagnosticStatus]:
        """The service's status for the node's /diagnostics (``NodeDiagnostics``): none until
        a ``~/segment`` request came."""
        counters = self.counters
        if not counters.received:
            return []
        with self._lock:
            queued = len(self._jobs) + len(self._ready)
        seconds = counters.last_seconds
        values = {
            "requests": counters.received,
            "succeeded": counters.succeeded,
            "refused": counters.refused,
            "failed": counters.failed,
            "queued": queued,
            "last request (s)": "n/a" if seconds is None else f"{seconds:.2f}",
        }
        recent = time.monotonic() - counters.last_failure <= RECENT_S
        status = DiagnosticStatus(
            level=DiagnosticStatus.WARN if recent else DiagnosticStatus.OK,
            name=f"{self._node.get_name()}: segment service",
            message=f"a request failed in the last {RECENT_S:.0f} s" if recent else "ok",
            hardware_id=self._node._engine_state().loaded_device,
            values=[KeyValue(key=key, value=str(value)) for key, value in values.items()],
        )
        return [status]

    # Worker thread.

    def between_frames(self, apply_pending: Callable[[], None]) -> Callable[[], None]:
        """The worker's hook before the frames: ``apply_pending`` (the node's: put a prepared
        change in force); a failure there answers the waiting ``~/set_vocabulary`` requests."""

        def run() -> None:
            try:
                apply_pending()
            except Exception as error:
                self._fail_waiters(f"the change could not be confirmed: {describe(error)}")
                raise

        return run

    def settled(self, accepted: int, failure: str | None) -> None:
        """The change taken after ``accepted`` acceptances is in force (``failure`` None), or
        failed: the ``~/set_vocabulary`` requests it holds get their answers."""
        segmenter = self._node.segmenter
        names = [entry.name for entry in segmenter.classes] if segmenter is not None else []
        with self._lock:
            self._settled.append((accepted, failure, names))
            done = [future for number, future in self._waiters if number <= accepted]
            self._waiters = [(n, f) for n, f in self._waiters if n > accepted]
        for future in done:
            future.set_result((failure, names))

    def _fail_waiters(self, failure: str) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for _, future in waiters:
            future.set_result((failure, None))

    def run_segment_job(self) -> None:
        """The worker's hook after the frames: the oldest prepared ``~/segment`` request gets
        its forward pass and its answer. One a turn: the frames taken next wait for this forward
        pass alone, never for an encoding nor for every request queued meanwhile; the worker is
        woken again while more are prepared."""
        with self._lock:
            if not self._ready:
                return
            job = self._ready.popleft()
            more = bool(self._ready)
        if more:
            self._wake()
        start = time.monotonic()
        try:
            answer = self._run_job(job)
        except Stopped:
            job.future.set_result(refusal(Segment, Segment.Request(), STOPPING))
            raise
        except Exception as error:  # the request's own failure: the worker goes on
            answer = failed_answer(self.counters, error)
        if answer is None:  # prepared against a state no longer in force: prepared again
            return
        self.counters.last_seconds = time.monotonic() - start
        job.future.set_result(answer)

    def _run_job(self, job: SegmentJob) -> Segment.Response | None:
        """The answer to prepared ``job``: its forward pass; None when a change was put in force
        since it was prepared (what its method copy shares may be gone): queued first for
        preparation again."""
        from ovss_ros.core.word_segmentation import segment_prepared  # torch: loaded already

        if job.answer is not None:
            return job.answer
        if job.error is not None:
            return failed_answer(self.counters, job.error)
        segmenter = self._node.segmenter
        if segmenter is None:
            return refusal(Segment, Segment.Request(), UNCONFIGURED)
        if job.generation != segmenter.generation:
            job.method = None
            with self._lock:
                self._jobs.appendleft(job)
                self._start_preparer()
                self._lock.notify_all()
            return None
        segmentation = segment_prepared(segmenter, job.method, job.rgb)
        return segment_response(segmentation, job.header, segmenter.config.score_threshold)

    # Preparing thread.

    def _start_preparer(self) -> None:
        """Start this configure's preparing thread unless it runs (under the lock)."""
        if self._preparer is None or not self._preparer.is_alive():
            self._preparer = threading.Thread(
                target=self._prepare_loop,
                args=(stop_event(self._node),),
                name="ovss_segment_words",
                daemon=True,
            )
            self._preparer.start()

    def _prepare_loop(self, stop: threading.Event) -> None:
        """Prepare the accepted requests one at a time, oldest first, and hand each to the
        worker; bounded like the change encoder's slow thread (``SideEncoding.encoding_thread``,
        once, before the first encoding)."""
        bound = False
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._jobs) or stop.is_set())
                if stop.is_set():
                    return
                job = self._preparing = self._jobs.popleft()
            segmenter = self._node.segmenter
            if not bound and segmenter is not None:
                segmenter.side.encoding_thread()
                bound = True
            try:
                settings = self._node.transactions.applied_settings
                prepare_job(job, segmenter, settings, stop, self.counters)
            except Stopped:
                return  # stopping: ``close`` answers the request
            except Exception as error:  # the request's own failure: the thread goes on
                job.error = error
            with self._lock:
                if self._preparing is not job:  # answered by ``close`` meanwhile
                    continue
                self._preparing = None
                self._ready.append(job)
            self._wake()
