"""Library backends and checkpoints behind the one interface of a quantized model: configs that name them, what
their cache keys hold, the checks a checkpoint folder must pass before it is judged, and (with GPTQModel
installed) a GPTQ checkpoint built, saved and reloaded on the CPU."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quant.backends import BACKENDS, BackendUnavailable, get_backend
from quant.backends.base import kernel_names, records_from_model
from quant.backends.checkpoint import CheckpointError, detect_format, load_checkpoint, validate
from quant.backends.gptqmodel import GPTQModelBackend
from quant.config import ConfigError, QuantConfig
from tests.helpers.matrices import edited_matrix
from tests.helpers.models import tiny_llama
from quant.matrix import load_matrix
from quant.models import ModelSpec
from quant.pipeline import Workbench
from quant.stores import CalibrationSet, compare_builds

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")


def _checkpoint(folder: Path, method: str = "gptq", drop: str | None = None, scale: float = 0.01) -> Path:
    """A checkpoint folder as GPTQModel writes one: config.json with its quantization_config, packed tensors;
    ``drop`` leaves one tensor out, ``scale`` is the first scale of the last layer (the others are 0.01)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "quantization_config": {"quant_method": method, "bits": 4, "group_size": 32}}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {"model.embed_tokens.weight": torch.zeros(8, 64)}
    for layer in LAYERS:
        tensors[f"{layer}.qweight"] = torch.zeros(8, 64, dtype=torch.int32)
        tensors[f"{layer}.qzeros"] = torch.zeros(2, 8, dtype=torch.int32)
        tensors[f"{layer}.scales"] = torch.full((2, 64), 0.01, dtype=torch.float16)
    tensors[f"{LAYERS[-1]}.scales"][0, 0] = scale
    tensors.pop(drop, None)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_checkpoint_format_comes_from_its_config(tmp_path):
    assert detect_format(_checkpoint(tmp_path / "gptq")) == "gptq"
    assert detect_format(_checkpoint(tmp_path / "awq", method="awq")) == "awq"
    legacy = tmp_path / "legacy"  # AutoGPTQ's layout: the settings in quantize_config.json
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (legacy / "quantize_config.json").write_text(json.dumps({"quant_method": "gptq", "bits": 4}))
    assert detect_format(legacy) == "gptq"


@pytest.mark.parametrize("files, message", [
    ({}, r"config.json: missing"),
    ({"config.json": "{"}, r"config.json:1: not valid JSON"),
    ({"config.json": json.dumps({"model_type": "llama"})}, r"no quantization_config .* holds an unquantized model"),
    ({"config.json": json.dumps({"model_type": "llama"}), "model.Q4_0.gguf": ""}, r"GGUF .* dequantize it to float"),
    ({"config.json": json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}})},
     r"method 'bitsandbytes' is not one this suite loads"),
])
def test_a_folder_that_is_not_a_quantized_checkpoint_is_named(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        detect_format(tmp_path)


def test_a_layer_missing_a_tensor_is_named(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt", drop=f"{LAYERS[1]}.qzeros")
    with pytest.raises(CheckpointError, match=rf"layer {LAYERS[1]} lacks qzeros .* incomplete"):
        validate(folder, "gptq")
    validate(_checkpoint(tmp_path / "whole"), "gptq")  # the same folder with every tensor passes


@pytest.mark.parametrize("scale", [float("nan"), 0.0, float("inf")])
def test_nan_or_zero_scales_are_refused_naming_file_and_tensor(tmp_path, scale):
    folder = _checkpoint(tmp_path / "ckpt", scale=scale)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.scales has "
                                              r"1 NaN, infinite or zero scale"):
        validate(folder, "gptq")


def test_a_checkpoint_without_weights_or_packed_layers_is_refused(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights file"):
        validate(folder, "gptq")
    save_file({"model.embed_tokens.weight": torch.zeros(8, 64)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no tensors of a gptq quantized layer"):
        validate(folder, "gptq")


class _PackedLinear(nn.Module):
    """What a library's quantized linear exposes: packed codes and its bits and group size."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.bits, self.group_size, self.in_features, self.out_features = 4, group_size, 64, 32
        self.register_buffer("qweight", torch.zeros(8, 32, dtype=torch.int32))


def _compressed_linear() -> nn.Linear:
    """What compressed-tensors leaves of a Linear: packed codes and scales instead of the weight, and its scheme."""
    from types import SimpleNamespace

    linear = nn.Linear(64, 32, bias=False)
    del linear.weight
    linear.register_parameter("weight_packed", nn.Parameter(torch.zeros(32, 8, dtype=torch.int32), requires_grad=False))
    linear.quantization_scheme = SimpleNamespace(weights=SimpleNamespace(num_bits=4, group_size=64),
                                                 format=SimpleNamespace(value="pack-quantized"))
    return linear


def test_records_and_kernel_of_a_library_model_come_from_its_packed_layers():
    model = nn.Sequential(_PackedLinear(32), nn.Linear(4, 4), _PackedLinear(-1), _compressed_linear())
    records = records_from_model(model)
    assert [(r.name, r.shape, r.bits, r.group_size) for r in records] == [
        ("0", (32, 64), 4, 32), ("2", (32, 64), 4, None), ("3", (32, 64), 4, 64)]
    assert kernel_names(model) == ("_PackedLinear (2 layers), "
                                   "compressed-tensors pack-quantized, unpacked in every forward (1 layers)")
    assert records_from_model(nn.Sequential(nn.Linear(4, 4))) == []  # a float model has nothing packed


def test_an_absent_backend_names_its_install_command(monkeypatch):
    monkeypatch.setattr(GPTQModelBackend, "distribution", "gptqmodel-not-installed")
    with pytest.raises(BackendUnavailable, match=r"needs gptqmodel-not-installed: run `pip install -e \".\[gptqmodel\]\"`"):
        get_backend("gptqmodel").version()


def test_the_backend_and_its_version_enter_the_cache_key(monkeypatch):
    workbench = Workbench(load_matrix(), "test", None)
    spec = ModelSpec(name="m", hf_id="org/m")
    monkeypatch.setattr(ModelSpec, "fingerprint", lambda self: {"hub": self.hf_id})
    monkeypatch.setattr(CalibrationSet, "fingerprint", "text")
    inhouse = QuantConfig(method="gptq", group_size=64)
    library = QuantConfig(method="gptq", group_size=64, backend="gptqmodel")
    assert "backend" not in workbench.quantized_parts(spec, inhouse)  # the in-house keys stay what they were
    monkeypatch.setattr(GPTQModelBackend, "version", lambda self: "7.6.0")
    before = workbench.quantized_parts(spec, library)
    monkeypatch.setattr(GPTQModelBackend, "version", lambda self: "7.7.0")
    after = workbench.quantized_parts(spec, library)
    assert before["backend"] == {"backend": "gptqmodel", "version": "7.6.0"} and before != after


def test_a_checkpoint_key_is_its_files_content(tmp_path):
    workbench = Workbench(load_matrix(), "test", None)
    folder = _checkpoint(tmp_path / "ckpt")
    config = QuantConfig.from_dict({"checkpoint": str(folder)})
    before = workbench.quantized_parts(ModelSpec(name="m", hf_id="org/m"), config)
    _checkpoint(folder, scale=0.02)
    assert workbench.quantized_parts(ModelSpec(name="m", hf_id="org/m"), config) != before


@pytest.mark.parametrize("entry, message", [
    ({"backend": "autoround", "method": "gptq"}, r"quant.x: unknown backend 'autoround'; known: \['gptqmodel', 'inhouse', 'llmcompressor'\]"),
    ({"method": "awq"}, r"quant.x: unknown method 'awq'; known: \['gptq', 'gsq', 'rtn'\] \(backend 'inhouse'\)"),
    ({"backend": "gptqmodel", "method": "rtn"}, r"quant.x: unknown method 'rtn'; known: \['awq', 'gptq'\]"),
    ({"checkpoint": "/models/x", "backend": "gptqmodel"}, r"quant.x: checkpoint='/models/x' is loaded, not built"),
])
def test_the_matrix_refuses_a_backend_entry_it_cannot_build(tmp_path, entry, message):
    def one_case(raw):
        raw["quant"] = {"x": entry}
        raw["cases"] = [{"models": ["smollm2-135m"], "quant": ["x"], "tasks": ["wikitext"]}]

    path = edited_matrix(tmp_path, one_case)
    with pytest.raises(ConfigError, match=message):
        load_matrix(path)


# ---- with GPTQModel installed ---------------------------------------------------------------------------

@pytest.fixture
def gptqmodel_backend():
    backend = get_backend("gptqmodel")
    try:
        backend.version()
    except BackendUnavailable as error:
        pytest.skip(str(error))
    return backend


def _tiny_baseline(tokenizer) -> tuple[nn.Module, torch.Tensor]:
    """A 2-block LLaMA whose widths (128, 256) groups of 32 divide, and 16 x 64 calibration token ids."""
    model = tiny_llama(len(tokenizer), hidden_size=128, intermediate_size=256, max_position_embeddings=2048)
    calibration = torch.randint(0, len(tokenizer), (16, 64), generator=torch.Generator().manual_seed(1))
    return model, calibration


def test_gptqmodel_awq_builds_and_runs_on_the_cpu(gptqmodel_backend, small_tokenizer, tmp_path):
    """AWQ by GPTQModel on the CPU (its automatic kernel choice is CUDA's GEMM): every block linear packed and
    run on a CPU kernel, close to the float model but not equal to it."""
    baseline, calibration = _tiny_baseline(small_tokenizer)
    quant = QuantConfig(method="awq", bits=4, group_size=32, backend="gptqmodel")
    records = gptqmodel_backend.quantize(baseline, small_tokenizer, quant, calibration, tmp_path)
    assert detect_format(tmp_path) == "awq" and len(records) == 14
    model, kernel = gptqmodel_backend.load(baseline, tmp_path, records, "cpu")
    assert "(14 layers)" in kernel
    with torch.no_grad():
        reference, library = (m(calibration[:2]).logits.float() for m in (baseline, model))
    assert 0.005 < (library - reference).norm() / reference.norm() < 0.3


def test_gptqmodel_checkpoint_reloads_packed_on_the_cpu_and_close_to_the_float_model(
        gptqmodel_backend, small_tokenizer, tmp_path, monkeypatch):
    """GPTQ by GPTQModel on a tiny LLaMA, saved and loaded back: every block linear packed at 4 bits g32 on a
    named kernel, every tensor on the CPU, the same logits on every load, and close to the float model."""
    baseline, calibration = _tiny_baseline(small_tokenizer)
    quant = QuantConfig(method="gptq", bits=4, group_size=32, backend="gptqmodel")
    monkeypatch.chdir(tmp_path.parent)
    records = gptqmodel_backend.quantize(baseline, small_tokenizer, quant, calibration, tmp_path)
    assert not (tmp_path.parent / "logs").exists() and any((tmp_path / "logs").iterdir())  # its log stays inside
    assert len(records) == 14 and {(r.bits, r.group_size) for r in records} == {(4, 32)}
    assert detect_format(tmp_path) == "gptq"
    model, kernel = gptqmodel_backend.load(baseline, tmp_path, records, "cpu")
    assert kernel.startswith(f"gptqmodel {gptqmodel_backend.version()}: ") and "(14 layers)" in kernel
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    again, _ = load_checkpoint(tmp_path, "cpu")
    # GPTQModel's in-memory model after quantize() is a shell (its layers are offloaded while they are written),
    # so the reference for "the logits it saved" is the float model carrying the checkpoint's weights, unpacked
    # here independently of GPTQModel's kernels
    saved = copy.deepcopy(baseline)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for record in records:
        prefix = record.name
        saved.get_submodule(prefix).weight.data = _gptq_v1_weight(
            tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"], 32)
    ids = calibration[:2]
    with torch.no_grad():
        reference, library, reloaded, unpacked = (m(ids).logits.float() for m in (baseline, model, again, saved))
    assert torch.equal(library, reloaded)  # loading is deterministic
    # the kernel computes in bf16 (GPTQModel's CPU dtype): within 2% of the float model on the same weights
    assert (library - unpacked).norm() / unpacked.norm() < 0.02
    error = (library - reference).norm() / reference.norm()
    assert 0.005 < error < 0.2, error  # quantized (not the float model), and not broken


def _gptq_v1_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] float weight of a GPTQ (v1) layer: 4-bit codes packed 8 per int32 along the input (qweight
    [in / 8, out]) and along the output for the zero points (qzeros [groups, out / 8], stored minus one)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    codes = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])  # [in, out]
    zeros = ((qzeros[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1) + 1  # [groups, out]
    groups = torch.arange(codes.shape[0]) // group_size
    return (scales.float()[groups] * (codes - zeros[groups]).float()).T.contiguous()


def test_quant_check_stops_on_a_tampered_checkpoint_naming_the_file(tmp_path, capsys):
    from quant.cli import main

    folder = _checkpoint(tmp_path / "ckpt", scale=float("nan"))
    assert main(["check", "--base", "smollm2-135m", "--candidate", str(folder), "--out", str(tmp_path)]) == 2
    assert "tensor model.layers.0.mlp.down_proj.scales has 1 NaN" in capsys.readouterr().err
    folder = _checkpoint(tmp_path / "ckpt", drop=f"{LAYERS[0]}.scales")
    assert main(["check", "--base", "smollm2-135m", "--candidate", str(folder), "--out", str(tmp_path)]) == 2
    assert f"layer {LAYERS[0]} lacks scales" in capsys.readouterr().err
    assert main(["check", "--base", "smollm2-135m", "--candidate", str(folder), "--tasks", "squad"]) == 2
    assert "--tasks squad: the matrix gates smollm2-135m on boolq, gsm8k, msmarco, wikitext" in capsys.readouterr().err


def test_a_compressed_tensors_checkpoint_runs_packed_with_the_codes_it_stores(small_tokenizer, tmp_path):
    """A pack-quantized checkpoint as llm-compressor writes one (w4 g32 symmetric): transformers would decompress
    it to float on the first forward; here its layers become QuantLinear with the same codes, and the logits
    match compressed-tensors' own decompression (scales rounded to fp16: within 1e-3)."""
    pytest.importorskip("compressed_tensors", reason='pip install -e ".[compressed-tensors]"')
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from transformers import AutoModelForCausalLM

    baseline, _ = _tiny_baseline(small_tokenizer)
    baseline.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name, linear in baseline.named_modules():
        if isinstance(linear, nn.Linear) and name != "lm_head":
            weight = linear.weight.detach().reshape(linear.out_features, -1, 32)
            scale = weight.abs().amax(-1, keepdim=True) / 7
            codes = torch.clamp(torch.round(weight / scale), -8, 7).reshape(linear.out_features, -1)
            tensors.pop(f"{name}.weight")
            tensors[f"{name}.weight_packed"] = pack_to_int32(codes.to(torch.int8), 4)
            tensors[f"{name}.weight_scale"] = scale.squeeze(-1)
            tensors[f"{name}.weight_shape"] = torch.tensor(list(linear.weight.shape))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                             "format": "pack-quantized"}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, kernel = load_checkpoint(tmp_path, "cpu")
    assert kernel == "QuantLinear (14 layers), compressed-tensors codes repacked"
    copy.deepcopy(model)  # what timing does before it moves the layers onto the int4 kernel
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, len(small_tokenizer), (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs, float_model = (m(ids).logits for m in (model, reference, baseline))
    assert records_from_model(reference) == []  # decompressed to float on its first forward: nothing packed left
    assert (ours - theirs).norm() / theirs.norm() < 1e-3
    assert (ours - float_model).norm() / float_model.norm() > 1e-3  # the quantized weights, not the float ones


def test_the_report_names_a_checkpoint_that_was_not_built_here():
    from quant.report import quantization_table

    row = {"model": "smollm2-135m", "quant": "checkpoint-x", "config": "checkpoint x", "quantize_seconds": None,
           "calibration": None, "fallback_layers": 0, "quantized_layers": 210}
    assert "| smollm2-135m | checkpoint-x | checkpoint x | – (a checkpoint) | – | none | 0 / 210 |" in quantization_table(
        {"rows": [row]})


# ---- the contract every backend keeps, generated from the registry ----------------------------------------

BACKEND_METHODS = [pytest.param(name, method, id=f"{name}-{method}")
                   for name, backend in sorted(BACKENDS.items()) for method in backend.methods]


@pytest.mark.parametrize("backend_name,method", BACKEND_METHODS)
def test_every_backend_builds_a_packed_model_that_reloads_on_the_cpu_close_to_the_float_one(
        backend_name, method, small_tokenizer, tmp_path):
    """What a new backend (one module and a registry entry) is checked for without a test of its own: every block
    linear quantized at the asked bits and group size, saved to its folder, bit-identical when built twice (unless
    the backend says it is not deterministic), loaded back with every tensor on the CPU, the same logits on two
    loads, and close to the float model without being it. A backend that is not installed skips with its install
    command."""
    backend = get_backend(backend_name)
    try:
        backend.version()
    except BackendUnavailable as error:
        pytest.skip(str(error))
    baseline, calibration = _tiny_baseline(small_tokenizer)
    config = QuantConfig(method=method, bits=4, group_size=32, backend=None if backend_name == "inhouse" else backend_name)
    ids = calibration if backend.needs_calibration(config) else None
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    records = backend.quantize(baseline, small_tokenizer, config, ids, first)
    assert len(records) == 14 and {(r.bits, r.group_size) for r in records} == {(4, 32)}
    backend.quantize(baseline, small_tokenizer, config, ids, second)
    rebuild = compare_builds(first, second)
    assert rebuild.tensors > 0 and (rebuild.identical or not backend.deterministic), rebuild.describe()
    model, kernel = backend.load(baseline, first, records, "cpu")
    again, _ = backend.load(baseline, first, records, "cpu")
    assert kernel and {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    with torch.no_grad():
        reference, served, reloaded = (m(calibration[:2]).logits.float() for m in (baseline, model, again))
    assert torch.equal(served, reloaded)  # the same bytes loaded twice, the same operations
    assert 0.005 < (served - reference).norm() / reference.norm() < 0.3
