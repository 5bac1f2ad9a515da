"""The native CPU linear op against ``F.linear`` in float64, and the model's linears on it.

Cases cover every instruction set this CPU runs, row counts that exercise each of the kernel's
tile shapes and row chunks, feature counts that leave panels cut short or odd, bias, rows with a
stride, leading dimensions, no rows, empty sums (K = 0), bad inputs, ``torch.compile``, the
module swap, and the checkpoint pages it gives back.
"""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prefixserve.config import cache_root, env_cpu_isa
from prefixserve.kernels import cpu_linear
from prefixserve.kernels.cpu_isa import cpu_isas, default_isa
from prefixserve.native_linear import PackedLinear, native_dtypes, use_native_linears

cpu_linear.load(cache_root())  # builds once per machine (cached); cpu_isas() below needs it

ROWS = [1, 2, 3, 4, 5, 7, 8, 11, 12, 13, 15, 23, 38, 64, 241, 500]
"""One row, the tiles' row tails (12 x 2 panels on AVX-512: 8, 4, 2, 1 after; 3 x 2 on AVX2),
one and two row chunks per task (240 rows on AVX-512, 60 on AVX2), and more."""
SHAPES = [(576, 576), (1, 8), (5, 1), (17, 9), (48, 37), (200, 1537)]  # (N, K)
"""Whole pairs of panels, a panel cut short, an odd panel out (48 = 3 panels), K = 1."""


def _expected(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def _assert_close(y: torch.Tensor, want: torch.Tensor, k: int) -> None:
    """fp32 sums of ``k`` products of unit normals, in any order, against the exact float64
    result: within a few ulps of the sum's magnitude (~sqrt(k))."""
    assert y.dtype == torch.float32 and y.shape == want.shape
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5 * max(k, 16) ** 0.5)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_matches_float64(isa: str, rows: int, n: int, k: int) -> None:
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    panels = cpu_linear.pack_weight(w)
    assert panels.shape == (-(-n // cpu_linear.PANEL), k, cpu_linear.PANEL)
    for bias in (None, b):
        y = cpu_linear.linear_packed(x, panels, bias, n, isa)
        _assert_close(y, _expected(x, w, bias), k)


def _assert_bf16_close(y: torch.Tensor, want: torch.Tensor, k: int) -> None:
    """bf16 inputs multiply exactly in fp32; fp32 sums of ``k`` of them, then one rounding to
    bf16: within 2^-8 of the exact float64 result's magnitude (one bf16 ulp at most; rounding
    alone is half of that) plus the fp32 sum's few ulps."""
    assert y.dtype == torch.bfloat16 and y.shape == want.shape
    err = (y.double() - want).abs()
    bound = want.abs() * 2**-8 + 1e-5 * max(k, 16) ** 0.5
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 13, 38, 241])
@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_within_one_rounding_of_float64(isa: str, rows: int, n: int, k: int) -> None:
    """bf16 panels (input pairs interleaved; odd K pads a zero, which must never meet x's next
    element): vdpbf16ps on avx512_bf16, widened weights elsewhere."""
    x, w, b = (torch.randn(*shape).bfloat16() for shape in ((rows, k), (n, k), (n,)))
    panels = cpu_linear.pack_weight(w)
    assert panels.dtype == torch.bfloat16
    assert panels.shape == (-(-n // cpu_linear.PANEL), -(-k // 2), cpu_linear.PANEL, 2)
    for bias in (None, b):
        y = cpu_linear.linear_packed(x, panels, bias, n, isa)
        _assert_bf16_close(y, _expected(x, w, bias), k)
    # an odd K's last input pairs with the row's next element in memory: poison it
    wide = torch.full((rows, k + 1), float("nan"), dtype=torch.bfloat16)
    wide[:, :k] = x
    y = cpu_linear.linear_packed(wide[:, :k], panels, None, n, isa)
    _assert_bf16_close(y, _expected(x, w, None), k)


@pytest.mark.parametrize("isa", cpu_isas())
def test_strided_rows_leading_dims_and_empty(isa: str) -> None:
    w, b = torch.randn(33, 40), torch.randn(33)
    panels = cpu_linear.pack_weight(w)
    for m in (6, 20):
        rows = torch.randn(m, 100)[:, 10:50]  # row stride 100
        _assert_close(cpu_linear.linear_packed(rows, panels, b, 33, isa), _expected(rows, w, b), 40)
    cols = torch.randn(6, 80)[:, ::2]  # stride 2 in K: copied first
    _assert_close(
        cpu_linear.linear_packed(cols, panels, None, 33, isa), _expected(cols, w, None), 40
    )
    batched = torch.randn(2, 3, 40)
    y = cpu_linear.linear_packed(batched, panels, None, 33, isa)
    assert y.shape == (2, 3, 33)
    _assert_close(y, _expected(batched, w, None), 40)
    assert cpu_linear.linear_packed(torch.randn(0, 40), panels, b, 33, isa).shape == (0, 33)
    # K = 0: every sum is empty, so the output is the bias (or zeros), as F.linear's
    empty = cpu_linear.pack_weight(torch.randn(5, 0))
    b5 = torch.randn(5)
    assert torch.equal(
        cpu_linear.linear_packed(torch.randn(3, 0), empty, b5, 5, isa), b5.expand(3, 5)
    )
    assert torch.equal(
        cpu_linear.linear_packed(torch.randn(3, 0), empty, None, 5, isa), torch.zeros(3, 5)
    )


def test_bad_inputs_raise_clear_errors() -> None:
    isa = default_isa()
    panels = cpu_linear.pack_weight(torch.randn(20, 8))  # 2 panels
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="are not those of 40 output features"):
        cpu_linear.linear_packed(x, panels, None, 40, isa)
    with pytest.raises(RuntimeError, match="are not those of"):
        cpu_linear.linear_packed(x, torch.randn(20, 8), None, 20, isa)
    with pytest.raises(RuntimeError, match="does not match panels"):
        cpu_linear.linear_packed(torch.randn(2, 9), panels, None, 20, isa)
    with pytest.raises(RuntimeError, match=r"bias .* does not match 20 output features"):
        cpu_linear.linear_packed(x, panels, torch.randn(16), 20, isa)
    with pytest.raises(RuntimeError, match="must all be float32 or all bfloat16"):
        cpu_linear.linear_packed(x.bfloat16(), panels, None, 20, isa)
    bf16_panels = cpu_linear.pack_weight(torch.randn(20, 8).bfloat16())
    with pytest.raises(RuntimeError, match=r"expected \[2, 5, 16, 2\]"):
        cpu_linear.linear_packed(torch.randn(2, 9).bfloat16(), bf16_panels, None, 20, isa)
    with pytest.raises(RuntimeError, match="not one of this CPU's"):
        cpu_linear.linear_packed(x, panels, None, 20, "sse9")
    with pytest.raises(ValueError, match=r"expected a \[N, K\] weight"):
        cpu_linear.pack_weight(torch.randn(2, 3, 4))


def test_op_is_opaque_to_torch_compile() -> None:
    x, w, b = torch.randn(3, 24), torch.randn(10, 24), torch.randn(10)
    panels, isa = cpu_linear.pack_weight(w), default_isa()
    torch.library.opcheck(
        torch.ops.prefixserve.linear_packed.default,
        (x, panels, b, 10, isa),
        test_utils=("test_schema", "test_faketensor"),
    )

    @torch.compile(backend="aot_eager", fullgraph=True, dynamic=True)
    def layer(x: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear_packed(x * 2, panels, b, 10, isa).relu()

    for rows in (3, 5):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(layer(x), F.linear(x * 2, w, b).relu())


def test_model_linears_swap_in_place() -> None:
    """Plain fp32 nn.Linear layers become PackedLinear: the weight is replaced by its panels, or,
    where it is tied to another module, stays that module's beside a packed copy; the other
    parameters stay the same objects; subclasses and other dtypes are left alone (bf16 too,
    unless the CPU has a bf16 dot product); outputs are F.linear's."""

    class Quantized(nn.Linear):  # stands for bitsandbytes' layers, which subclass nn.Linear
        pass

    embed = nn.Embedding(50, 16)
    model = nn.ModuleDict(
        {
            "embed": embed,
            "up": nn.Linear(16, 40),
            "down": nn.Linear(40, 16, bias=False),
            "quantized": Quantized(16, 16),
            "bf16": nn.Linear(16, 16).to(torch.bfloat16),
            "head": nn.Linear(16, 50, bias=False),
        }
    )
    model["head"].weight = embed.weight  # tied, as in the default model
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = model["head"](model["down"](model["up"](x)))
        up_weight = model["up"].weight.detach().clone()
        params = {name: p for name, p in model.named_parameters()}
        swapped = use_native_linears(model)
        if default_isa(env_cpu_isa()) == "baseline":
            assert swapped == 0
            return
        bf16 = torch.bfloat16 in native_dtypes(default_isa(env_cpu_isa()))
        assert swapped == 3 + bf16
        kinds = {name: type(m) for name, m in model.items()}
        assert kinds["up"] is kinds["down"] is kinds["head"] is PackedLinear
        assert kinds["quantized"] is Quantized
        assert kinds["bf16"] is (PackedLinear if bf16 else nn.Linear)
        assert "weight" not in dict(model["up"].named_parameters())
        placeholder = model["up"].weight  # shape and dtype for modeling code, no values
        assert placeholder.is_meta and placeholder.shape == (40, 16)
        assert placeholder.dtype == torch.float32
        assert torch.equal(model["up"].panels, cpu_linear.pack_weight(up_weight))
        assert model["head"].weight is embed.weight
        assert torch.equal(model["head"].panels, cpu_linear.pack_weight(embed.weight))
        assert not any(key.endswith("panels") for key in model.state_dict())  # not persistent
        now = dict(model.named_parameters())
        replaced = {"up.weight", "down.weight", *(["bf16.weight"] if bf16 else [])}
        assert now.keys() == params.keys() - replaced
        assert all(p is params[name] for name, p in now.items())
        got = model["head"](model["down"](model["up"](x)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _resident_kib(path: Path) -> int:
    """KiB of this process's memory resident in mappings of the file ``path``."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            current = fields[-1] == str(path.resolve())
        elif current and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")
def test_packing_gives_back_the_checkpoint_pages(tmp_path) -> None:
    """transformers maps the safetensors file and its weights view it: once a weight is packed,
    its pages leave the process (else the model would be held twice), and the model still
    computes what it did."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if default_isa(env_cpu_isa()) == "baseline":
        pytest.skip("no vectorized ISA: linears stay ATen's")
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        want = model(ids).logits  # every weight read: all pages resident
        before = _resident_kib(file)
        linear_kib = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)
        linear_kib //= 1024
        assert use_native_linears(model) > 0
        after = _resident_kib(file)
        got = model(ids).logits
    assert before >= linear_kib, "the test expects transformers to map the checkpoint"
    assert before - after >= 0.9 * linear_kib, (before, after, linear_kib)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")
def test_pages_are_given_back_only_where_nothing_else_views_them(tmp_path) -> None:
    """A weight in a file mapping gives its pages back; where another tensor of the model views
    some of the same bytes (an alias), it keeps them."""
    from prefixserve.native_linear import _drop_file_pages, _file_mappings, _span

    file = tmp_path / "weights.bin"
    torch.randn(64, 1024).numpy().tofile(file)  # 64 pages of 4 KiB
    weight = torch.from_file(str(file), shared=False, size=64 * 1024).view(64, 1024)
    own = _span(weight)
    unrelated = _span(torch.zeros(1024))
    alias = (own[0] + 8 * 4096, own[0] + 9 * 4096)  # a tensor viewing page 8 of the weight

    weight.sum()  # every page resident
    for others in ([alias, unrelated], [own]):  # a view of part of it, or of all of it
        _drop_file_pages(weight, _file_mappings(), others)
        assert _resident_kib(file) >= 64 * 4
    _drop_file_pages(weight, _file_mappings(), [unrelated])
    assert _resident_kib(file) == 0
    torch.testing.assert_close(weight, torch.from_file(str(file), size=64 * 1024).view(64, 1024))


def test_op_has_no_backward() -> None:
    x = torch.randn(3, 8, requires_grad=True)
    panels = cpu_linear.pack_weight(torch.randn(4, 8, requires_grad=True))
    assert not panels.requires_grad
    y = cpu_linear.linear_packed(x, panels, None, 4, default_isa())
    with pytest.raises(RuntimeError, match="has no backward"):
        y.sum().backward()


def test_without_the_op_linears_stay_aten_and_it_says_why_once(monkeypatch, caplog) -> None:
    from prefixserve.kernels.cpu_build import NativeBuildError

    def unavailable(cache_dir: Path) -> None:
        raise NativeBuildError("no C++ compiler (test)")

    monkeypatch.setattr(cpu_linear, "load", unavailable)
    with caplog.at_level(logging.WARNING, logger="prefixserve"):
        models = [nn.Sequential(nn.Linear(4, 4)) for _ in range(2)]
        assert [use_native_linears(m) for m in models] == [0, 0]
    assert all(type(m[0]) is nn.Linear for m in models)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler (test)" in warnings[0], warnings


@pytest.fixture(scope="module")
def amx_emulated(tmp_path_factory: pytest.TempPathFactory):
    """``csrc/cpu_linear_kernel.cpp`` built with software AMX tiles (``amx_emulation.h``) as
    its ``amx_emulated`` build (AVX2 code around the tiles), behind a test op
    (``amx_emulated_op.cpp``): the AMX blocking runs on any CPU with AVX2. The instructions
    themselves run only where a CPU has AMX (the ``amx`` ISA above)."""
    import os
    import subprocess

    from torch.utils import cpp_extension

    from prefixserve.kernels.cpu_build import COMMON_FLAGS, ISA_FLAGS, SOURCE_DIR

    if "avx2" not in cpu_isas():
        pytest.skip("the emulated build is AVX2 code")
    here, out = Path(__file__).resolve().parent, tmp_path_factory.mktemp("amx-emulated")
    compiler = os.environ.get("CXX") or "c++"
    includes = [f"-I{d}" for d in (SOURCE_DIR, here, *cpp_extension.include_paths())]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    base = [compiler, *COMMON_FLAGS, abi, *includes]
    emulate = ["-DPREFIXSERVE_ISA=amx_emulated", '-DPREFIXSERVE_AMX_EMULATE="amx_emulation.h"']
    jobs = [
        [*base, *ISA_FLAGS["avx2"], *emulate, "-c", str(SOURCE_DIR / "cpu_linear_kernel.cpp")],
        [*base, "-c", str(here / "amx_emulated_op.cpp")],
    ]
    objects = [out / "kernel.o", out / "op.o"]
    builds = [subprocess.Popen([*j, "-o", str(o)]) for j, o in zip(jobs, objects, strict=True)]
    assert all(b.wait() == 0 for b in builds), "the emulated AMX build failed (see stderr)"
    library = out / "libamx_emulated.so"
    libs = [f"-L{d}" for d in cpp_extension.library_paths()]
    link = [compiler, "-shared", *map(str, objects), *libs, "-lc10", "-ltorch_cpu"]
    subprocess.run([*link, "-o", str(library)], check=True)
    torch.ops.load_library(str(library))
    return torch.ops.prefixserve_amx_emulated


@pytest.mark.parametrize("rows", [15, 16, 17, 31, 32, 33, 48, 64, 241, 500])
@pytest.mark.parametrize("n,k", [(576, 576), (48, 64), (17, 32), (200, 96), (33, 40)])
def test_amx_blocks_on_emulated_tiles(amx_emulated, rows: int, n: int, k: int) -> None:
    """Whole 16-row blocks times one or two panels on tiles, the rest of the rows (and K not a
    multiple of 32: all of them) on the vector tiles; bias, strided rows; within one bf16
    rounding of float64."""
    x, w, b = (torch.randn(*shape).bfloat16() for shape in ((rows, k + 3), (n, k), (n,)))
    x = x[:, 2 : k + 2]  # a row stride of k + 3
    panels = cpu_linear.pack_weight(w)
    before = amx_emulated.tile_products()
    for bias in (None, b):
        _assert_bf16_close(amx_emulated.linear(x, panels, bias, n), _expected(x, w, bias), k)
    chunks = [min(256, rows - m) for m in range(0, rows, 256)]  # the AMX builds' row tasks
    blocks = sum(c // 16 for c in chunks) if k % 32 == 0 else 0  # 16-row blocks per panel
    assert amx_emulated.tile_products() - before == 2 * blocks * -(-n // 16) * (k // 32)
