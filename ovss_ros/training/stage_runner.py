"""Building and running one released stage of ``ovss-train-deop`` from its settings.

:func:`check_stage_inputs` refuses what can be refused before any model loads (the stage order:
``deop`` needs a proposal network; files that are missing; an architecture that cannot be);
:func:`run_released` builds the stage on a loaded CLIP and runs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ovss_ros.core.file_checks import FileCheckError, read_json
from ovss_ros.training.stage_config import StageConfig, released_defaults

if TYPE_CHECKING:  # torch and the model libraries load after the flags are checked
    from ovss_ros.core.clip.model_loading import LoadedClip
    from ovss_ros.core.methods.deop.maskformer import MaskFormerArchitecture
    from ovss_ros.training.deop_data import TrainingData

ARCHITECTURES = ("r101c", "r50")


def stage_config(stage: str, overrides: dict) -> StageConfig:
    """The released defaults of ``stage`` with the given values (None: the default) replaced;
    ValueError for a bad value."""
    values = released_defaults(stage)
    values |= {k: v for k, v in overrides.items() if v is not None}
    if "short_sides" in values:
        values["short_sides"] = tuple(values["short_sides"])
    return StageConfig(**values).validate()


def architecture(spec: str, text_width: int | None = None) -> MaskFormerArchitecture:
    """``r101c`` (the release's), ``r50``, or a JSON file of MaskFormerArchitecture fields;
    ``embedding_dim`` set to CLIP's ``text_width`` for the named ones. ValueError otherwise."""
    from dataclasses import replace

    from ovss_ros.core.methods.deop.maskformer import R50, R101C, MaskFormerArchitecture

    if spec.lower() in ARCHITECTURES:
        arch = {"r101c": R101C, "r50": R50}[spec.lower()]
        if text_width is not None:
            arch = replace(arch, embedding_dim=text_width)
        return arch.check()
    try:
        values = read_json(Path(spec).expanduser(), "--architecture file")
    except FileCheckError as error:
        raise ValueError(
            f"--architecture: {error} (or name one of {list(ARCHITECTURES)})"
        ) from None
    if not isinstance(values, dict):
        raise ValueError(f"--architecture {spec!r}: a JSON object of architecture fields needed")
    try:
        return MaskFormerArchitecture.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--architecture {spec!r}: {error}") from None


def check_stage_inputs(
    stage: str,
    output: Path,
    resume: bool,
    proposal_network: str | None,
    prompt: str | None,
    arch: str | None,
) -> None:
    """Refuse, before any model loads (ValueError / FileNotFoundError with the reason): a
    ``deop`` run without a proposal network (the release trains it first, then freezes it);
    a proposal network given to another stage; a prompt file given to stage ``prompt``; an
    architecture for a stage other than ``proposals``; a missing file; a new run into a folder
    holding an earlier run's state."""
    if stage == "deop" and not proposal_network:
        raise ValueError(
            "stage deop trains DeOP with the proposal network frozen: give --proposal-network "
            "(stage proposals' proposal_model.pth, or a DeOP release file); train it first with "
            "--stage proposals"
        )
    if stage != "deop" and proposal_network:
        raise ValueError(f"--proposal-network is for stage deop, not {stage}")
    if stage == "prompt" and prompt:
        raise ValueError("--prompt gives stages proposals and deop the stage-prompt result")
    if stage != "proposals" and arch:
        raise ValueError(f"--architecture is for stage proposals, not {stage}")
    named = arch and arch.lower() in ARCHITECTURES
    files = (("--proposal-network", proposal_network), ("--prompt", prompt))
    for flag, path in (*files, ("--architecture", None if named else arch)):
        if path and not os.path.exists(Path(path).expanduser()):
            raise FileNotFoundError(
                f"{flag} {path!r} does not exist"
                + (f" (or name one of {list(ARCHITECTURES)})" if flag == "--architecture" else "")
            )
    if (output / "training_state.pt").exists() and not resume:
        raise ValueError(
            f"--output {str(output)!r} holds an earlier run's training_state.pt: --resume "
            "continues it; a new run needs another folder"
        )


def run_released(
    clip: LoadedClip,
    data: TrainingData,
    config: StageConfig,
    output: Path,
    resume: bool = False,
    proposal_network: str | None = None,
    prompt: str | None = None,
    arch: str | None = None,
) -> dict:
    """Build stage ``config.stage`` on ``clip`` and run it; the summary of
    :func:`~ovss_ros.training.stage_loop.run_stage`. Raises ValueError (ProposalWeightsError
    for an unusable proposal network or prompt file, StageStateError for a bad resume state)."""
    from ovss_ros.training.proposal_training import read_prompt

    text_width = int(clip.model.token_embedding.weight.shape[1])
    context = None if not prompt else read_prompt(prompt, text_width)
    if config.stage == "prompt":
        from ovss_ros.training.prompt_training import PromptStage

        stage = PromptStage(clip, data, config)
    elif config.stage == "proposals":
        from ovss_ros.training.proposal_training import ProposalStage

        network_arch = architecture(arch or "r101c", int(clip.model.visual.output_dim))
        stage = ProposalStage(clip, data, config, network_arch, context)
    else:
        from ovss_ros.core.methods.deop.maskformer_weights import load_proposal_network
        from ovss_ros.training.released_training import DeopStage

        network = load_proposal_network(proposal_network, clip.device).network
        stage = DeopStage(clip, data, config, network, context)
    from ovss_ros.training.stage_loop import run_stage

    return run_stage(stage, config, output, resume=resume)
