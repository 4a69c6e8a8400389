import random
from collections import Counter

import pytest

from splitserve.engine.block_manager import BlockManager, OutOfBlocks, block_hashes, blocks_for, routing_key


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 16) for n in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]


def test_allocate_starts_at_block_0_and_a_later_table_in_the_middle_of_the_free_extent():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.allocate("b", 4) == [4]  # blocks 2-3 stay free for a to grow into, 5-7 for b
    assert bm.num_free_blocks == 5
    assert bm.block_table("a") == [0, 1]


def test_tables_growing_at_once_each_stay_one_run():
    # The regression: free blocks handed out in the order they were freed interleave sequences that
    # grow in the same steps (a: 0, 2, 4, 6; b: 1, 3, 5, 7), and the decode attention then reads
    # every block of every sequence as a stream of its own.
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.allocate("a", 4)
    bm.allocate("b", 4)
    for tokens in range(5, 17):
        bm.grow("a", tokens)
        bm.grow("b", tokens)
    assert bm.block_table("a") == [0, 1, 2, 3]
    assert bm.block_table("b") == [8, 9, 10, 11]


def test_a_table_that_meets_another_starts_a_new_run_in_the_largest_free_extent():
    bm = BlockManager(num_blocks=8, block_size=1)
    bm.allocate("a", 1)
    assert bm.allocate("b", 1) == [4]
    bm.grow("a", 4)
    assert bm.grow("a", 5) == [6]  # 4 is b's: the middle of the largest extent, 5-7
    assert bm.block_table("a") == [0, 1, 2, 3, 6]


def test_freed_blocks_join_their_neighbours_and_are_reused_in_runs():
    bm = BlockManager(num_blocks=8, block_size=1)
    assert bm.allocate("a", 3) == [0, 1, 2]
    assert bm.allocate("b", 2) == [4, 5]
    assert bm.free("a") == [0, 1, 2]  # joins the free block 3: 0-3 is one extent again
    assert bm.allocate("c", 6) == [0, 1, 2, 3, 6, 7]  # larger than any extent: two runs
    assert bm.num_free_blocks == 0


def test_random_churn_keeps_every_block_in_exactly_one_place():
    rng = random.Random(7)
    bm = BlockManager(num_blocks=64, block_size=4)
    tokens: dict[str, int] = {}
    for i in range(3000):
        rid = rng.choice(list(tokens)) if tokens and rng.random() < 0.8 else f"r{i}"
        try:
            if rid not in tokens:
                prompt = rng.randrange(1, 40)
                bm.allocate(rid, prompt, block_hashes([rng.randrange(3)] * prompt, 4))
                bm.cache(rid, block_hashes([0] * prompt, 4)[:1])
                tokens[rid] = prompt
            elif rng.random() < 0.1:
                bm.free(rid)
                del tokens[rid]
            else:
                bm.grow(rid, tokens[rid] + 1)
                tokens[rid] += 1
        except OutOfBlocks:
            pass
        held = Counter(b for r in tokens for b in bm.block_table(r))
        assert all(bm._refs[b] == count for b, count in held.items())  # no block in two tables unshared
        assert all(bm._refs[b] == 0 for b in range(64) if b not in held)
        free = [b for first, n in bm._extents.items() for b in range(first, first + n)]
        assert len(set(free)) == len(free) == bm._num_free
        assert not set(free) & (set(held) | set(bm._unheld))
        assert set(free) | set(held) | set(bm._unheld) == set(range(64))
        assert bm.num_free_blocks == 64 - len(held)
        assert bm._extent_ending == {first + n: first for first, n in bm._extents.items()}
        assert all(first + n not in bm._extents for first, n in bm._extents.items())  # joined


def test_a_take_past_the_free_extents_evicts_cached_blocks_least_recently_used_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert _cached_request(bm, "a", list(range(8))) == [0, 1]
    bm.free("a")  # 0 and 1 stay cached; a's tail, 1, is the least recently used
    assert bm.allocate("c", 12) == [2, 3, 1]  # the free extent first, then one eviction
    assert bm.cached_prefix(block_hashes(list(range(8)), 4)) == [0]
    assert bm.num_cached_blocks == 1 and bm.num_free_blocks == 1


def test_a_grow_past_the_free_blocks_leaves_every_structure_as_it_was():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 8)
    bm.allocate("b", 4)
    before = (dict(bm._extents), dict(bm._extent_ending), list(bm._refs), bm.block_table("a")[:])
    with pytest.raises(OutOfBlocks):
        bm.grow("a", 17)  # 3 more blocks, 1 free
    assert (dict(bm._extents), dict(bm._extent_ending), list(bm._refs), bm.block_table("a")) == before
    assert bm.grow("a", 9) == [3]  # the one free block: 2 is b's


def test_grow_adds_a_block_only_at_the_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 3)
    assert bm.grow("a", 4) == []
    assert bm.grow("a", 5) == [1]
    assert bm.block_table("a") == [0, 1]


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate("a", 4)
    with pytest.raises(OutOfBlocks):
        bm.allocate("b", 9)
    assert not bm.owns("b")
    assert bm.num_free_blocks == 1
    assert not bm.can_allocate(5)
    assert bm.can_allocate(4)


def test_double_allocate_is_refused_and_unknown_free_is_harmless():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate("a", 1)
    with pytest.raises(ValueError):
        bm.allocate("a", 1)
    assert bm.free("nobody") == []
    assert bm.usage == 0.5


# -- the prefix cache ---------------------------------------------------------------------------


def _cached_request(bm: BlockManager, request_id: str, tokens: list[int],
                    salt: str | None = None) -> list[int]:
    """Allocate tokens for request_id, reusing what is cached, and cache its full blocks (as the
    engine does once they are computed); returns its table."""
    hashes = block_hashes(tokens, bm.block_size, salt)
    table = bm.allocate(request_id, len(tokens), hashes)
    bm.cache(request_id, hashes)
    return table


def test_block_hashes_chain_over_the_prefix_and_the_salt():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # full blocks only
    assert block_hashes(list(range(8)), 4) == a
    assert block_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4)[0] == a[0]
    changed_first = block_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)
    assert changed_first[0] != a[0] and changed_first[1] != a[1]  # a later block depends on earlier ones
    salted = block_hashes(list(range(8)), 4, salt="tenant-1")
    assert salted[0] != a[0] and salted == block_hashes(list(range(8)), 4, salt="tenant-1")
    assert block_hashes(list(range(8)), 4, salt="tenant-2")[0] != salted[0]
    # The namespace (an engine's model, dtype and block size) roots the chain too, apart from the salt.
    named = block_hashes(list(range(8)), 4, namespace="model|bfloat16|4")
    assert named[0] != a[0] and named[0] != block_hashes(list(range(8)), 4, namespace="model|float32|4")[0]
    assert block_hashes(list(range(8)), 4, "x", "")[0] != block_hashes(list(range(8)), 4, "", "x")[0]
    assert routing_key(a[0]) == int.from_bytes(a[0][:8], "little")


def test_a_freed_prompts_full_blocks_are_reused_by_an_equal_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert _cached_request(bm, "a", list(range(10))) == [0, 1, 2]
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2
    hashes = block_hashes(list(range(10)) + [50, 51], 4)
    assert bm.cached_prefix(hashes) == [0, 1]
    assert bm.allocate("b", 12, hashes) == [0, 1, 2]  # block 2 held no full block: freed plainly, reused
    assert (bm.stats.queries, bm.stats.hits) == (10 + 12, 8)


def test_a_partial_hit_stops_at_the_first_block_that_differs():
    bm = BlockManager(num_blocks=8, block_size=4)
    _cached_request(bm, "a", list(range(12)))
    bm.free("a")
    tokens = list(range(4)) + [99] * 8
    assert bm.allocate("b", 12, block_hashes(tokens, 4)) == [0, 4, 5]  # 1 and 2 stay cached
    assert (bm.stats.queries, bm.stats.hits) == (24, 4)


def test_a_block_shared_by_many_requests_stays_held_until_the_last_frees_it():
    bm = BlockManager(num_blocks=6, block_size=4)
    _cached_request(bm, "a", list(range(8)))
    tables = [_cached_request(bm, r, list(range(8)) + [i]) for i, r in enumerate(["b", "c"])]
    assert tables == [[0, 1, 2], [0, 1, 4]]
    assert bm.num_free_blocks == 2
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 3  # block 2; blocks 0 and 1 are still c's
    assert not bm.can_allocate(16)
    bm.free("c")
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2


def test_cached_blocks_are_evicted_least_recently_used_and_a_prompt_tail_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    _cached_request(bm, "a", list(range(8)))  # blocks 0, 1
    _cached_request(bm, "b", list(range(100, 108)))  # blocks 2, 3
    bm.free("a")
    bm.free("b")  # most recently used
    assert bm.allocate("c", 4) == [1]  # a's tail block first
    assert bm.cached_prefix(block_hashes(list(range(8)), 4)) == [0]
    assert bm.allocate("d", 8) == [0, 3]
    assert bm.cached_prefix(block_hashes(list(range(100, 108)), 4)) == [2]
    assert bm.num_cached_blocks == 1


def test_an_unheld_hit_is_not_counted_free_for_the_rest_of_its_own_request():
    bm = BlockManager(num_blocks=2, block_size=4)
    _cached_request(bm, "a", list(range(4)))
    bm.free("a")
    hashes = block_hashes(list(range(8)), 4)[:1]
    assert bm.num_free_blocks == 2
    assert bm.can_allocate(8, hashes)  # block 0 reused, one fresh block
    assert not bm.can_allocate(12, hashes)  # would need block 0 twice
    with pytest.raises(OutOfBlocks):
        bm.allocate("b", 12, hashes)
    assert not bm.owns("b") and bm.num_free_blocks == 2 and bm.stats.queries == 4  # a's only


def test_a_cancelled_requests_computed_blocks_stay_cached_and_the_rest_are_freed():
    bm = BlockManager(num_blocks=4, block_size=4)
    tokens = list(range(16))
    bm.allocate("a", 16, block_hashes(tokens, 4))
    bm.cache("a", block_hashes(tokens, 4)[:1])  # one chunk of 4 tokens computed, then cancelled
    bm.free("a")
    assert bm.num_cached_blocks == 1
    assert bm.allocate("b", 16, block_hashes(tokens, 4)[:3]) == [0, 1, 2, 3]
    assert bm.stats.hits == 4


def test_an_equal_prefix_computed_twice_at_once_keeps_the_first_copy_cached():
    bm = BlockManager(num_blocks=4, block_size=4)
    hashes = block_hashes(list(range(8)), 4)
    bm.allocate("a", 8, hashes)
    bm.allocate("b", 8, hashes)  # nothing cached yet: both compute it
    bm.cache("a", hashes)
    bm.cache("b", hashes)
    bm.free("b")
    assert bm.num_cached_blocks == 2 and bm.cached_prefix(hashes) == [0, 1]
    assert bm.allocate("c", 8) == [2, 3]  # b's copies went back to the free list, uncached


def test_salted_prefixes_never_share_a_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(12))
    _cached_request(bm, "a", tokens, salt="alice")
    assert _cached_request(bm, "b", tokens, salt="bob") == [4, 5, 6]
    assert bm.cached_prefix(block_hashes(tokens, 4)) == []  # nor with an unsalted request


def test_reset_forgets_every_prefix_and_frees_the_unheld_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    _cached_request(bm, "a", list(range(8)))
    _cached_request(bm, "b", list(range(100, 104)))
    bm.free("a")
    assert bm.reset_cache() == 3
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 3
    assert bm.cached_prefix(block_hashes(list(range(8)), 4)) == []
    bm.free("b")
    assert bm.allocate("c", 16) == [0, 1, 2, 3]  # one run again
