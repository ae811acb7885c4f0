"""Every loader checks a file before it reads its data (issue 18, item 6).

Each loader gets malicious, oversized, corrupt and wrongly structured files: the refusal is one
clear reason of the loader's own error type, and a file made to inflate costs no memory (peak
RSS growth measured in a fresh process, far below the inflated size). A directory, /dev/zero
or a FIFO given as a file is refused as ``is not a regular file``, never opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT
from loader_bombs import InflatingTensor, peak_growth, write_inflating_archive
from safetensors.torch import save_file

from ovss_ros.core.clip.model_loading import ModelLoadError, load_clip
from ovss_ros.core.file_checks import (
    FileCheckError,
    check_safetensors,
    check_torch_archive,
    regular_file,
)
from ovss_ros.core.methods.deop.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from ovss_ros.core.methods.deop.deop import DeopConfig
from ovss_ros.core.methods.deop.heads import DeopModules

INFLATED = 512 << 20  # bytes a bomb's one tensor inflates to; its file is about 0.5 MB
BOUNDED_MB = 100  # what a refused file may cost at most (far below INFLATED)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(str(TINY_VIT), "none", "cpu")


def tiny_modules(clip) -> DeopModules:
    torch.manual_seed(3)
    return DeopModules.create(
        int(clip.model.visual.output_dim), decoder={"heads": 4, "feedforward": 32}, void=True
    )


@pytest.fixture(scope="module")
def checkpoint(clip, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("deop")
    settings = asdict(DeopConfig(templates="single"))
    return save_checkpoint(folder / "deop.pt", tiny_modules(clip), clip, settings)


@pytest.fixture(scope="module")
def deop_bomb(clip, tmp_path_factory) -> Path:
    """The issue's file: the right format tag, a CLIP identity, one tensor that inflates."""
    content = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": {"embed_dim": 32},
        "weights": {"void": InflatingTensor(INFLATED // 4)},
    }
    path = tmp_path_factory.mktemp("bomb") / "deop.pt"
    write_inflating_archive(path, content, content["weights"]["void"])
    assert path.stat().st_size < INFLATED / 500
    return path


# The SD loader and the diffusers classes it builds, imported before the growth is measured:
# the growth is then what the loader allocates, not the libraries it imports (scipy is no longer
# imported with the core, issue 19, so diffusers' own imports would count otherwise).
LOAD_SD_CLASSES = """
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from ovss_ros.core.methods.dslo.sd2_attention import Sd2Attention
"""
LOAD_TINY_CLIP = f"""
import torch
from ovss_ros.core.clip.model_loading import load_clip
from ovss_ros.core.methods.deop.checkpoint import load_checkpoint
torch.manual_seed(0)
clip = load_clip({str(TINY_VIT)!r}, "none", "cpu")
"""


def not_a_regular_file(tmp_path: Path) -> list[Path]:
    """A directory, /dev/zero and a FIFO: each must be refused without being opened."""
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    (tmp_path / "folder.pt").mkdir()
    return [tmp_path / "folder.pt", Path("/dev/zero"), fifo]


# --- the shared checks ------------------------------------------------------------------------


def test_regular_file_names_what_the_path_is(tmp_path):
    for path in not_a_regular_file(tmp_path):
        with pytest.raises(FileCheckError, match="is not a regular file"):
            regular_file(path, "checkpoint")
    with pytest.raises(FileCheckError, match="not found"):
        regular_file(tmp_path / "missing.pt", "checkpoint")


def test_inflating_archive_is_refused_from_the_zip_directory(deop_bomb):
    with pytest.raises(FileCheckError, match=r"declares 536.9 MB from .* compressed"):
        check_torch_archive(deop_bomb, "checkpoint")


def test_safetensors_header_must_match_the_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 4)}, path)
    assert check_safetensors(path, "weights") == 48
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_length])
    for lie, reason in (
        ({"shape": [3000, 4000]}, "declares shape"),
        ({"data_offsets": [0, 10**12]}, "outside the file"),
        ({"dtype": "X99"}, "unknown dtype"),
    ):
        forged = {**header, "a": {**header["a"], **lie}}
        text = json.dumps(forged).encode()
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(
            len(text).to_bytes(8, "little") + text + path.read_bytes()[8 + header_length :]
        )
        with pytest.raises(FileCheckError, match=reason):
            check_safetensors(bad, "weights")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    with pytest.raises(FileCheckError, match="not a safetensors file"):
        check_safetensors(huge, "weights")


# --- DeOP checkpoints -------------------------------------------------------------------------


def test_inflating_deop_checkpoint_is_refused_with_bounded_memory(deop_bomb):
    """Issue 18: 0.5 MB whose tensor inflates to 537 MB; before, +537 MB then KeyError 'clip'."""
    result = peak_growth(LOAD_TINY_CLIP, f"load_checkpoint({str(deop_bomb)!r}, clip)")
    assert result["error"].startswith("CheckpointError: DeOP checkpoint"), result
    assert "compressed" in result["error"] and "inflate" in result["error"]
    assert result["growth_mb"] < BOUNDED_MB, result


def test_deop_checkpoint_that_is_not_a_regular_file(clip, tmp_path):
    for path in not_a_regular_file(tmp_path):
        reason = r"is not a regular file \(it is .*\): set deop.checkpoint"
        with pytest.raises(CheckpointError, match=reason):
            load_checkpoint(path, clip)


def _saved(checkpoint: Path, tmp_path: Path, change) -> Path:
    content = torch.load(checkpoint, weights_only=True)
    change(content)
    path = tmp_path / "changed.pt"
    torch.save(content, path)
    return path


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: c.pop("clip"), "has no 'clip'"),
        (lambda c: c.pop("weights"), "has no 'weights'"),
        (lambda c: c["clip"].update(weights="x"), "clip 'weights' must be Tensor"),
        (lambda c: c["clip"].update(weights=torch.zeros(3)), "must be 256 floats"),
        (lambda c: c["clip"].pop("patch_size"), "has no clip 'patch_size'"),
        (lambda c: c.update(architecture=[1]), "'architecture' must be dict"),
        (lambda c: c["architecture"].pop("embed_dim"), "has no architecture 'embed_dim'"),
        (lambda c: c["weights"].update({"void": "x"}), "is not a named tensor"),
        (lambda c: c["weights"].pop("void"), r"missing \['void'\]"),
        (lambda c: c["weights"].update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
        (lambda c: c["weights"].update(void=torch.zeros(1, 7)), "wrong shape"),
        (lambda c: c.update(settings="fast"), "'settings' must be dict"),
        (lambda c: c["architecture"]["decoder"].update(heads="8"), "unusable architecture"),
    ],
)
def test_deop_checkpoint_of_the_wrong_structure_is_one_clear_reason(
    clip, checkpoint, tmp_path, change, reason
):
    path = _saved(checkpoint, tmp_path, change)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(path, clip)


def test_deop_architecture_that_would_allocate_gigabytes_is_refused_before_building(
    checkpoint, tmp_path
):
    """A small file whose decoder declares a 1 GB feed-forward layer: refused, not built."""
    path = _saved(
        checkpoint,
        tmp_path,
        lambda c: c["architecture"]["decoder"].update(feedforward=4_000_000),
    )
    result = peak_growth(LOAD_TINY_CLIP, f"load_checkpoint({str(path)!r}, clip)")
    assert "architecture decoder.feedforward is 4000000, outside" in result["error"], result
    assert result["growth_mb"] < BOUNDED_MB, result


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda s: s.update(step=-1), "has step '-1'"),
        (lambda s: s.update(step="7"), "has step '7'"),
        (lambda s: s.update(rng=torch.zeros(3, dtype=torch.uint8)), "random generator state"),
        (lambda s: s.pop("optimizer"), "has no optimiser state"),
        (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(5)), "exp_avg 0"),
        (lambda s: s["optimizer"]["state"].update({99: {}}), "for a parameter '99'"),
        (lambda s: s["optimizer"].update(param_groups=[]), "does not fit the optimiser"),
        (lambda s: s.update(history=[1]), "history"),
    ],
)
def test_damaged_resume_state_is_one_reason_before_any_step(clip, tmp_path, damage, reason):
    """A resume file whose training state is damaged: refused at once (CheckpointError), not
    a RuntimeError some steps into the run; the trainer's optimiser is left as it was."""
    from types import SimpleNamespace

    from ovss_ros.training.deop_training import DeopTrainer, TrainingConfig, resume_state

    config = TrainingConfig(prompt_length=0, templates="single", steps=4, batch_size=1)
    data = SimpleNamespace(classes=["cat", "dog"], seen=[0, 1])
    trainer = DeopTrainer(clip, data, config, tiny_modules(clip))
    for parameter in trainer.modules.parameters():  # one step's worth of optimiser state
        parameter.grad = torch.ones_like(parameter)
    trainer.optimizer.step()
    state = {
        "step": 1,
        "optimizer": trainer.optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "history": {"train": [], "validation": []},
    }
    assert resume_state(trainer, dict(state), tmp_path / "ok.pt")[0] == 1  # the intact one
    damaged = torch.load(_round_trip(state, tmp_path), weights_only=True)
    damage(damaged)
    fresh = DeopTrainer(clip, data, config, tiny_modules(clip))
    with pytest.raises(CheckpointError, match=reason):
        resume_state(fresh, damaged, tmp_path / "damaged.pt")
    assert fresh.optimizer.state_dict()["state"] == {}


def _round_trip(state: dict, tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


# --- CLIP checkpoints and model configs -------------------------------------------------------


def test_inflating_clip_checkpoint_is_refused_with_bounded_memory(tmp_path):
    tensor = InflatingTensor(INFLATED // 4)
    path = write_inflating_archive(tmp_path / "clip.pt", {"visual.proj": tensor}, tensor)
    result = peak_growth(LOAD_TINY_CLIP, f"load_clip({str(TINY_VIT)!r}, {str(path)!r}, 'cpu')")
    assert result["error"].startswith("ModelLoadError: could not load tiny-vit"), result
    assert "compressed" in result["error"]
    assert result["growth_mb"] < BOUNDED_MB, result


def test_clip_checkpoint_that_is_not_a_regular_file(tmp_path):
    for path in not_a_regular_file(tmp_path):
        with pytest.raises(ModelLoadError, match="is not a regular file"):
            load_clip(str(TINY_VIT), str(path), "cpu")


def test_clip_checkpoint_far_larger_than_its_model_is_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"visual.proj": torch.zeros(20_000_000)}, path)  # 80 MB for a 14 MB model
    with pytest.raises(ModelLoadError, match=r"declares 80.0 MB of tensors; at most"):
        load_clip(str(TINY_VIT), str(path), "cpu")


def test_model_config_with_absurd_numbers_is_refused_before_building(tmp_path):
    """Measured in a capped process: before issue 18 these configs were built as declared."""
    config = json.loads(TINY_VIT.read_text())
    config["vision_cfg"]["layers"] = 1_000_000  # a meta-device build alone would take hours
    path = tmp_path / "absurd.json"
    path.write_text(json.dumps(config))
    call = f"load_clip({str(path)!r}, 'none', 'cpu')"
    result = peak_growth(LOAD_TINY_CLIP, call, timeout=120)
    assert "ModelLoadError" in result["error"] and "layers is 1000000, outside" in result["error"]
    config["vision_cfg"].update(layers=64, width=8192)  # 206 GB of parameters
    path.write_text(json.dumps(config))
    result = peak_growth(LOAD_TINY_CLIP, call, timeout=120)
    assert "ModelLoadError" in result["error"], result
    assert "declares 206.2 GB of parameters" in result["error"], result
    assert result["growth_mb"] < BOUNDED_MB, result
    for bad in not_a_regular_file(tmp_path):
        bad_json = bad.with_suffix(".json")
        if bad.is_dir():
            bad_json.mkdir()
        elif bad.is_fifo():
            os.mkfifo(bad_json)
        else:
            continue  # /dev/zero has no .json name; the directory and FIFO show the check
        with pytest.raises(ModelLoadError, match="is not a regular file"):
            load_clip(str(bad_json), "none", "cpu")


# --- BLIP (PnP-OVSS's VLM) and Stable Diffusion folders ---------------------------------------


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory) -> Path:
    from tiny_blip import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    from tiny_diffusion import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


def _copy_with_config(folder: Path, tmp_path: Path, part: str, change) -> Path:
    import shutil

    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    config_path = copy / part / "config.json"
    config = json.loads(config_path.read_text())
    change(config)
    config_path.write_text(json.dumps(config))
    return copy


def test_blip_config_declaring_a_far_larger_model_is_refused_with_bounded_memory(
    blip_folder, tmp_path
):
    """A 1 MB folder whose config asks for 512 MB of vision MLP: transformers would build it
    (random weights, all of it touched) before finding the weights do not fit."""
    folder = _copy_with_config(
        blip_folder, tmp_path, ".", lambda c: c["vision_config"].update(intermediate_size=10**6)
    )
    result = peak_growth(
        "from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm",
        f"load_vlm('blip_itm', {str(folder)!r}, 'cpu')",
    )
    assert result["error"].startswith("ModelLoadError: could not load BLIP ITM"), result
    assert "declares a model of 5" in result["error"], result  # 512.3 MB (float32)
    assert result["growth_mb"] < BOUNDED_MB, result


def test_blip_folder_with_a_fifo_or_a_device_inside_is_refused_not_read(blip_folder, tmp_path):
    import shutil

    for name in ("tokenizer.json", "config.json"):
        copy = tmp_path / name / "blip"
        shutil.copytree(blip_folder, copy)
        (copy / name).unlink()
        os.mkfifo(copy / name)  # a reader would block here forever
        result = peak_growth(
            "from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm",
            f"load_vlm('blip_itm', {str(copy)!r}, 'cpu')",
            timeout=120,
        )
        assert "ModelLoadError" in result["error"] and name in result["error"], result
        assert "is not a regular file" in result["error"], result
    os.symlink("/dev/zero", tmp_path / "zero.safetensors")
    with pytest.raises(FileCheckError, match="is not a regular file"):
        from ovss_ros.core.file_checks import weights_bytes

        weights_bytes(tmp_path / "zero.safetensors", "weights")


def test_blip_weights_that_inflate_are_refused(blip_folder, tmp_path):
    import shutil

    copy = tmp_path / "blip"
    shutil.copytree(blip_folder, copy)
    (copy / "model.safetensors").unlink()
    tensor = InflatingTensor(INFLATED // 4)
    write_inflating_archive(copy / "pytorch_model.bin", {"itm_head.weight": tensor}, tensor)
    result = peak_growth(
        "from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm",
        f"load_vlm('blip_itm', {str(copy)!r}, 'cpu')",
    )
    assert "ModelLoadError" in result["error"] and "compressed" in result["error"], result
    assert result["growth_mb"] < BOUNDED_MB, result


def test_sd_config_declaring_a_far_larger_model_is_refused_with_bounded_memory(
    sd_folder, tmp_path
):
    """The UNet config of a 2 MB pipeline asks for 520 MB of channels: refused unbuilt."""
    folder = _copy_with_config(
        sd_folder, tmp_path, "unet", lambda c: c.update(block_out_channels=[32, 32, 1024])
    )
    result = peak_growth(
        LOAD_SD_CLASSES,
        f"Sd2Attention.load({str(folder)!r}, device='cpu')",
    )
    assert result["error"].startswith("ModelLoadError: could not load Stable Diffusion"), result
    assert "unet" in result["error"] and "declares a model of 520.2 MB" in result["error"]
    assert result["growth_mb"] < BOUNDED_MB, result


def test_sd_folder_with_a_fifo_inside_is_refused_not_read(sd_folder, tmp_path):
    import shutil

    copy = tmp_path / "pipeline"
    shutil.copytree(sd_folder, copy)
    (copy / "scheduler" / "scheduler_config.json").unlink()
    os.mkfifo(copy / "scheduler" / "scheduler_config.json")
    result = peak_growth(
        LOAD_SD_CLASSES,
        f"Sd2Attention.load({str(copy)!r}, device='cpu')",
        timeout=120,
    )
    assert "scheduler_config.json" in result["error"], result
    assert "is not a regular file" in result["error"], result


# --- params files (ovss-tune's output, --params-file) -----------------------------------------


def test_params_file_that_is_not_a_small_regular_file_is_refused(tmp_path):
    """In a capped process: before issue 18, /dev/zero was read until memory ran out."""
    fifo = tmp_path / "params.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("/**:\n  ros__parameters:\n" + "    # padding\n" * 200_000)
    for path, reason in ((fifo, "is not a regular file"), ("/dev/zero", "is not a regular file")):
        result = peak_growth(
            "from ovss_ros.cli.engine_args import params_file_defaults",
            f"params_file_defaults({str(path)!r})",
            timeout=120,
        )
        assert result["error"] and reason in result["error"], result
    from ovss_ros.cli.engine_args import params_file_defaults

    with pytest.raises(ValueError, match="is larger than 1.0 MB"):
        params_file_defaults(big)
