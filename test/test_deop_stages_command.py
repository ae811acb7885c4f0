"""ovss-train-deop's released stages as a command: the three stages in the release's order, resume,
every refusal as one line with status 2, Ctrl-C, and the stages' input crops."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from planted_shapes import single_thread, write_planted_set  # noqa: F401
from test_deop_stages import TINY_ARCH

from ovss_ros.cli import train_deop
from ovss_ros.core.methods.deop.maskformer import ProposalNetwork
from ovss_ros.core.methods.deop.maskformer_weights import ProposalWeightsError
from ovss_ros.core.methods.deop.release_writer import proposal_tensors, write_detectron2
from ovss_ros.core.methods.deop.released_checkpoint import load_released_deop
from ovss_ros.training.deop_data import training_data
from ovss_ros.training.prompt_training import PromptStage
from ovss_ros.training.proposal_training import read_prompt


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planted")
    return write_planted_set(root, train=24, val=8, size=64, unseen=("green diamond",))


# --- the command --------------------------------------------------------------------------------


def command(root: Path, output: Path, stage: str, *extra: str) -> list[str]:
    return [
        "folder", str(root), "--stage", stage, "--output", str(output), "--model", str(TINY_VIT),
        "--pretrained", "none", "--device", "cpu", "--templates", "single", "--no-progress",
        "--val-images", "2", *extra,
    ]  # fmt: skip


def test_the_command_runs_the_three_stages_in_the_release_order(planted, tmp_path, caplog):
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(TINY_ARCH.to_dict()))
    small = ["--steps", "2", "--batch-size", "2", "--prompt-length", "4"]
    geometry = ["--crop", "64", "--pad", "64", "--short-sides", "64", "--val-size", "64"]
    prompt = tmp_path / "prompt"
    assert train_deop.main(command(planted, prompt, "prompt", *small, "--per-class", "2")) == 0
    proposals = tmp_path / "proposals"
    flags = [
        *small,
        *geometry,
        "--architecture",
        str(arch),
        "--prompt",
        str(prompt / "prompt.pth"),
    ]
    assert train_deop.main(command(planted, proposals, "proposals", *flags)) == 0
    deop = tmp_path / "deop"
    network = str(proposals / "proposal_model.pth")
    flags = [
        *small,
        *geometry,
        "--proposal-network",
        network,
        "--prompt",
        str(prompt / "prompt.pth"),
    ]
    assert train_deop.main(command(planted, deop, "deop", *flags)) == 0
    released = load_released_deop(deop / "model_final.pth")
    assert released.proposals.arch == TINY_ARCH
    context = read_prompt(prompt / "prompt.pth", 64)
    assert released.modules.prompt.context.shape == context.shape
    final = json.loads((deop / "metrics.json").read_text())["validation"][-1]
    assert final["step"] == 2 and {"mIoU_seen", "mIoU_unseen", "hIoU"} <= set(final)
    # resume continues the same run; a new run into it is refused
    assert (
        train_deop.main(command(planted, deop, "deop", *flags[:1], "4", *flags[2:], "--resume"))
        == 0
    )
    state = torch.load(deop / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and state["stage"] == "deop"
    # a resume with another proposal network of the same shapes is refused, the state kept
    torch.manual_seed(11)
    other = tmp_path / "other_proposals.pth"
    write_detectron2(other, proposal_tensors(ProposalNetwork(TINY_ARCH)), 0)
    before = (deop / "training_state.pt").read_bytes()
    again = [*flags[:1], "6", *flags[2:], "--resume"]
    again[again.index(network)] = str(other)
    caplog.clear()
    assert train_deop.main(command(planted, deop, "deop", *again)) == 2
    error = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(error) == 1 and "was trained with another proposal network" in error[0], error
    assert "resume with the proposal network (--proposal-network) the run started" in error[0]
    assert (deop / "training_state.pt").read_bytes() == before


def test_help_lists_a_flags_defaults_only_for_the_stages_that_read_it():
    """Each training flag's --help names the defaults of exactly the stages that take it; the
    others refuse it (check_stage_flags), and the help says so by leaving them out."""
    import re

    from ovss_ros.training.stage_config import STAGES

    parser = train_deop.build_parser()
    samples = {"scale": ["1", "2"], "short_sides": ["64"], "loss": ["ce"],
               "proposal_source": ["clusters"], "architecture": ["r50"],
               "proposal_network": ["x.pth"], "prompt": ["p.pth"]}  # fmt: skip
    flags = [
        a for a in parser._actions
        if a.dest in (*train_deop.HEAD_ONLY, *train_deop.RELEASED_ONLY, *train_deop.NOT_PROMPT,
                      *train_deop.PROMPT_ONLY, "steps", "lr", "crop", "clip_norm")
    ]  # fmt: skip
    assert len(flags) >= 16
    for action in flags:
        value = [] if action.nargs == 0 else samples.get(action.dest, ["2"])
        listed = re.search(r"\(default: (.*)\)$", " ".join(action.help.split()))
        named = set() if listed is None else {p.split()[0] for p in listed[1].split("; ")}
        for stage in (*STAGES, "head"):
            args = train_deop.parse_args(
                ["folder", "root", "--stage", stage, action.option_strings[0], *value]
            )
            try:
                train_deop.check_stage_flags(args)
                taken = True
            except ValueError as error:
                assert "does not apply to --stage " + stage in str(error)
                taken = False
            assert taken == (not train_deop.refused_by(action.dest, stage)), (action.dest, stage)
            if listed is not None:
                assert (stage in named) == taken, (action.dest, stage, action.help)
    helps = {a.dest: " ".join(a.help.split()) for a in flags}
    assert helps["per_class"] == "prompt: mask crops per class (default: prompt 32)"
    assert helps["warmup_steps"] == "prompt: constant warm-up steps (default: prompt 100)"
    assert helps["pad"] == "padded training input side (default: proposals 640; deop 512)"
    assert "prompt" not in helps["val_size"] and helps["no_color_aug"].startswith(
        "proposals, deop:")  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "extra", "message"),
    [
        ("deop", [], "give --proposal-network"),
        ("deop", ["--proposal-network", "missing.pth"], "does not exist"),
        ("proposals", ["--prompt", "missing.pth"], "does not exist"),
        ("prompt", ["--proposal-network", "x.pth"], "is for stage deop"),
        ("prompt", ["--prompt", "x.pth"], "gives stages proposals and deop"),
        (
            "deop",
            ["--architecture", "r50", "--proposal-network", "x.pth"],
            "is for stage proposals",
        ),
        ("proposals", ["--architecture", "r18"], "--architecture"),
        ("proposals", ["--proposal-source", "clusters"], "does not apply to --stage proposals"),
        ("head", ["--pad", "64"], "does not apply to --stage head"),
        ("prompt", ["--pad", "64"], "does not apply to --stage prompt"),
        ("prompt", ["--short-sides", "64"], "does not apply to --stage prompt"),
        ("prompt", ["--val-size", "64"], "does not apply to --stage prompt"),
        ("prompt", ["--no-color-aug"], "does not apply to --stage prompt"),
        ("proposals", ["--per-class", "2"], "does not apply to --stage proposals"),
        ("deop", ["--warmup-steps", "2", "--proposal-network", "x.pth"], "does not apply"),
        ("prompt", ["--steps", "0"], "steps must be >= 1"),
        ("deop", ["--pad", "8", "--proposal-network", "x"], "pad must be in 32..2048"),
        ("proposals", ["--short-sides", "10"], "short sides must be in"),
        ("proposals", ["--batch-size", "1", "--pad", "32"], "batch statistics"),
        ("proposals", ["--lr", "nan"], "lr must be > 0"),
        ("prompt", ["--resume"], "nothing to resume"),
    ],
)
def test_every_refusal_is_one_line_and_status_2(planted, tmp_path, stage, extra, message):
    from test_cli_bad_input import assert_refused, run_tool

    (tmp_path / "x.pth").write_bytes(b"")
    extra = [str(tmp_path / "x.pth") if flag == "x.pth" else flag for flag in extra]
    args = command(planted, tmp_path / "run", stage, *extra)
    assert_refused(run_tool("train_deop", *args, timeout=600), message)
    assert not (tmp_path / "run" / "training_state.pt").exists()


def test_a_damaged_or_foreign_state_is_refused(planted, tmp_path):
    from test_cli_bad_input import assert_refused, run_tool

    run = tmp_path / "run"
    small = ["--steps", "1", "--batch-size", "2", "--prompt-length", "2", "--per-class", "2"]
    assert train_deop.main(command(planted, run, "prompt", *small)) == 0
    before = (run / "training_state.pt").read_bytes()
    done = run_tool("train_deop", *command(planted, run, "prompt", *small))  # a new run into it
    assert_refused(done, "holds an earlier run")
    assert (run / "training_state.pt").read_bytes() == before
    network = tmp_path / "net.pth"
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}}, network)
    flags = ["--proposal-network", str(network), "--resume", "--steps", "1"]
    assert_refused(run_tool("train_deop", *command(planted, run, "deop", *flags)), "res4 has 0")
    # the prompt run's state resumed as stage deop: another stage's
    torch.manual_seed(0)
    torch.save({"model": {}}, network)
    state = torch.load(run / "training_state.pt", weights_only=True)
    state["trainable"] = {"context": torch.zeros(3, 3)}
    torch.save(state, run / "training_state.pt")
    done = run_tool("train_deop", *command(planted, run, "prompt", *small, "--resume"))
    assert_refused(done, "does not fit this run (trainable tensors: 'context' has shape (3, 3)")
    # a prompt file for another text width; a proposal network for another CLIP
    prompt = tmp_path / "prompt.pth"
    torch.save({"model": {"clip_adapter.prompt_learner.prefix_prompt": torch.zeros(4, 7)}}, prompt)
    flags = ["--prompt", str(prompt), "--steps", "1"]
    done = run_tool("train_deop", *command(planted, tmp_path / "p", "proposals", *flags))
    assert_refused(done, "(length, 64) prompt context")
    other = ProposalNetwork(replace(TINY_ARCH, embedding_dim=16))
    write_detectron2(network, proposal_tensors(other), 0)
    flags = ["--proposal-network", str(network), "--steps", "1"]
    done = run_tool("train_deop", *command(planted, tmp_path / "d", "deop", *flags))
    assert_refused(done, "train it on this CLIP")


# --- the released stages' inputs -----------------------------------------------------------------


def test_the_semantic_crops_pad_with_128_and_ignore_and_cut_larger_crops(planted):
    from ovss_ros.training.released_data import MaskCrops, SemanticCrops, class_pairs

    data = training_data("folder", planted)  # 64 px images, labels in the seen-class space
    padded = SemanticCrops(data, (48,), crop=640, pad=80, seed=1, color=False)
    rgb, labels = padded[0]
    assert rgb.shape == (80, 80, 3) and labels.shape == (80, 80)
    assert (rgb[48:] == 128).all() and (labels[48:] == 255).all()  # below the 48 px image
    assert set(np.unique(labels[:48, :48])) <= {0, 1, 2, 3, 255}  # seen classes; unseen 255
    cut = SemanticCrops(data, (96,), crop=80, pad=64, seed=1)  # the release's 640 -> 512
    rgb, labels = cut[3]
    assert rgb.shape == (64, 64, 3) and labels.shape == (64, 64)
    again = SemanticCrops(data, (96,), crop=80, pad=64, seed=1)[3]
    assert np.array_equal(rgb, again[0]) and np.array_equal(labels, again[1])
    pairs = class_pairs(data, per_class=3, seed=0)
    assert sorted({cls for _, cls in pairs}) == [0, 1, 2, 3]
    assert all(sum(1 for _, c in pairs if c == cls) <= 3 for cls in range(4))
    crop, mask, cls = MaskCrops(data, pairs, size=32, seed=0)[5]
    assert crop.shape == (32, 32, 3) and mask.shape == (32, 32) and mask.any()
    _, labels = data.train.sample(pairs[0][0])
    assert pairs[0][1] in data.training_labels()[labels]


def test_ctrl_c_keeps_the_last_state_and_names_it(planted, tmp_path, monkeypatch, capsys):
    calls = []
    losses_of = PromptStage.losses

    def interrupted_on_the_third_step(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return losses_of(self, batch)

    monkeypatch.setattr(PromptStage, "losses", interrupted_on_the_third_step)
    run = tmp_path / "run"
    small = ["--steps", "100", "--batch-size", "2", "--prompt-length", "2", "--per-class", "2"]
    assert (
        train_deop.main(command(planted, run, "prompt", *small, "--checkpoint-every", "1")) == 130
    )
    state = run / "training_state.pt"
    assert torch.load(state, weights_only=True)["step"] == 2  # written whole after step 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last
        == f"ovss-train-deop: interrupted; the last checkpoint is {state} (continue with --resume)"
    )


def test_an_unreadable_prompt_file_is_named_as_a_prompt_file(tmp_path):
    junk = tmp_path / "prompt.pth"
    junk.write_bytes(b"not a torch archive")
    with pytest.raises(ProposalWeightsError, match="prompt file") as error:
        read_prompt(junk, 64)
    assert "proposal network" not in str(error.value)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda s: s["history"].update(train=5), "its history is damaged"),
        (lambda s: s.update(history={}), "its history is damaged"),
        (lambda s: s["history"].update(validation=[{"x": 1}]), "its history is damaged"),
        (lambda s: s["history"].update(train=[7]), "its history is damaged"),
        (lambda s: s.update(step=10**15), "its step is damaged"),
        (lambda s: s.update(step=True), "its step is damaged"),
        (
            lambda s: s["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
            "optimizer state 'momentum_buffer' of parameter 0 has shape (3,)",
        ),
        (
            lambda s: s["trainable"]["context"].fill_(float("nan")),
            "'context' holds NaN or infinite values",
        ),
    ],
)
def test_a_tampered_state_is_refused_before_a_step(planted, tmp_path, caplog, tamper, message):
    """A state whose history, optimizer moments or trainable values were altered is refused
    on --resume with one reason (status 2), before a step runs, and the file is kept."""
    run = tmp_path / "run"
    small = ["--steps", "1", "--batch-size", "2", "--prompt-length", "2", "--per-class", "2"]
    assert train_deop.main(command(planted, run, "prompt", *small)) == 0
    path = run / "training_state.pt"
    state = torch.load(path, weights_only=True)
    tamper(state)
    torch.save(state, path)
    before = path.read_bytes()
    caplog.clear()
    again = command(planted, run, "prompt", *small[2:], "--steps", "2", "--resume")
    assert train_deop.main(again) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0], errors
    assert path.read_bytes() == before
