"""Parameter changes of the node as transactions: validated whole, applied whole, or put back.

A request (``ros2 param set``, a params file, ``set_parameters_atomically``) is validated on the
executor thread against the whole would-be configuration (``parameters.validate_update``, plus
what only the node can check: the loaded model's limits, the mask topics' names) and refused
with the reason unless all of it is valid: nothing changes then. Accepted changes are queued for
the change encoder's thread (``change_encoder``), which prepares them beside the frame worker,
all of them or none (``Segmenter.prepare_update``: text encoded, models loaded), while frames go
on with the state in force; the worker then commits the prepared change between two frames
(``Segmenter.commit``: plain assignments). A change accepted while another is being prepared
supersedes it: that encoding stops and both are prepared again as one, the newer values
winning. Should preparing fail anyway (out of memory while encoding text), the previous settings
and vocabulary stay in force, diagnostics show the failure, and the parameters are put back to
the values in force on the executor thread (a guard condition), so ``ros2 param get`` tells the
truth.

Three sets of values: ``values`` (accepted: what ``ros2 param get`` shows), ``pending`` (accepted,
not yet taken by the change encoder), ``applied`` (in force: the worker's).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter

from ovss_ros.core import Stopped, parse_classes
from ovss_ros.ros import parameters
from ovss_ros.ros.log_text import describe
from ovss_ros.ros.request_guard import CallbackFaults

if TYPE_CHECKING:
    from ovss_ros.core.segmenter import PreparedUpdate, Segmenter

SUPERSEDED: Final = "superseded"  # ``prepare``: a newer change stopped it; prepare again
# Settings whose change may load a model (a VLM, a DeOP checkpoint, a Stable Diffusion model):
# frames do not wait for such a change (nor for one that encodes texts); they wait for the rest.
LOADING = frozenset(
    {
        "method",
        "refinement",
        "deop.checkpoint",
        "dslo.affinity",
        "dslo.sd.model",
        "dslo.sd.precision",
        "pnp.vlm_model",
        "pnp.vlm_pretrained",
    }
)


@dataclass(frozen=True)
class Handover:
    """A change the change encoder prepared, for the worker to commit between two frames:
    ``prepared`` (None when preparing failed: ``failure`` says why, nothing is put in force)."""

    changes: dict[str, Any]
    prepared: PreparedUpdate | None
    failure: str | None
    accepted: int = 0  # acceptances so far when the changes were taken (``prepare``)


class ParameterTransactions:
    """The node's parameter values and the life of a change: validate, accept, apply, revert.

    ``check(settings, changes)``: the node's own checks of a would-be configuration (raises
    ValueError). ``wake``: tells the worker that changes are waiting.
    """

    def __init__(
        self,
        node: Node,
        values: dict[str, Any],
        faults: CallbackFaults,
        check: Callable[[parameters.Settings, Mapping[str, Any]], None],
        wake: Callable[[], None],
    ) -> None:
        self._node = node
        self._faults = faults
        self._check = check
        self._wake = wake
        self.lock = threading.Lock()
        self.values = values
        self.settings = parameters.validate(values)  # raises ParameterError
        self.pending: dict[str, Any] = {}
        # What is in force (the worker's): parameter values, settings, last change's fate.
        self.applied: dict[str, Any] = {}
        self.applied_settings: parameters.Settings | None = None
        self.change = ("none", False)  # (diagnostics text, failed)
        # name -> (refused value, in force, acceptances when the refused change was taken)
        self.reverts: dict[str, tuple[Any, Any, int]] = {}
        self._acceptances = 0  # accepted requests so far (reverts not counted)
        self._accepted: dict[str, int] = {}  # name -> the acceptance that last set it
        self._cancel: threading.Event | None = None  # set: the change being prepared is stale
        self._reverting = False
        self._revert_guard: Any = None

    @property
    def acceptances(self) -> int:
        """Accepted requests so far (reverts not counted): a Handover with ``accepted`` at
        least this holds every change accepted until now."""
        return self._acceptances

    def install(self) -> None:
        """Register the parameter callbacks, and the guard condition that lets the worker have
        the executor thread put parameters back (``revert``)."""
        self._node.add_pre_set_parameters_callback(parameters.coerce)
        self._node.add_on_set_parameters_callback(self.validate)
        self._node.add_post_set_parameters_callback(self.accept)
        self._revert_guard = self._node.create_guard_condition(self.revert)

    def begin_load(self) -> tuple[parameters.Settings, dict[str, Any]]:
        """The configuration to load the model with; changes accepted so far are in it."""
        with self.lock:
            self.pending.clear()
            return self.settings, dict(self.values)

    def loaded(self, values: dict[str, Any], settings: parameters.Settings) -> None:
        """The model is loaded with ``values``: they are in force."""
        self.applied, self.applied_settings = values, settings
        self.change = ("none", False)

    # Executor thread.

    def validate(self, requested: list[Parameter]) -> SetParametersResult:
        """Refuse the whole request unless every parameter after it is valid (nothing changes).

        Valid means everything the worker will do with it can be done: the whole configuration
        passes ``parameters.validate`` (types, ranges, vocabulary, templates, query count),
        the crop fits the loaded model, and every class gets a mask topic that ROS accepts.
        """
        changes = self.own_changes(requested)
        if not changes:  # rclpy's own (use_sim_time, qos_overrides.*): its business
            return SetParametersResult(successful=True)
        try:
            for parameter in requested:
                if parameter.name in changes and parameter.type_ == Parameter.Type.NOT_SET:
                    raise ValueError(f"{parameter.name} cannot be unset")
            settings = parameters.validate_update(self.values, changes)
            self._check(settings, changes)
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        except Exception as error:  # a request nobody foresaw: refused, never accepted
            self._faults.record("parameter validation", error)
            return SetParametersResult(
                successful=False, reason=f"cannot validate the request: {describe(error)}"
            )
        finally:
            parameters.restore_types(self._node)
        return SetParametersResult(successful=True)

    def accept(self, accepted: list[Parameter]) -> None:
        """Hand accepted changes to the change encoder (``wake``); a change it is preparing
        meanwhile is superseded (stopped, then prepared again with these).

        Not a revert (``revert``): those values are in force already.
        """
        changes = self.own_changes(accepted)
        if not changes:
            return
        with self.lock:
            self.values.update(changes)
            self.settings = parameters.validate(self.values)
            if not self._reverting:
                self._acceptances += 1
                self._accepted.update(dict.fromkeys(changes, self._acceptances))
                self.pending.update(changes)
                # Before the answer goes out: no later status says a previous change's fate.
                self.change = ("preparing", False)
                if self._cancel is not None:
                    self._cancel.set()
        if not self._reverting:
            self._wake()

    def revert(self) -> None:
        """Put parameters whose change failed back to the values in force, so that
        ``ros2 param get`` tells the truth; a name accepted again after the failed change was
        taken is left alone, even with the same value (that newer change is queued, being
        prepared or in force). Runs on the executor thread, like every parameter request."""
        with self.lock:
            reverts, self.reverts = self.reverts, {}
            wanted = [
                Parameter(name, parameters.SPECS[name].type, value)
                for name, (refused, value, taken) in reverts.items()
                if self._accepted.get(name, 0) <= taken
                and name not in self.pending
                and self.values.get(name) == refused
            ]
        if not wanted:
            return
        self._reverting = True
        try:
            result = self._node.set_parameters_atomically(wanted)
        finally:
            self._reverting = False
        names = ", ".join(parameter.name for parameter in wanted)
        if result.successful:
            self._node.get_logger().warning(f"parameters put back to the values in force: {names}")
        else:
            self._node.get_logger().error(f"could not put back {names}: {result.reason}")

    @staticmethod
    def own_changes(requested: list[Parameter]) -> dict[str, Any]:
        """The node's own parameters among ``requested``, as plain values."""
        return {
            p.name: parameters.normalize(p.name, p.value)
            for p in requested
            if p.name in parameters.SPECS
        }

    # Change encoder's thread.

    def prepare(
        self,
        segmenter: Segmenter | None,
        stop: threading.Event,
        run: Callable[[bool, Callable[[], Any]], Any] = lambda _slow, work: work(),
    ) -> Handover | str | None:
        """Take the accepted changes and prepare them, all of them or none, changing nothing
        in force: a Handover (prepared, or its failure), SUPERSEDED when a newer change stopped
        the encoding (its changes are pending again, under the newer ones), or None when there
        was nothing to prepare. Raises Stopped when ``stop`` (the node's) is set. ``run(slow,
        work)`` does the preparation (``work()``) and returns its result, told whether the
        change encodes texts or may load a model (``LOADING``): the frames wait only for a
        change that does neither, so the change encoder runs such a quick one at the frames'
        priority and a slow one on its low-priority thread.

        Validation refused everything that can be foreseen, so a failure here is unexpected
        (e.g. out of memory while encoding text): the worker settles it (``commit``).
        Diagnostics say ``preparing`` from the acceptance on (``accept``), ``encoding N texts``
        when the change has texts to encode, until the worker put it in force (``applied``).
        """
        with self.lock:
            changes, self.pending = self.pending, {}
            if not changes or segmenter is None:
                self.pending = changes
                return None
            cancel = self._cancel = threading.Event()
            accepted = self._acceptances
        engine_changes = {
            name: value
            for name, value in changes.items()
            if name in parameters.RUNTIME_ENGINE_FIELDS
        }
        before = self.change  # restored if the node stops meanwhile
        try:
            # One step: validated and built for the end state, never for a mix of old and new
            # (new classes with new background words, a method with the classes it gets).
            classes = parse_classes(changes["classes"]) if "classes" in changes else None
            count = self._announce(segmenter, classes, engine_changes)
            prepared = run(
                bool(count) or bool(LOADING & set(engine_changes)),
                lambda: segmenter.prepare_update(classes, engine_changes, cancel=cancel),
            )
        except Stopped:
            if stop.is_set() or not cancel.is_set():
                with self.lock:
                    # A change encoder of an earlier configure ending late (a model load cannot
                    # stop half-way) leaves the diagnostics of the one now running alone.
                    if self._cancel is cancel:
                        self.change = before
                raise  # the node is stopping: nothing failed, nothing to put back
            with self.lock:  # superseded: prepared again, the newer values winning
                self.pending = {**changes, **self.pending}
            return SUPERSEDED
        except Exception as error:
            # Only the text: the traceback holds the tensors of the failed encoding.
            return Handover(changes, None, describe(error), accepted)
        finally:
            with self.lock:
                if self._cancel is cancel:  # not a later configure's change encoder's
                    self._cancel = None
        return Handover(changes, prepared, None, accepted)

    def _announce(
        self,
        segmenter: Segmenter,
        classes: list | None,
        engine_changes: Mapping[str, Any],
    ) -> int:
        """Diagnostics: ``encoding N texts`` while a change with texts to encode is prepared;
        returns N (1 when it cannot be counted: prepare_update finds out what is wrong)."""
        try:
            count = segmenter.texts_to_encode(classes, engine_changes)
        except Exception:
            return 1
        if count:
            self.change = (f"encoding {count} texts", False)
        return count

    # Worker thread.

    def commit(self, segmenter: Segmenter | None, handover: Handover) -> str | None:
        """Put a prepared change in force between two frames (``Segmenter.commit``), or settle
        its failure; return the failure (None: in force).

        On failure the engine keeps its previous settings and vocabulary, the node keeps its
        previous output settings, diagnostics show the failure, and the parameters are put back
        to the values in force (``revert``).
        """
        failure = handover.failure
        if segmenter is None:
            return "the model was unloaded"
        if handover.prepared is not None:
            try:
                segmenter.commit(handover.prepared)
            except Exception as error:  # prepared against an older state: never expected
                segmenter.discard(handover.prepared)
                failure = describe(error)
        self._settle(handover.changes, failure, segmenter, handover.accepted)
        return failure

    def _settle(
        self,
        changes: Mapping[str, Any],
        failure: str | None,
        segmenter: Segmenter,
        accepted: int = 0,
    ) -> None:
        """Record what is in force after applying ``changes`` (failed: ``failure``; taken after
        ``accepted`` acceptances: what the revert leaves alone is accepted after them)."""
        if failure is None:
            self.applied.update(changes)
        else:
            # The truth, whatever the engine kept: its settings, and the vocabulary in force.
            in_force = segmenter.config.flat()
            for name in changes:
                if name in parameters.RUNTIME_ENGINE_FIELDS:
                    self.applied[name] = parameters.in_force(name, in_force[name])
        try:
            self.applied_settings = parameters.validate(self.applied)
        except ValueError as error:  # only if restoring the engine failed half-way
            self._node.get_logger().error(f"settings in force do not validate: {error}")
        if failure is None:
            self.change = ("applied", False)
            return
        names = ", ".join(sorted(changes))
        with self.lock:  # before the status says it failed: a reader of it sees the reverts
            for name, value in changes.items():
                if value != self.applied[name]:
                    self.reverts[name] = (value, self.applied[name], accepted)
        self.change = (f"{names}: {failure}; previous settings in force", True)
        self._node.get_logger().error(
            f"could not apply the change of {names} ({failure}): the previous settings stay in "
            "force and the parameters are put back"
        )
        self._revert_guard.trigger()
