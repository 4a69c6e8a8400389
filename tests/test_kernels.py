"""The compiled bfloat16 CPU kernels against the torch reference ops they replace."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import splitserve.engine.kernels as kernels_module
from splitserve.engine.attention import AttentionBatch
from splitserve.engine.kernels import (
    SOURCE,
    amx_wanted,
    attention_prefetch,
    decode_pipeline_wanted,
    kernels_build_dir,
    kernels_enabled,
    load_cpu_kernels,
)
from splitserve.engine.ops import CpuKernelOps, Linear, TorchOps

pytestmark = pytest.mark.skipif(not kernels_enabled(), reason="this CPU has no AVX512_BF16")
BF16 = torch.bfloat16
BF16_EPS = 2.0**-8  # one unit in the last place of a bfloat16 near 1


@pytest.fixture(scope="module")
def ops():
    kernels = load_cpu_kernels()
    assert kernels is not None, "kernels failed to build on a CPU that supports them"
    return CpuKernelOps(kernels)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(BF16)


def tiled(ops, k_cache, v_cache):
    """Copies of plain-row K and V caches in the kernels' tiled layout."""
    blocks = torch.stack((k_cache, v_cache))
    ops.retile_kv(blocks, True)
    return blocks[0], blocks[1]


@pytest.fixture(params=["avx512", "amx"])
def gemm_path(request, ops):
    """Each GEMM test on both paths: AVX512 blocks, and AMX tiles where the CPU has them."""
    if request.param == "amx" and not (amx_wanted() and ops.k.amx_enable()):
        pytest.skip("this CPU has no AMX_BF16")
    ops.k.set_amx(request.param == "amx")
    yield request.param
    ops.k.set_amx(amx_wanted())


@pytest.mark.parametrize("m, n, k, bias", [(1, 576, 576, False), (7, 200, 130, True), (100, 960, 576, False),
                                           (3, 70, 33, True), (64, 1536, 576, False),
                                           # several row groups, split evenly over the threads
                                           (128, 576, 576, False), (257, 200, 130, True), (1000, 70, 64, False),
                                           # K a multiple of 32 (AMX), rows short of a 32-row block, column tails
                                           (6, 100, 64, True), (33, 130, 96, True), (95, 576, 1536, False)])
def test_gemm_matches_float32_matmul(ops, gemm_path, m, n, k, bias):
    layer = Linear(k, n, bias)
    layer.weight.data = rand(n, k, seed=1)
    layer.bias = torch.nn.Parameter(rand(n, seed=2)) if bias else None
    x = rand(m, k, seed=3)
    expected = x.float() @ layer.weight.float().t() + (layer.bias.float() if bias else 0)
    layer.packed = ops.k.pack_weight(layer.weight.data)
    got = ops.linear(x, layer).float()
    # fp32 accumulation, one rounding to bfloat16 at the end
    assert torch.allclose(got, expected, rtol=BF16_EPS, atol=BF16_EPS * expected.abs().max().item())


def main_thread_runs_beside(compute) -> bool:
    """Whether the main thread gets to run while another thread is inside compute(), with the
    interpreter's forced switch put off for longer than the test: only if compute() lets go of the
    GIL. Holding it, the other thread would keep it until compute() returned, and the main thread
    would find the thread gone."""
    started, seen_running = threading.Event(), []

    def body():
        started.set()
        compute()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        worker = threading.Thread(target=body)
        worker.start()
        started.wait()
        seen_running.append(worker.is_alive())
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    return seen_running == [True]


def test_the_kernels_let_other_python_threads_run_while_they_compute(ops):
    """A GEMM lets go of the GIL while it runs: the main thread still runs while another thread is
    inside its GEMMs (a worker's event loop beside its engine thread)."""
    layer = Linear(2048, 2048, False)
    layer.weight.data = rand(2048, 2048, seed=1)
    layer.packed = ops.k.pack_weight(layer.weight.data)
    x = rand(64, 2048, seed=3)
    results = []

    def gemms():  # no torch call between them
        results.extend(ops.k.gemm(x, layer.packed, 2048, None) for _ in range(200))

    assert main_thread_runs_beside(gemms)
    assert len(results) == 200


def test_a_gemm_rows_result_does_not_depend_on_the_rows_beside_it(ops, gemm_path):
    """A decode step's rows are its sequences: a request's tokens must not depend on its batch."""
    layer = Linear(576, 960, False)
    layer.weight.data = rand(960, 576, seed=1)
    layer.packed = ops.k.pack_weight(layer.weight.data)
    x = rand(40, 576, seed=3)
    full = ops.linear(x, layer)
    for m in (1, 2, 5, 6, 16, 17, 33):
        assert torch.equal(ops.linear(x[:m], layer), full[:m]), m


@pytest.mark.parametrize("k", [130, 128])
def test_gemm_rows_split_over_more_threads_than_they_fill(ops, gemm_path, k):
    """97 rows over 16 threads: row groups of 7 (of 32 on AMX), some of which hold no row."""
    layer = Linear(k, 200, True)
    layer.weight.data, layer.bias = rand(200, k, seed=1), torch.nn.Parameter(rand(200, seed=2))
    layer.packed = ops.k.pack_weight(layer.weight.data)
    x = rand(97, k, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(16)
        got = ops.linear(x, layer)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, ops.linear(x, layer))  # the same bits as at the test's 2 threads


def test_each_torch_installation_builds_the_kernels_in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Two environments with the same torch version (a development venv and a CI clone's) compile
    against their own torch: sharing a build folder, each rebuilt the other's build at its next start.
    The same installation finds its folder again."""
    from types import SimpleNamespace

    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    dev = SimpleNamespace(__file__="/work/dev/.venv/site-packages/torch/__init__.py", __version__="2.13.0")
    ci = SimpleNamespace(__file__="/work/ci/.venv/site-packages/torch/__init__.py", __version__="2.13.0")
    assert kernels_build_dir(dev) != kernels_build_dir(ci)
    assert kernels_build_dir(dev) == kernels_build_dir(SimpleNamespace(**vars(dev)))
    assert kernels_build_dir(dev).parent == tmp_path / "kernels"
    assert kernels_build_dir(dev).name.startswith("torch2.13.0-")
    assert load_cpu_kernels().__name__.endswith(kernels_build_dir(torch).name.rsplit("-", 1)[1])


def test_two_checkouts_sharing_a_venv_build_the_kernels_in_folders_of_their_own(tmp_path, monkeypatch):
    """A snapshot of the repository run with the development venv compiles its own copy of the source:
    sharing the venv's build folder, each checkout took the other's build for stale and rebuilt it."""
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    copies = [tmp_path / name / "cpu_bf16.cpp" for name in ("main", "snapshot")]
    for copy in copies:
        copy.parent.mkdir()
        copy.write_bytes(SOURCE.read_bytes())
    first, second = (kernels_build_dir(torch, source) for source in copies)
    assert first != second and first.parent == second.parent == tmp_path / "kernels"
    assert kernels_build_dir(torch, copies[0]) == first


def test_a_build_lock_left_by_a_process_killed_mid_build_does_not_hang_the_next_load(ops):
    """torch's build lock is a file; a worker killed while it compiled the kernels left it behind, and
    every later start (each worker's, `make run`'s) then waited on it forever without a word. A load
    now takes a lock the kernel frees with its holder first, and removes torch's as stale."""
    torch_lock = kernels_build_dir(torch) / "lock"
    torch_lock.touch()  # what torch's FileBaton leaves when its process dies before releasing it
    probe = "from splitserve.engine.kernels import load_cpu_kernels; print(load_cpu_kernels() is not None)"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("loading the kernels waited on a dead process's build lock")
    finally:
        torch_lock.unlink(missing_ok=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
    assert "killed mid-build" in out.stdout + out.stderr


@pytest.mark.skipif(not amx_wanted(), reason="this CPU has no AMX_BF16")
def test_amx_is_on_by_default_and_off_with_splitserve_amx_0():
    probe = "from splitserve.engine.kernels import load_cpu_kernels; print(load_cpu_kernels().amx_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "SPLITSERVE_AMX": value}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == expected


def block_tables(context_lens: list[int], block_size: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Each sequence's blocks drawn in a random order, padded with block 0 to the widest table."""
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, width = [], max(-(-c // block_size) for c in context_lens)
    for c in context_lens:
        n = -(-c // block_size)
        tables.append(order[:n] + [0] * (width - n))
        order = order[n:] + order[:n]
    return torch.tensor(tables)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 8, 64), (16, 4, 128)])
def test_decode_attention_matches_reference(ops, heads, kv_heads, head_dim):
    block_size, num_blocks = 16, 40
    context_lens = [1, 15, 16, 17, 100, 200]
    k_cache, v_cache = rand(num_blocks, kv_heads, block_size, head_dim, seed=4), rand(
        num_blocks, kv_heads, block_size, head_dim, seed=5)
    batch = AttentionBatch(is_prefill=False, slot_mapping=torch.zeros(0, dtype=torch.long),
                           block_tables=block_tables(context_lens, block_size, num_blocks, seed=6),
                           context_lens=torch.tensor(context_lens))
    q = rand(len(context_lens), heads, head_dim, seed=7)
    scale = head_dim**-0.5
    expected = TorchOps().decode_attention(q.float(), k_cache.float(), v_cache.float(), batch, scale)
    got = ops.decode_attention(q, *tiled(ops, k_cache, v_cache), batch, scale).float()
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2)
    assert (got - expected).abs().mean() < 2e-3


@pytest.mark.parametrize("block_size, d", [(32, 64), (16, 80), (16, 128)])  # 80: pairs past 16 x 16 squares
def test_the_tiled_layout_puts_each_element_where_the_kernels_read_it(ops, block_size, d):
    """K: [block_size / 16, D / 2, 16, 2] per (block, head) tile; V: [block_size / 2, D, 2]; and back.
    Every element distinct (its index as bits, all finite), every position checked."""
    n, heads = 3, 2
    numel = 2 * n * heads * block_size * d
    plain = torch.arange(numel, dtype=torch.int16).view(2, n, heads, block_size, d).view(BF16)
    blocks = plain.clone()
    ops.retile_kv(blocks, True)
    off = torch.arange(block_size)[:, None]
    dim = torch.arange(d)[None, :]
    k_at = ((off // 16 * (d // 2) + dim // 2) * 16 + off % 16) * 2 + dim % 2
    v_at = (off // 2 * d + dim) * 2 + off % 2
    bits, tiled_bits = plain.view(torch.int16), blocks.view(torch.int16).flatten(3)
    assert torch.equal(tiled_bits[0][..., k_at], bits[0])
    assert torch.equal(tiled_bits[1][..., v_at], bits[1])
    ops.retile_kv(blocks, False)
    assert torch.equal(blocks.view(torch.int16), bits)


def test_decode_attention_reads_nothing_past_the_context(ops):
    """An odd context's last V pair holds one token of the sequence and one that is not: the other's
    lanes (and every K past the context) must not reach the result, even as NaN or infinity."""
    heads, kv_heads, d, block_size = 9, 3, 64, 16
    context_lens = [1, 15, 17, 31, 33]
    k_plain, v_plain = rand(12, kv_heads, block_size, d, seed=30), rand(12, kv_heads, block_size, d, seed=31)
    tables = torch.tensor([[2 * i, 2 * i + 1, 11] for i in range(len(context_lens))])
    clean_k, clean_v = k_plain.clone(), v_plain.clone()
    for i, ctx in enumerate(context_lens):  # poison every slot a sequence's table covers past its context
        for pos in range(ctx, 2 * block_size):
            block = int(tables[i, pos // block_size])
            k_plain[block, :, pos % block_size] = float("nan")
            v_plain[block, :, pos % block_size] = float("inf") if pos % 2 else float("nan")
    batch = AttentionBatch(is_prefill=False, slot_mapping=torch.zeros(0, dtype=torch.long),
                           block_tables=tables, context_lens=torch.tensor(context_lens))
    q = rand(len(context_lens), heads, d, seed=32)
    expected = TorchOps().decode_attention(q.float(), clean_k.float(), clean_v.float(), batch, d**-0.5)
    got = ops.decode_attention(q, *tiled(ops, k_plain, v_plain), batch, d**-0.5).float()
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2)


def test_blocks_not_a_multiple_of_16_tokens_stay_plain_and_use_the_reference(ops):
    heads, kv_heads, d, block_size = 9, 3, 64, 8
    assert not ops.tiles_kv(block_size) and ops.tiles_kv(16) and ops.tiles_kv(32)
    assert not TorchOps().tiles_kv(16)
    context_lens = [3, 8, 9, 40]
    k_cache, v_cache = rand(30, kv_heads, block_size, d, seed=33), rand(30, kv_heads, block_size, d, seed=34)
    batch = AttentionBatch(is_prefill=False, slot_mapping=torch.zeros(0, dtype=torch.long),
                           block_tables=block_tables(context_lens, block_size, 30, seed=35),
                           context_lens=torch.tensor(context_lens))
    q = rand(len(context_lens), heads, d, seed=36)
    assert torch.equal(ops.decode_attention(q, k_cache, v_cache, batch, d**-0.5),
                       TorchOps().decode_attention(q, k_cache, v_cache, batch, d**-0.5))


def test_decode_attention_gives_the_same_bits_on_any_number_of_threads(ops):
    """A thread done with its run of sequences takes the rest of the others' runs (here the longest
    sequences come first, as in a server's batch, and 16 threads share two cores): every sequence
    is still attended once, with the bits of one thread."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    context_lens = [520 - 16 * i for i in range(33)]
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 5
    tables_t, lens_t = block_tables(context_lens, block_size, num_blocks, seed=30), torch.tensor(context_lens)
    k_cache, v_cache = tiled(ops, rand(num_blocks, kv_heads, block_size, head_dim, seed=31),
                             rand(num_blocks, kv_heads, block_size, head_dim, seed=32))
    q = rand(len(context_lens), heads, head_dim, seed=33)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3, 16):
            torch.set_num_threads(n)
            results += [ops.k.decode_attention(q, k_cache, v_cache, tables_t, lens_t, head_dim**-0.5)
                        for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size",
                         [(9, 3, 64, 16), (8, 2, 128, 16), (4, 4, 32, 32), (14, 2, 64, 16)])
def test_decode_attention_batched_equals_one_sequence_at_a_time(ops, heads, kv_heads, head_dim, block_size):
    """A large batch runs each sequence's KV heads together (whole cache blocks), a single sequence one
    head per thread: both paths must give the same bits, and match the reference."""
    context_lens = [1, 2, 15, 16, 17, 31, 33, 64, 99, 100, 130, 255, 256, 257, 300, 7] * 3
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 5  # every sequence's blocks its own
    tables_t, lens_t = block_tables(context_lens, block_size, num_blocks, seed=20), torch.tensor(context_lens)
    plain_k = rand(num_blocks, kv_heads, block_size, head_dim, seed=21)
    plain_v = rand(num_blocks, kv_heads, block_size, head_dim, seed=22)
    k_cache, v_cache = tiled(ops, plain_k, plain_v)
    q = rand(len(context_lens), heads, head_dim, seed=23)
    scale = head_dim**-0.5
    batched = ops.k.decode_attention(q, k_cache, v_cache, tables_t, lens_t, scale)
    single = torch.cat([ops.k.decode_attention(q[i:i + 1], k_cache, v_cache, tables_t[i:i + 1],
                                               lens_t[i:i + 1], scale) for i in range(len(context_lens))])
    assert torch.equal(batched, single)
    # Whichever way the attention prefetches (this CPU's way is the default), no result bit moves.
    default = ops.k.attention_prefetch()
    assert default == attention_prefetch()
    try:
        for mode in ("l2", "l1", "l2-lines"):
            ops.k.set_attention_prefetch(mode)
            assert ops.k.attention_prefetch() == mode
            assert torch.equal(ops.k.decode_attention(q, k_cache, v_cache, tables_t, lens_t, scale), batched)
            longest = context_lens.index(max(context_lens))  # alone: one head per work item
            one = slice(longest, longest + 1)
            alone = ops.k.decode_attention(q[one], k_cache, v_cache, tables_t[one], lens_t[one], scale)
            assert torch.equal(alone, single[one])
        with pytest.raises(RuntimeError, match="one of l2, l1, l2-lines"):
            ops.k.set_attention_prefetch("l3")
    finally:
        ops.k.set_attention_prefetch(default)
    # q as the model passes it: a view of the fused qkv projection's rows, read in place.
    fused = torch.full((len(context_lens), (heads + 2 * kv_heads) * head_dim), 1000.0, dtype=q.dtype)
    fused[:, :heads * head_dim] = q.reshape(len(context_lens), -1)
    strided = fused[:, :heads * head_dim].view(-1, heads, head_dim)
    assert not strided.is_contiguous()
    assert torch.equal(ops.k.decode_attention(strided, k_cache, v_cache, tables_t, lens_t, scale), batched)
    assert torch.equal(ops.k.decode_attention(strided[:1], k_cache, v_cache, tables_t[:1], lens_t[:1], scale),
                       single[:1])
    batch = AttentionBatch(is_prefill=False, slot_mapping=torch.zeros(0, dtype=torch.long),
                           block_tables=tables_t, context_lens=lens_t)
    expected = TorchOps().decode_attention(q.float(), plain_k.float(), plain_v.float(), batch, scale)
    assert torch.allclose(batched.float(), expected, atol=2e-2, rtol=2e-2)
    assert (batched.float() - expected).abs().mean() < 2e-3


@pytest.mark.parametrize("hidden", [576, 1000])  # 1000: a last vector of 8 lanes
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm_matches_reference_and_updates_the_residual(ops, hidden, with_delta):
    norm = torch.nn.Module()
    norm.weight, norm.eps = rand(hidden, seed=8), 1e-5
    residual, delta = rand(33, hidden, seed=9), rand(33, hidden, seed=10) if with_delta else None
    ref_residual, ref_normed = TorchOps().add_rmsnorm(residual.clone(), delta, norm)
    got_residual, got_normed = ops.add_rmsnorm(residual, delta, norm)
    assert torch.equal(got_residual, ref_residual)
    assert torch.equal(residual, ref_residual)  # in place
    assert torch.allclose(got_normed.float(), ref_normed.float(), rtol=2 * BF16_EPS, atol=1e-3)


@pytest.mark.parametrize("d", [64, 80, 128])  # 80: each half ends in a vector of 8 lanes
def test_rope_write_kv_matches_reference(ops, d):
    tokens, heads, kv_heads = 21, 9, 3
    qkv = rand(tokens, (heads + 2 * kv_heads) * d, seed=11)
    cos, sin = rand(tokens, d, seed=12), rand(tokens, d, seed=13)
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(14))[:tokens]

    def run(impl, qkv):
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k, v = q.view(tokens, heads, d), k.view(tokens, kv_heads, d), v.view(tokens, kv_heads, d)
        kc, vc = torch.zeros(4, kv_heads, 16, d, dtype=BF16), torch.zeros(4, kv_heads, 16, d, dtype=BF16)
        q, k = impl.rope_write_kv(q, k, v, cos, sin, kc, vc, slots)
        if impl.tiles_kv(16):  # the kernels write the caches tiled
            blocks = torch.stack((kc, vc))
            impl.retile_kv(blocks, False)
            kc, vc = blocks
        return q, k, kc, vc

    for a, b in zip(run(TorchOps(), qkv.clone()), run(ops, qkv.clone())):
        assert torch.equal(a, b)


def test_silu_mul_matches_reference(ops):
    gate_up = rand(5, 2 * 1000, seed=15) * 4
    expected = TorchOps().silu_mul(gate_up).float()
    got = ops.silu_mul(gate_up).float()
    assert torch.allclose(got, expected, rtol=2 * BF16_EPS, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 15, 16, 40, 64, 65, 130, 49152, 50001])
def test_argmax_rows_matches_torch_with_ties_infinities_and_nan(ops, vocab, dtype):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-4, 5, (9, vocab), generator=generator).to(dtype)  # ties everywhere
    logits[1] = float("-inf")  # all -inf: index 0, as torch
    logits[2, vocab // 2] = float("inf")
    logits[3, -1] = float("inf")  # in the tail lanes
    logits[4, vocab // 3] = float("nan")
    logits[5, -1] = float("nan")
    logits[6, -1] = 100.0
    if vocab > 64:  # the kernel's four chains take 16 columns each: a tie across chains and blocks
        logits[7] = 0
        logits[7, [48, 64, vocab - 1]] = 5
    expected = logits.argmax(dim=-1).masked_fill(torch.tensor([False] * 4 + [True] * 2 + [False] * 3), -1)
    assert torch.equal(ops.argmax_rows(logits), expected)
    assert torch.equal(TorchOps().argmax_rows(logits), expected)
    wider = torch.full((9, vocab + 5), 1000.0, dtype=dtype)  # its extra columns would win if read
    wider[:, :vocab] = logits
    assert not wider[:, :vocab].is_contiguous()
    assert torch.equal(ops.argmax_rows(wider[:, :vocab]), expected)
    assert torch.equal(ops.argmax_rows(logits[:0]), torch.empty(0, dtype=torch.long))


@pytest.mark.parametrize("lengths", [[1], [5, 64], [193, 2, 400]])
def test_prefill_attention_matches_reference(ops, lengths):
    heads, kv_heads, d = 9, 3, 64
    total = sum(lengths)
    q, k, v = rand(total, heads, d, seed=16), rand(total, kv_heads, d, seed=17), rand(total, kv_heads, d, seed=18)
    expected = TorchOps().prefill_attention(q.float(), k.float(), v.float(), lengths, d**-0.5)
    got = ops.prefill_attention(q, k, v, lengths, d**-0.5).float()
    assert got.shape == (total, heads, d)
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2)
    assert (got - expected).abs().mean() < 2e-3


@pytest.mark.parametrize("prefix, chunk, d", [(16, 16, 64), (37, 64, 64), (300, 128, 64), (5, 1, 64),
                                              (200, 256, 64), (101, 300, 64),
                                              # head_dim 32: the torch reference over plain copies
                                              (37, 64, 32), (101, 30, 32)])
def test_chunk_attention_over_a_cached_prefix_matches_reference(ops, prefix, chunk, d):
    from splitserve.engine.attention import PromptChunk, write_kv

    heads, kv_heads, block_size = 9, 3, 16
    context = prefix + chunk
    num_blocks = (context + block_size - 1) // block_size
    k_cache = torch.zeros(num_blocks + 2, kv_heads, block_size, d, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    table = torch.arange(num_blocks + 1, 1, -1)[:num_blocks]  # scattered, reversed block ids
    slots = torch.tensor([int(table[p // block_size]) * block_size + p % block_size for p in range(context)])
    write_kv(k_cache, v_cache, rand(context, kv_heads, d, seed=19), rand(context, kv_heads, d, seed=20), slots)
    q = rand(chunk, heads, d, seed=21)
    spec = PromptChunk(chunk, prefix, table)
    expected = TorchOps().chunk_attention(q.float(), k_cache.float(), v_cache.float(), spec, d**-0.5)
    got = ops.chunk_attention(q, *tiled(ops, k_cache, v_cache), spec, d**-0.5).float()
    assert got.shape == (chunk, heads, d)
    assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2)
    assert (got - expected).abs().mean() < 2e-3


def tiny_checkpoint(name, folder, tokenizer_source, max_positions=512):
    """A two-layer checkpoint whose heads the kernels take (32 dims): a Qwen2 (biased q/k/v
    projections, set at random: they start at zero, where leaving them out would change nothing), a
    Llama with 8 x 32 query dims against a hidden size of 128, or a Qwen3 (q/k norms)."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_key_value_heads=2, max_position_embeddings=max_positions, initializer_range=0.15,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    config = {"qwen2-biased": lambda: Qwen2Config(**common, num_attention_heads=4),
              "llama-wide-heads": lambda: LlamaConfig(**common, num_attention_heads=8, head_dim=32),
              "qwen3": lambda: Qwen3Config(**common, num_attention_heads=4, head_dim=32)}[name]()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    if name == "qwen2-biased":
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    hf.save_pretrained(folder)
    for f in tokenizer_source.glob("tokenizer*"):
        shutil.copy(f, folder)


def prefilled_for_decode(engine):
    """Four sequences of 5-40 prompt tokens, prefilled, each with one more token to decode."""
    from splitserve.engine import SamplingParams, Sequence

    gen = torch.Generator().manual_seed(5)
    vocab = engine.loaded.spec.vocab_size
    greedy = SamplingParams(temperature=0.0)
    seqs = [Sequence(f"s{i}", torch.randint(3, vocab, (n,), generator=gen).tolist(), greedy)
            for i, n in enumerate((5, 17, 40, 33))]
    tables = [engine.blocks.allocate(s.request_id, s.num_tokens + 1) for s in seqs]
    engine.runner.prefill(seqs, tables)
    for s in seqs:
        s.output_token_ids.append(7)
        s.num_computed_tokens = s.num_tokens - 1
    return seqs, tables


@pytest.mark.parametrize("model", ["default", "qwen2-biased", "llama-wide-heads", "qwen3"])
def test_decode_layers_in_one_call_give_the_bits_of_layer_by_layer(model, model_bf16, tmp_path, monkeypatch):
    """A decode step's layers in one kernel call (DecodeLayers) run the same kernels in the same
    order as the model's Python forward: the same logits and the same KV written, bit for bit, and
    the Python layers do not run at all. A model with q/k norms (Qwen3), which the one call does
    not apply, runs its layers one by one either way."""
    from splitserve.engine import EngineConfig, LLMEngine
    from splitserve.engine.models.llama import LlamaModel

    if model == "default":
        engine = LLMEngine(EngineConfig(kv_cache_bytes=1 << 27), loaded=model_bf16)
    else:
        tiny_checkpoint(model, tmp_path, model_bf16.source.path)
        engine = LLMEngine(EngineConfig(model=str(tmp_path), kv_cache_bytes=1 << 24))
    spec = engine.loaded.spec
    assert (engine.runner.model.layers[0].self_attn.qkv.bias is not None) == (model == "qwen2-biased")
    assert (spec.num_heads * spec.head_dim != spec.hidden_size) == (model == "llama-wide-heads")
    assert spec.qk_norm == (model == "qwen3")
    runner, model_ops = engine.runner, engine.runner.model.ops
    assert isinstance(model_ops, CpuKernelOps)
    layered_decodes = []
    run_parts = LlamaModel.run_parts

    def counting(self, state, count, batch, cache):
        layered_decodes.append(not batch.is_prefill and not batch.chunks)
        return run_parts(self, state, count, batch, cache)

    monkeypatch.setattr(LlamaModel, "run_parts", counting)
    seqs, tables = prefilled_for_decode(engine)
    before = runner.cache.data.clone()
    steps = {"decode": lambda: runner.decode(seqs, tables),
             "mixed, no chunk": lambda: runner.mixed([], seqs, [], tables)}  # a chunked engine's decode step
    for name, step in steps.items():
        results = {}
        for fused in (False, True):
            runner.cache.data.copy_(before)
            monkeypatch.setattr(model_ops, "fused_decode", fused)
            layered_decodes.clear()
            logits = step()
            results[fused] = logits, runner.cache.data.clone(), list(layered_decodes)
        fused_layers = [True] if model == "qwen3" else []  # with q/k norms the Python layers run
        assert results[False][2] == [True] and results[True][2] == fused_layers, name
        assert torch.equal(results[True][0], results[False][0]), name
        assert torch.equal(results[True][1], results[False][1]), name
        assert not torch.equal(results[True][1], before), name  # the step wrote its tokens' K and V


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("model", ["default", "qwen2-biased", "llama-wide-heads"])
def test_pipelined_decode_steps_give_the_bits_of_steps_kernel_by_kernel(model, threads, model_bf16, tmp_path):
    """A decode step of at least 16 sequences whose K and V outweigh the layers' weights enough runs
    pipelined where it is on (AMD's Zen 4 by default): one half of the batch's attention beside the
    other half's GEMMs, each half's rows through the same kernels' arithmetic. The same logits and the
    same K and V written, bit for bit, as the step run kernel by kernel, here with an odd batch
    (unequal halves) of uneven contexts, for biased q/k/v projections and query heads wider than the
    hidden size too; on one thread, two, and three (more threads than cores: each GEMM's tiles taken
    by whichever thread is free); with the attention prefetching either way. With the default model's
    long contexts most attention passes run between the GEMM tiles, where the overlap is. (AMX, whose
    GEMMs sum in another order, is off here: with it the pipeline never runs.)"""
    from splitserve.engine import EngineConfig, LLMEngine, SamplingParams, Sequence

    if model == "default":
        engine = LLMEngine(EngineConfig(kv_cache_bytes=600 << 20), loaded=model_bf16)  # 33 x 700 tokens
    else:
        tiny_checkpoint(model, tmp_path, model_bf16.source.path, max_positions=1024)
        engine = LLMEngine(EngineConfig(model=str(tmp_path), kv_cache_bytes=1 << 26))
    runner, kernels = engine.runner, engine.runner.model.ops.k
    gen = torch.Generator().manual_seed(11)
    vocab = engine.loaded.spec.vocab_size
    seqs = [Sequence(f"s{i}", torch.randint(3, vocab, (420 + 37 * i % 281,), generator=gen).tolist(),
                     SamplingParams(temperature=0.0)) for i in range(33)]
    tables = [engine.blocks.allocate(s.request_id, s.num_tokens) for s in seqs]
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1  # the last token's step, over a context at random:
    runner.cache.data.normal_(generator=gen)  # no prefill needed to compare two runs of one step
    before = runner.cache.data.clone()
    was_on, was_amx, was_threads = kernels.decode_pipeline(), kernels.amx_enabled(), torch.get_num_threads()
    kernels.set_amx(False)
    torch.set_num_threads(threads)
    prefetch = kernels.attention_prefetch()
    other = "l2" if prefetch == "l2-lines" else "l2-lines"  # the attention's other way of prefetching
    results, serial_cache = {}, None
    try:
        for on, mode in ((False, prefetch), (True, prefetch), (True, other)):
            runner.cache.data.copy_(before)
            kernels.set_decode_pipeline(on)
            kernels.set_attention_prefetch(mode)
            steps, overlapped = kernels.pipelined_steps(), kernels.overlapped_passes()
            logits = runner.decode(seqs, tables)
            if serial_cache is None:
                serial_cache = runner.cache.data.clone()
            results[on, mode] = (logits, torch.equal(runner.cache.data, serial_cache),
                                 kernels.pipelined_steps() - steps, kernels.overlapped_passes() - overlapped)
    finally:
        kernels.set_decode_pipeline(was_on)
        kernels.set_attention_prefetch(prefetch)
        kernels.set_amx(was_amx)
        torch.set_num_threads(was_threads)
    serial = results.pop((False, prefetch))
    assert serial[2] == 0
    assert not torch.equal(serial_cache, before)  # the step wrote its tokens' K and V
    for key, (logits, same_cache, steps, _) in results.items():
        assert steps == 1, key
        assert torch.equal(logits, serial[0]), key
        assert same_cache, key
    passes = 2 * len(seqs) * engine.loaded.spec.num_layers
    if model == "default":  # 30 layers of 420-700 tokens: the passes' K and V outweigh the tiles' steps
        assert results[True, prefetch][3] > passes // 2


def test_the_decode_pipeline_is_on_where_it_was_measured_or_where_the_environment_says(monkeypatch):
    """Unset, SPLITSERVE_DECODE_PIPELINE leaves it to the CPU: on for AMD's Zen 4 (family 25), where it
    was measured quicker, off elsewhere; 1 and 0 say so anywhere, and anything else is refused."""
    cpus = {"zen4": {"vendor_id": "AuthenticAMD", "cpu family": "25"},
            "zen5": {"vendor_id": "AuthenticAMD", "cpu family": "26"},
            "intel": {"vendor_id": "GenuineIntel", "cpu family": "6"}}
    for name, fields in cpus.items():
        monkeypatch.setattr(kernels_module, "cpuinfo_field", lambda field, f=fields: f.get(field, ""))
        monkeypatch.delenv("SPLITSERVE_DECODE_PIPELINE", raising=False)
        assert decode_pipeline_wanted() == (name == "zen4"), name
        for setting in ("0", "1"):
            monkeypatch.setenv("SPLITSERVE_DECODE_PIPELINE", setting)
            assert decode_pipeline_wanted() == (setting == "1"), name
        monkeypatch.setenv("SPLITSERVE_DECODE_PIPELINE", "yes")
        with pytest.raises(ValueError, match="must be 0 or 1"):
            decode_pipeline_wanted()


def test_decode_steps_run_on_the_kernels_switched_to(model_bf16):
    """The A/B scripts time two builds of the kernels in one engine (scripts/decode-step-ab.py): once
    a decode step has built its DecodeLayers from one build, a switch to the other must run the next
    step on the other's, not on the DecodeLayers already built (with the same results here)."""
    from splitserve.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_bytes=1 << 27), loaded=model_bf16)
    seqs, tables = prefilled_for_decode(engine)
    model_ops = engine.runner.model.ops
    before = engine.runner.cache.data.clone()
    first = engine.runner.decode(seqs, tables)  # builds the cache's DecodeLayers from the loaded build

    class Build:
        """The same kernels, counting the DecodeLayers built from them."""
        def __init__(self, real):
            self.real, self.built = real, 0

        def __getattr__(self, name):
            return getattr(self.real, name)

        def DecodeLayers(self, *args):  # noqa: N802 (the kernels' class name)
            self.built += 1
            return self.real.DecodeLayers(*args)

    other = Build(model_ops.k)
    model_ops.use_kernels(other)
    try:
        engine.runner.cache.data.copy_(before)
        again = engine.runner.decode(seqs, tables)
        assert model_ops.k is other and other.built == 1
        assert torch.equal(again, first)
    finally:
        model_ops.use_kernels(other.real)  # the model is the session's


def test_decode_layers_let_other_python_threads_run_while_they_compute(model_bf16):
    """The one call lets go of the GIL for the whole pass, as each kernel does: the main thread
    still runs while another thread is inside a loop of DecodeLayers.run calls."""
    from splitserve.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(kv_cache_bytes=1 << 27), loaded=model_bf16)
    seqs, tables = prefilled_for_decode(engine)
    model_ops = engine.runner.model.ops
    engine.runner.decode(seqs, tables)  # builds the cache's DecodeLayers
    stack = model_ops._decode_stacks[engine.runner.cache]
    args = []

    class Recording:
        def run(self, *a):
            args.extend(a)
            return stack.run(*a)

    model_ops._decode_stacks[engine.runner.cache] = Recording()
    engine.runner.decode(seqs, tables)
    assert len(args) == 7
    results = []
    assert main_thread_runs_beside(lambda: results.extend(stack.run(*args) for _ in range(100)))
    assert len(results) == 100
