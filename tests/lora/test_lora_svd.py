"""LoRA by SVD (`tune.lora.svd`): extraction from a fine-tune of the tiny SD1.5-topology pipeline, and
resizing; the files load in diffusers and through our merge at the errors we report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from tune import lora as lora_io
from tune.lora.svd import extract_lora, extract_lora_file, resize_lora, resize_lora_file, summarize_errors
from tune.models import load_pipeline

RANK = 4


def changed_modules(pipe: StableDiffusionPipeline) -> dict[str, nn.Module]:
    """Every module a fine-tune changes in these tests: what extraction with --conv-rank and
    --text-encoder covers, and conv_in, which it never does."""
    out = {}
    for component in ("unet", "text_encoder"):
        for path, layer in getattr(pipe, component).named_modules():
            if not isinstance(layer, nn.Linear | nn.Conv2d):
                continue
            blocks = ("attentions.", "resnets.", "samplers.", "self_attn.", "mlp.", "conv_in")
            if any(part in path for part in blocks):
                out[f"{component}.{path}"] = layer
    return out


@pytest.fixture(scope="module")
def tuned(tiny_pipeline_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A copy of the tiny base with a rank-4 change in every module of `changed_modules`, saved."""
    pipe = load_pipeline(tiny_pipeline_dir)
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    with torch.no_grad():
        for target, layer in changed_modules(pipe).items():
            shape = layer.weight.shape
            a = torch.randn(shape[0], RANK, generator=generator)
            b = torch.randn(RANK, shape[1:].numel(), generator=generator)
            deltas[target] = (0.02 * a @ b).reshape(shape)
            layer.weight += deltas[target]
    path = tmp_path_factory.mktemp("tuned") / "model"
    pipe.save_pretrained(path)
    return path, deltas


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_a_rank_4_change_extracts_exactly_at_rank_4(tuned: tuple[Path, dict], tiny_pipeline_dir: str) -> None:
    path, deltas = tuned
    lora, errors = extract_lora(
        load_pipeline(path), load_pipeline(tiny_pipeline_dir), 4, 4, text_encoder=True
    )
    expected = {t for t in deltas if not t.endswith("conv_in")}
    assert set(lora.modules) == set(errors) == expected
    assert lora.family == "sd1" and {p.rank for p in lora.modules.values()} <= {1, 2, 3, 4}
    for target, pair in lora.modules.items():
        assert errors[target].relative < 1e-5
        assert rel_error(pair.delta(deltas[target].shape), deltas[target]) < 1e-5
    summary = summarize_errors(errors)
    assert list(summary)[-1] == "overall" and summary["overall"] < 1e-5
    assert {"unet attn1", "unet attn2", "unet ff", "unet proj", "unet resnets", "unet samplers"} < set(
        summary
    )
    assert {"text_encoder self_attn", "text_encoder mlp"} < set(summary)


def test_at_rank_2_the_error_is_the_svds(tuned: tuple[Path, dict], tiny_pipeline_dir: str) -> None:
    path, deltas = tuned
    lora, errors = extract_lora(load_pipeline(path), load_pipeline(tiny_pipeline_dir), 2)
    # Without --conv-rank and --text-encoder: the transformer modules only.
    assert set(lora.modules) == {t for t in deltas if ".attentions." in t}
    for target, pair in lora.modules.items():
        delta = deltas[target]
        s = torch.linalg.svdvals(delta.flatten(1))
        truncation = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        assert errors[target].relative == pytest.approx(truncation, rel=1e-3, abs=1e-6)
        assert rel_error(pair.delta(delta.shape), delta) == pytest.approx(errors[target].relative, rel=1e-3)
    assert 0.2 < summarize_errors(errors)["overall"] < 0.9


def fused_deltas(base_dir: str, file: Path) -> tuple[dict, dict]:
    """Weights before and after diffusers' own load_lora_weights + fuse_lora(1.0) of `file`."""
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, local_files_only=True)
    before = _weights(pipe)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="x")
    pipe.fuse_lora(lora_scale=1.0, components=["unet", "text_encoder"], adapter_names=["x"])
    pipe.unload_lora_weights()
    return before, _weights(pipe)


def _weights(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{name}": param.detach().clone()
        for component in ("unet", "text_encoder")
        for name, param in getattr(pipe, component).named_parameters()
    }


def test_the_extracted_file_fused_by_diffusers_gives_the_tuned_weights(
    tuned: tuple[Path, dict], tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    path, deltas = tuned
    file, lora, errors = extract_lora_file(
        path,
        tmp_path / "extracted.safetensors",
        rank=2,
        base=tiny_pipeline_dir,
        conv_rank=2,
        text_encoder=True,
        dtype=torch.float32,
    )
    before, after = fused_deltas(tiny_pipeline_dir, file)
    tuned_weights = _weights(load_pipeline(path))
    for target in lora.modules:
        key = f"{target}.weight"
        # The fused weights are the tuned ones, up to exactly the error the extraction reported.
        distance = float((after[key] - tuned_weights[key]).norm() / deltas[target].norm())
        assert distance == pytest.approx(errors[target].relative, rel=1e-3, abs=1e-5)
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    assert moved == {f"{target}.weight" for target in lora.modules}
    metadata = lora_io.read_lora_file(file)[1]
    assert '"overall"' in metadata["tune_extract_error"] and metadata["ss_network_dim"] == "2"


@pytest.fixture(scope="module")
def rank_32_file(tiny_pipeline_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random rank-32 kohya file (fp32) over the transformer modules and resnet convs of the tiny base."""
    pipe = load_pipeline(tiny_pipeline_dir)
    generator = torch.Generator().manual_seed(1)
    modules = {}
    for target, layer in changed_modules(pipe).items():
        if not target.startswith("unet.") or "samplers" in target or target.endswith("conv_in"):
            continue
        shape = layer.weight.shape
        down = torch.randn(32, *shape[1:], generator=generator) * 0.1
        up = torch.randn(shape[0], 32, *([1, 1] if len(shape) == 4 else []), generator=generator) * 0.1
        modules[target] = lora_io.LoraModule(down=down, up=up, alpha=16.0)
    lora = lora_io.Lora(modules=modules, formats=frozenset({"peft"}))
    folder = tmp_path_factory.mktemp("r32")
    return lora_io.save_lora(lora, folder / "r32.safetensors", "kohya", dtype=torch.float32)


def merged(base_dir: str, file: Path) -> dict[str, torch.Tensor]:
    pipe = load_pipeline(base_dir)
    lora_io.apply_loras(pipe, [(file, 1.0)])
    return _weights(pipe)


def test_resize_to_8_reports_the_merged_weight_difference(
    rank_32_file: Path, tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    file, resized, errors = resize_lora_file(rank_32_file, tmp_path / "r8.safetensors", rank=8)
    assert {p.rank for p in resized.modules.values()} == {8}
    base, full, small = (
        _weights(load_pipeline(tiny_pipeline_dir)),
        merged(tiny_pipeline_dir, rank_32_file),
        merged(tiny_pipeline_dir, file),
    )
    residual = norm = 0.0
    for target in resized.modules:
        key = f"{target}.weight"
        measured = rel_error(small[key] - base[key], full[key] - base[key])
        assert measured == pytest.approx(errors[target].relative, rel=1e-3, abs=1e-5)
        residual += float((small[key] - full[key]).norm()) ** 2
        norm += float((full[key] - base[key]).norm()) ** 2
    overall = summarize_errors(errors)["overall"]
    print(
        f"resize rank 32 -> 8 on the tiny U-Net: reported {overall:.4f}, merged {(residual / norm) ** 0.5:.4f}"
    )
    assert (residual / norm) ** 0.5 == pytest.approx(overall, rel=1e-3)
    assert 0.1 < overall < 1
    metadata = lora_io.read_lora_file(file)[1]
    assert metadata["tune_resize"] == "rank 8 from ranks 32" and metadata["ss_network_alpha"] == "8.0"


def test_energy_1_keeps_every_rank_and_a_fraction_keeps_the_least(rank_32_file: Path) -> None:
    lora = lora_io.read_lora(rank_32_file)
    kept, errors = resize_lora(lora, energy=1.0)
    for target, pair in kept.modules.items():
        assert pair.rank == min(32, *lora.modules[target].delta(_shape(lora, target)).flatten(1).shape)
        assert errors[target].relative < 1e-5
    fraction = 0.6
    some, errors = resize_lora(lora, energy=fraction)
    for target, pair in some.modules.items():
        s = torch.linalg.svdvals(lora.modules[target].delta(_shape(lora, target)).flatten(1)).double()
        energy = torch.cumsum(s.square(), 0) / s.square().sum()
        k = pair.rank
        assert energy[k - 1] >= fraction and (k == 1 or energy[k - 2] < fraction)
        assert errors[target].relative == pytest.approx(float((1 - energy[k - 1]).sqrt()), rel=1e-3)
    assert len({p.rank for p in some.modules.values()}) > 1


def _shape(lora: lora_io.Lora, target: str) -> tuple[int, ...]:
    pair = lora.modules[target]
    return (pair.up.shape[0], *pair.down.shape[1:])


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_resize_reads_loha_and_lokr_files_convs_included(
    kind: str, tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    """LoHa and LoKr files resize to plain LoRA files: at a rank that holds their whole delta exactly, at a
    lower one within the error reported (a conv's kernel comes from the family's module skeleton)."""
    from peft import LoHaConfig, LoKrConfig

    pipe = load_pipeline(tiny_pipeline_dir)
    targets = ["to_k", "to_v", "conv1"]  # attention Linears and 3x3 resnet convs
    config = (
        LoHaConfig(r=2, alpha=2, target_modules=targets)
        if kind == "loha"
        else LoKrConfig(r=2, alpha=2, target_modules=targets)
    )
    pipe.unet.add_adapter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "hada_" in name or "lokr_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    adapter = tmp_path / "adapter.safetensors"
    lora_io.save_adapter(pipe.unet, None, adapter)
    source = lora_io.convert_lora_file(
        adapter, "kohya", tmp_path / f"{kind}.safetensors", dtype=torch.float32
    )

    def merged_deltas(path: Path) -> dict[str, torch.Tensor]:
        fresh = load_pipeline(tiny_pipeline_dir)
        before = {
            n: m.weight.detach().clone()
            for n, m in fresh.unet.named_modules()
            if hasattr(m, "weight") and m.weight is not None
        }
        lora_io.apply_loras(fresh, [(path, 1.0)])
        return {
            n: m.weight.detach() - before[n]
            for n, m in fresh.unet.named_modules()
            if n in before and not torch.equal(m.weight, before[n])
        }

    want = merged_deltas(source)
    assert any(delta.ndim == 4 and delta.shape[-1] == 3 for delta in want.values())  # the 3x3 convs are in it
    whole_rank = 4 if kind == "loha" else 16  # Hadamard of two rank-2 factors; LoKr's Kronecker (see peft)
    _, lora, errors = resize_lora_file(
        source, tmp_path / "whole.safetensors", rank=whole_rank, dtype=torch.float32
    )
    assert lora.kinds == {"lora"} and max(e.relative for e in errors.values()) < 1e-4
    got = merged_deltas(tmp_path / "whole.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4) for n in want)
    _, _, errors = resize_lora_file(source, tmp_path / "r1.safetensors", rank=1, dtype=torch.float32)
    got = merged_deltas(tmp_path / "r1.safetensors")
    for name, delta in want.items():  # the reported error is the merged weights' error
        measured = float((got[name] - delta).norm() / delta.norm())
        assert measured == pytest.approx(errors[f"unet.{name}"].relative, rel=1e-3, abs=1e-5)
